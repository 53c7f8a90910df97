//! virtio-blk on top of the test frontend: config space, request layout, and a synchronous
//! device for tests (one request at a time, waiting for each).

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress};

use super::{Buffer, Connection, Error, GuestRam, Result, SplitQueue};

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

pub const SECTOR: u64 = 512;
pub const HEADER_LEN: u32 = 16;
/// The fields of `virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: u32 = 60;

/// Every feature a Linux guest would take, as far as a backend offers it.
pub fn features_wanted() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(0u64, |features, &bit| features | (1u64 << bit))
}

/// The parts of `virtio_blk_config` the tests and the load generator look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
        Some(Self {
            capacity_sectors: u64_at(0)?,
            seg_max: u32_at(12)?,
            blk_size: u32_at(20)?,
            num_queues: u16_at(34)?,
            max_discard_sectors: u32_at(36)?,
            max_discard_seg: u32_at(40)?,
            max_write_zeroes_sectors: u32_at(48)?,
            max_write_zeroes_seg: u32_at(52)?,
            write_zeroes_may_unmap: *bytes.get(56)?,
        })
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors * SECTOR
    }
}

/// The 16-byte request header.
pub fn header(kind: u32, sector: u64) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    header
}

/// One `virtio_blk_discard_write_zeroes` segment.
pub fn discard_segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..16].copy_from_slice(&flags.to_le_bytes());
    raw
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u8,
    pub used_len: u32,
    /// For reads and GET_ID: the data buffer after completion.
    pub data: Vec<u8>,
}

/// What goes between header and status.
pub enum Data<'a> {
    None,
    /// Device-readable bytes (writes, discard segments).
    Out(&'a [u8]),
    /// Device-writable space of this many bytes (reads, GET_ID).
    In(u32),
}

/// Status value a backend never writes: shows "untouched".
pub const STATUS_UNTOUCHED: u8 = 0xff;

/// A virtio-blk device behind a vhost-user socket, driven one request at a time.
pub struct TestBlk {
    ram: Arc<GuestRam>,
    connection: Connection,
    queues: Vec<SplitQueue>,
    header: GuestAddress,
    status: GuestAddress,
    data: GuestAddress,
    data_len: u32,
    pub timeout: Duration,
}

impl TestBlk {
    /// Size of the data scratch buffer (the largest single request).
    pub const DATA_LEN: u32 = 1 << 20;

    /// Connects with `queues` queues of `queue_size` entries. Guest RAM is two adjacent
    /// 16 MiB regions, so buffers can straddle a region boundary.
    pub fn connect(socket: &Path, queues: usize, queue_size: u16, wanted: u64) -> Result<Self> {
        let ram = Arc::new(GuestRam::new(&[(0, 16 << 20), (16 << 20, 16 << 20)])?);
        let mut connection = Connection::connect(socket, &ram, wanted, queues)?;
        let event_idx = connection.negotiation().has(VIRTIO_RING_F_EVENT_IDX);
        let mut rings = Vec::with_capacity(queues);
        for index in 0..queues {
            let queue = SplitQueue::new(Arc::clone(&ram), queue_size, event_idx)?;
            connection.start_queue(index, &ram, &queue)?;
            rings.push(queue);
        }
        let header = ram.alloc(u64::from(HEADER_LEN), 16)?;
        let status = ram.alloc(1, 1)?;
        let data = ram.alloc(u64::from(Self::DATA_LEN), 4096)?;
        Ok(Self {
            ram,
            connection,
            queues: rings,
            header,
            status,
            data,
            data_len: Self::DATA_LEN,
            timeout: Duration::from_secs(5),
        })
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Hands the running rings to another backend at `socket`, as a frontend does when the
    /// last one died: the same memory, the in-flight region `inflight` if given, and each
    /// ring from `base`.
    pub fn take_over(
        &mut self,
        socket: &Path,
        wanted: u64,
        inflight: Option<(&VhostUserInflight, RawFd)>,
        base: u16,
    ) -> Result<()> {
        let mut connection = Connection::connect(socket, &self.ram, wanted, self.queues.len())?;
        if let Some((info, fd)) = inflight {
            connection.frontend().set_inflight_fd(info, fd)?;
        }
        for (index, queue) in self.queues.iter().enumerate() {
            connection.start_queue_at(index, &self.ram, queue, base)?;
        }
        self.connection = connection;
        Ok(())
    }

    pub fn connection(&mut self) -> &mut Connection {
        &mut self.connection
    }

    pub fn queue(&mut self, index: usize) -> &mut SplitQueue {
        &mut self.queues[index]
    }

    /// The connection and one queue at once, e.g. to stop the queue from one thread while
    /// another keeps filling it.
    pub fn connection_and_queue(&mut self, index: usize) -> (&mut Connection, &mut SplitQueue) {
        (&mut self.connection, &mut self.queues[index])
    }

    pub fn config(&mut self) -> Result<BlkConfig> {
        let bytes = self.connection.config(0, CONFIG_LEN)?;
        BlkConfig::parse(&bytes).ok_or_else(|| Error::Access("config space too short".into()))
    }

    /// The header, data and status buffers of the scratch request.
    pub fn buffers(&self) -> (GuestAddress, GuestAddress, GuestAddress) {
        (self.header, self.data, self.status)
    }

    /// Sends one request on `queue` and waits for it.
    pub fn request(
        &mut self,
        queue: usize,
        kind: u32,
        sector: u64,
        data: Data<'_>,
    ) -> Result<Reply> {
        let mem = self.ram.memory();
        let access = |e: vm_memory::GuestMemoryError| Error::Access(e.to_string());
        mem.write_slice(&header(kind, sector), self.header)
            .map_err(access)?;
        mem.write_obj(STATUS_UNTOUCHED, self.status)
            .map_err(access)?;
        let mut buffers = vec![Buffer::readable(self.header, HEADER_LEN)];
        let read_len = match data {
            Data::None => 0,
            Data::Out(bytes) => {
                if bytes.len() > self.data_len as usize {
                    return Err(Error::OutOfMemory(bytes.len() as u64));
                }
                mem.write_slice(bytes, self.data).map_err(access)?;
                buffers.push(Buffer::readable(self.data, bytes.len() as u32));
                0
            }
            Data::In(len) => {
                if len > self.data_len {
                    return Err(Error::OutOfMemory(len.into()));
                }
                // Poison the buffer so stale contents can't pass for data read.
                mem.write_slice(&vec![0xa5u8; len as usize], self.data)
                    .map_err(access)?;
                buffers.push(Buffer::writable(self.data, len));
                len
            }
        };
        buffers.push(Buffer::writable(self.status, 1));
        let (_, used_len) = self.submit(queue, &buffers)?;
        let mem = self.ram.memory();
        let status: u8 = mem.read_obj(self.status).map_err(access)?;
        let mut out = vec![0u8; read_len as usize];
        mem.read_slice(&mut out, self.data).map_err(access)?;
        Ok(Reply {
            status,
            used_len,
            data: out,
        })
    }

    /// Queues `buffers` as one chain, kicks, and waits for it to be used.
    pub fn submit(&mut self, queue: usize, buffers: &[Buffer]) -> Result<(u16, u32)> {
        let timeout = self.timeout;
        let ring = &mut self.queues[queue];
        ring.add(buffers)?;
        ring.notify()?;
        ring.wait_used(timeout)
    }

    pub fn read(&mut self, queue: usize, sector: u64, len: u32) -> Result<Reply> {
        self.request(queue, VIRTIO_BLK_T_IN, sector, Data::In(len))
    }

    pub fn write(&mut self, queue: usize, sector: u64, bytes: &[u8]) -> Result<Reply> {
        self.request(queue, VIRTIO_BLK_T_OUT, sector, Data::Out(bytes))
    }

    pub fn flush(&mut self, queue: usize) -> Result<Reply> {
        self.request(queue, VIRTIO_BLK_T_FLUSH, 0, Data::None)
    }

    pub fn get_id(&mut self, queue: usize) -> Result<Reply> {
        self.request(queue, VIRTIO_BLK_T_GET_ID, 0, Data::In(VIRTIO_BLK_ID_BYTES))
    }

    /// DISCARD (or WRITE_ZEROES with `flags`) of `(sector, sectors)` ranges.
    pub fn discard(
        &mut self,
        queue: usize,
        kind: u32,
        ranges: &[(u64, u32)],
        flags: u32,
    ) -> Result<Reply> {
        let payload: Vec<u8> = ranges
            .iter()
            .flat_map(|&(sector, sectors)| discard_segment(sector, sectors, flags))
            .collect();
        self.request(queue, kind, 0, Data::Out(&payload))
    }
}

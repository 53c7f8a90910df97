//! virtio-net on top of the test frontend: receive buffers, frames to send, control commands.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress};

use super::{Buffer, Connection, Error, GuestRam, Result, SplitQueue};

pub use virtio_bindings::virtio_net;

/// The virtio-net header with `num_buffers` (VERSION_1).
pub const HEADER_LEN: usize = 12;

/// What a Linux guest takes, as far as a backend offers it (`extra` adds or, with `without`,
/// the test removes bits).
pub fn features_wanted() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_RX,
        VIRTIO_NET_F_CTRL_MAC_ADDR,
        VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
    ]
    .iter()
    .fold(0u64, |f, &bit| f | (1u64 << bit))
}

/// A header for a frame that needs nothing done.
pub fn plain_header() -> [u8; HEADER_LEN] {
    [0; HEADER_LEN]
}

/// A received frame: the header and the Ethernet frame after it, and how many buffers it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub header: [u8; HEADER_LEN],
    pub frame: Vec<u8>,
    pub buffers: usize,
}

impl Received {
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.header[10], self.header[11]])
    }
}

struct RxQueue {
    ring: SplitQueue,
    /// The buffer of each posted chain, by head.
    posted: HashMap<u16, (GuestAddress, u32)>,
}

/// A virtio-net device behind a vhost-user socket.
pub struct TestNet {
    ram: Arc<GuestRam>,
    connection: Connection,
    rx: Vec<RxQueue>,
    tx: Vec<SplitQueue>,
    ctrl: Option<SplitQueue>,
    tx_buffer: GuestAddress,
    ctrl_buffer: GuestAddress,
    pub timeout: Duration,
}

impl TestNet {
    const TX_BUFFER: u64 = 128 << 10;

    /// Connects with `pairs` queue pairs and the control queue, of `queue_size` entries.
    pub fn connect(socket: &Path, pairs: usize, queue_size: u16, wanted: u64) -> Result<Self> {
        let ram = Arc::new(GuestRam::new(&[(0, 32 << 20), (32 << 20, 32 << 20)])?);
        let connection = Connection::connect(socket, &ram, wanted, 2 * pairs + 1)?;
        Self::start(ram, connection, pairs, queue_size)
    }

    /// [`TestNet::connect`] on a backend that connected to us (its client mode).
    pub fn from_stream(
        stream: UnixStream,
        pairs: usize,
        queue_size: u16,
        wanted: u64,
    ) -> Result<Self> {
        let ram = Arc::new(GuestRam::new(&[(0, 32 << 20), (32 << 20, 32 << 20)])?);
        let connection = Connection::from_stream(stream, &ram, wanted, 2 * pairs + 1)?;
        Self::start(ram, connection, pairs, queue_size)
    }

    fn start(
        ram: Arc<GuestRam>,
        mut connection: Connection,
        pairs: usize,
        queue_size: u16,
    ) -> Result<Self> {
        let has_ctrl = connection.negotiation().has(VIRTIO_NET_F_CTRL_VQ);
        let event_idx = connection.negotiation().has(VIRTIO_RING_F_EVENT_IDX);
        let mut rx = Vec::new();
        let mut tx = Vec::new();
        for pair in 0..pairs {
            let r = SplitQueue::new(Arc::clone(&ram), queue_size, event_idx)?;
            connection.start_queue(2 * pair, &ram, &r)?;
            rx.push(RxQueue {
                ring: r,
                posted: HashMap::new(),
            });
            let t = SplitQueue::new(Arc::clone(&ram), queue_size, event_idx)?;
            connection.start_queue(2 * pair + 1, &ram, &t)?;
            tx.push(t);
        }
        let ctrl = if has_ctrl {
            let c = SplitQueue::new(Arc::clone(&ram), 64, event_idx)?;
            connection.start_queue(2 * pairs, &ram, &c)?;
            Some(c)
        } else {
            None
        };
        let tx_buffer = ram.alloc(Self::TX_BUFFER, 4096)?;
        let ctrl_buffer = ram.alloc(4096, 4096)?;
        Ok(Self {
            ram,
            connection,
            rx,
            tx,
            ctrl,
            tx_buffer,
            ctrl_buffer,
            timeout: Duration::from_secs(5),
        })
    }

    pub fn connection(&mut self) -> &mut Connection {
        &mut self.connection
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The config space: MAC, status, max pairs, MTU.
    pub fn config(&mut self) -> Result<(Vec<u8>, u16, u16, u16)> {
        let c = self.connection.config(0, 12)?;
        let u16_at = |o: usize| u16::from_le_bytes([c[o], c[o + 1]]);
        Ok((c[..6].to_vec(), u16_at(6), u16_at(8), u16_at(10)))
    }

    /// Posts `count` receive buffers of `len` bytes on `pair`.
    pub fn post_rx(&mut self, pair: usize, count: usize, len: u32) -> Result<()> {
        let q = &mut self.rx[pair];
        for _ in 0..count {
            let addr = self.ram.alloc(u64::from(len), 64)?;
            let head = q.ring.add(&[Buffer::writable(addr, len)])?;
            q.posted.insert(head, (addr, len));
        }
        q.ring.notify()
    }

    /// The next received frame on `pair`, gathering its buffers (MRG_RXBUF); the buffers are
    /// posted again.
    pub fn receive(&mut self, pair: usize) -> Result<Received> {
        let timeout = self.timeout;
        let mem = self.ram.memory();
        let access = |e: vm_memory::GuestMemoryError| Error::Access(e.to_string());
        let q = &mut self.rx[pair];
        let mut bytes = Vec::new();
        let mut buffers = 0usize;
        let mut wanted = 1usize;
        while buffers < wanted {
            let (head, len) = q.ring.wait_used(timeout)?;
            let (addr, cap) = q
                .posted
                .remove(&head)
                .ok_or(Error::BadUsed { id: head.into() })?;
            if len > cap {
                return Err(Error::BadUsed { id: head.into() });
            }
            let start = bytes.len();
            bytes.resize(start + len as usize, 0);
            mem.read_slice(&mut bytes[start..], addr).map_err(access)?;
            if buffers == 0 && bytes.len() >= HEADER_LEN {
                wanted = usize::from(u16::from_le_bytes([bytes[10], bytes[11]])).max(1);
            }
            buffers += 1;
            // Recycle the buffer.
            let head = q.ring.add(&[Buffer::writable(addr, cap)])?;
            q.posted.insert(head, (addr, cap));
        }
        q.ring.notify()?;
        if bytes.len() < HEADER_LEN {
            return Err(Error::Access(format!("a {}-byte receive", bytes.len())));
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&bytes[..HEADER_LEN]);
        Ok(Received {
            header,
            frame: bytes[HEADER_LEN..].to_vec(),
            buffers,
        })
    }

    /// Whether a frame arrives on `pair` within `wait` (consumed if so).
    pub fn receive_within(&mut self, pair: usize, wait: Duration) -> Result<Option<Received>> {
        let saved = self.timeout;
        self.timeout = wait;
        let got = self.receive(pair);
        self.timeout = saved;
        match got {
            Ok(r) => Ok(Some(r)),
            Err(Error::Timeout(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends `frame` after `header` on `pair` and waits until the device has taken it.
    pub fn send(&mut self, pair: usize, header: &[u8; HEADER_LEN], frame: &[u8]) -> Result<()> {
        self.queue_frame(pair, header, frame, 0)?;
        let timeout = self.timeout;
        let q = &mut self.tx[pair];
        q.notify()?;
        q.wait_used(timeout).map(|_| ())
    }

    /// Sends `frames` on `pair` in one batch (one kick at most), waiting for all of them.
    pub fn send_batch(&mut self, pair: usize, frames: &[Vec<u8>]) -> Result<()> {
        let slot = Self::TX_BUFFER / frames.len().max(1) as u64;
        for (i, frame) in frames.iter().enumerate() {
            if (frame.len() + HEADER_LEN) as u64 > slot {
                return Err(Error::OutOfMemory(frame.len() as u64));
            }
            self.queue_frame(pair, &plain_header(), frame, i as u64 * slot)?;
        }
        let timeout = self.timeout;
        let q = &mut self.tx[pair];
        q.notify()?;
        for _ in frames {
            q.wait_used(timeout)?;
        }
        Ok(())
    }

    /// Puts one frame in the transmit queue at `offset` of the transmit buffer: the header
    /// and the frame as two descriptors, as Linux lays them out.
    fn queue_frame(
        &mut self,
        pair: usize,
        header: &[u8; HEADER_LEN],
        frame: &[u8],
        offset: u64,
    ) -> Result<()> {
        let mem = self.ram.memory();
        let access = |e: vm_memory::GuestMemoryError| Error::Access(e.to_string());
        let hdr = GuestAddress(self.tx_buffer.0 + offset);
        let data = GuestAddress(hdr.0 + HEADER_LEN as u64);
        mem.write_slice(header, hdr).map_err(access)?;
        mem.write_slice(frame, data).map_err(access)?;
        self.tx[pair].add(&[
            Buffer::readable(hdr, HEADER_LEN as u32),
            Buffer::readable(data, frame.len() as u32),
        ])?;
        Ok(())
    }

    /// One control command; the device's status byte (VIRTIO_NET_OK or VIRTIO_NET_ERR).
    pub fn control(&mut self, class: u8, command: u8, data: &[u8]) -> Result<u8> {
        let timeout = self.timeout;
        let mem = self.ram.memory();
        let access = |e: vm_memory::GuestMemoryError| Error::Access(e.to_string());
        let ctrl = self
            .ctrl
            .as_mut()
            .ok_or_else(|| Error::Access("no control queue".into()))?;
        let head = self.ctrl_buffer;
        let payload = GuestAddress(head.0 + 2);
        let ack = GuestAddress(head.0 + 2048);
        mem.write_slice(&[class, command], head).map_err(access)?;
        mem.write_slice(data, payload).map_err(access)?;
        mem.write_obj(0xffu8, ack).map_err(access)?;
        let mut buffers = vec![Buffer::readable(head, 2)];
        if !data.is_empty() {
            buffers.push(Buffer::readable(payload, data.len() as u32));
        }
        buffers.push(Buffer::writable(ack, 1));
        ctrl.add(&buffers)?;
        ctrl.notify()?;
        ctrl.wait_used(timeout)?;
        mem.read_obj(ack).map_err(access)
    }
}

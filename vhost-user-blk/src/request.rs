//! Turns a descriptor chain from the guest into a request, checking everything: the chain's
//! shape, that every buffer lies in guest memory, the request type, sizes and the disk bounds.
//! Nothing here trusts the guest, and nothing here panics on what the guest wrote.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::disk::SECTOR_SIZE;
use crate::virtio::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use cloister_backends::server::GuestMemory;

pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
const DISCARD_SEGMENT_LEN: usize = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What the parser needs to know about the device.
#[derive(Debug, Clone)]
pub struct Limits {
    pub capacity: u64,
    pub readonly: bool,
    /// Most descriptors one request may use (data segments plus header and status).
    pub max_descriptors: usize,
    pub serial: [u8; ID_LEN],
}

/// A run of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One `fallocate` a DISCARD or WRITE_ZEROES request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub mode: i32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Operation {
    Read { offset: u64, data: Vec<Segment> },
    Write { offset: u64, data: Vec<Segment> },
    Flush,
    Fallocate { ranges: Vec<Range> },
}

/// A request that needs I/O.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub status: GuestAddress,
    pub operation: Operation,
}

impl Request {
    /// Bytes the device writes into the chain when the request succeeds: the data read and the
    /// status byte.
    pub fn used_len_ok(&self) -> u32 {
        match &self.operation {
            Operation::Read { data, .. } => total_len(data).saturating_add(1),
            _ => 1,
        }
    }

    /// Bytes of data the request moves (reads and writes; nothing for the others).
    pub fn data_len(&self) -> u32 {
        match &self.operation {
            Operation::Read { data, .. } | Operation::Write { data, .. } => total_len(data),
            _ => 0,
        }
    }
}

pub fn total_len(segments: &[Segment]) -> u32 {
    segments
        .iter()
        .fold(0u32, |sum, s| sum.saturating_add(s.len))
}

/// What to do with one descriptor chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Submit to the I/O engine.
    Io(Request),
    /// Answered without I/O: write `status` at `status_addr` and return `used_len`.
    Done {
        head: u16,
        status_addr: GuestAddress,
        status: u8,
        used_len: u32,
        why: Option<&'static str>,
    },
    /// No usable status byte: the chain can only be returned with a used length of 0.
    Drop { head: u16, why: &'static str },
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// Reusable buffers, so a request costs no allocation beyond its data segment list.
#[derive(Debug, Default)]
pub struct Scratch {
    descs: Vec<Desc>,
}

/// Parses the chain `descriptors` (as yielded by `virtio_queue::DescriptorChain`) whose head
/// is `head`.
pub fn parse(
    head: u16,
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemory,
    limits: &Limits,
    scratch: &mut Scratch,
) -> Parsed {
    let descs = &mut scratch.descs;
    descs.clear();
    // `DescriptorChain` stops silently after `queue size` descriptors (a loop) or at a `next`
    // outside the table; either way the last descriptor it yields still says `has_next`.
    let mut truncated = false;
    for desc in descriptors {
        if descs.len() >= limits.max_descriptors {
            return Parsed::Drop {
                head,
                why: "descriptor chain longer than the device allows",
            };
        }
        truncated = desc.has_next();
        if desc.len() > 0 {
            descs.push(Desc {
                addr: desc.addr(),
                len: desc.len(),
                writable: desc.is_write_only(),
            });
        }
    }
    if truncated {
        return Parsed::Drop {
            head,
            why: "descriptor chain loops or points outside the descriptor table",
        };
    }

    // The status byte is the last byte of the last descriptor, which must be device-writable.
    let Some(last) = descs.last().copied() else {
        return Parsed::Drop {
            head,
            why: "empty descriptor chain",
        };
    };
    if !last.writable {
        return Parsed::Drop {
            head,
            why: "last descriptor is not device-writable (no status byte)",
        };
    }
    let Some(status_addr) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return Parsed::Drop {
            head,
            why: "status byte address overflows",
        };
    };
    if !mem.check_range(status_addr, 1) {
        return Parsed::Drop {
            head,
            why: "status byte outside guest memory",
        };
    }
    let fail = |status: u8, why: &'static str| Parsed::Done {
        head,
        status_addr,
        status,
        used_len: 1,
        why: Some(why),
    };

    // Readable descriptors first, then writable ones (virtio 1.x, 2.7.4.2); every buffer must
    // be guest memory.
    let readable = descs.iter().take_while(|d| !d.writable).count();
    if descs[readable..].iter().any(|d| !d.writable) {
        return fail(STATUS_IOERR, "readable descriptor after a writable one");
    }
    if descs
        .iter()
        .any(|d| !mem.check_range(d.addr, d.len as usize))
    {
        return fail(STATUS_IOERR, "buffer outside guest memory");
    }

    let (readable, writable) = descs.split_at(readable);
    let mut header = [0u8; HEADER_LEN];
    if gather(mem, readable, 0, &mut header).is_err() {
        return fail(STATUS_IOERR, "request header shorter than 16 bytes");
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    // The writable bytes before the status byte are data the device returns.
    let data_in = || segments(writable, 0, writable_len(writable).saturating_sub(1));
    let data_out = || segments(readable, HEADER_LEN as u64, u64::MAX);

    let operation = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (data, write) = if kind == VIRTIO_BLK_T_IN {
                (data_in(), false)
            } else {
                (data_out(), true)
            };
            if write && limits.readonly {
                return fail(STATUS_IOERR, "write to a read-only disk");
            }
            let len = data.iter().map(|s| u64::from(s.len)).sum::<u64>();
            if len % SECTOR_SIZE != 0 {
                return fail(STATUS_IOERR, "data length is not a multiple of 512");
            }
            let Some(offset) = byte_range(sector, len, limits.capacity) else {
                return fail(STATUS_IOERR, "request beyond the end of the disk");
            };
            if len == 0 {
                return Parsed::Done {
                    head,
                    status_addr,
                    status: STATUS_OK,
                    used_len: 1,
                    why: None,
                };
            }
            if write {
                Operation::Write { offset, data }
            } else {
                Operation::Read { offset, data }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if limits.readonly {
                // Nothing can be dirty.
                return Parsed::Done {
                    head,
                    status_addr,
                    status: STATUS_OK,
                    used_len: 1,
                    why: None,
                };
            }
            Operation::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            let data = data_in();
            let mut written = 0u32;
            for segment in &data {
                let from = written as usize;
                let take = (segment.len as usize).min(ID_LEN - from);
                if take == 0 {
                    break;
                }
                if mem
                    .write_slice(&limits.serial[from..from + take], segment.addr)
                    .is_err()
                {
                    return fail(STATUS_IOERR, "cannot write the device ID");
                }
                written += take as u32;
            }
            return Parsed::Done {
                head,
                status_addr,
                status: STATUS_OK,
                used_len: written + 1,
                why: None,
            };
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if limits.readonly {
                return fail(STATUS_UNSUPP, "discard or write-zeroes on a read-only disk");
            }
            match fallocate_ranges(mem, &data_out(), kind, limits.capacity) {
                Ok(ranges) if ranges.is_empty() => {
                    return Parsed::Done {
                        head,
                        status_addr,
                        status: STATUS_OK,
                        used_len: 1,
                        why: None,
                    }
                }
                Ok(ranges) => Operation::Fallocate { ranges },
                Err((status, why)) => return fail(status, why),
            }
        }
        _ => return fail(STATUS_UNSUPP, "unsupported request type"),
    };
    Parsed::Io(Request {
        head,
        status: status_addr,
        operation,
    })
}

/// `sector` and `len` as a byte offset, if the range lies inside the disk.
fn byte_range(sector: u64, len: u64, capacity: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= capacity).then_some(offset)
}

fn writable_len(descs: &[Desc]) -> u64 {
    descs.iter().map(|d| u64::from(d.len)).sum()
}

/// The bytes of `descs` from `skip` on, at most `limit` of them, as segments.
fn segments(descs: &[Desc], mut skip: u64, mut limit: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(descs.len());
    for desc in descs {
        let len = u64::from(desc.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(limit);
        if take == 0 {
            break;
        }
        // `skip` and `take` are below `desc.len`, a u32, and the range was checked to lie in
        // guest memory, so neither the cast nor the addition can overflow.
        out.push(Segment {
            addr: desc.addr.unchecked_add(skip),
            len: take as u32,
        });
        limit -= take;
        skip = 0;
    }
    out
}

/// Copies the first `out.len()` bytes after `skip` from the buffers into `out`.
fn gather(mem: &GuestMemory, descs: &[Desc], skip: u64, out: &mut [u8]) -> Result<(), ()> {
    let mut filled = 0;
    for segment in segments(descs, skip, out.len() as u64) {
        let end = filled + segment.len as usize;
        mem.read_slice(&mut out[filled..end], segment.addr)
            .map_err(drop)?;
        filled = end;
    }
    if filled == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

fn fallocate_ranges(
    mem: &GuestMemory,
    data: &[Segment],
    kind: u32,
    capacity: u64,
) -> Result<Vec<Range>, (u8, &'static str)> {
    let len = total_len(data) as usize;
    if len == 0 || len % DISCARD_SEGMENT_LEN != 0 {
        return Err((
            STATUS_UNSUPP,
            "discard/write-zeroes payload is not a list of 16-byte segments",
        ));
    }
    let count = len / DISCARD_SEGMENT_LEN;
    if count > MAX_DISCARD_SEGMENTS as usize {
        return Err((STATUS_UNSUPP, "too many discard/write-zeroes segments"));
    }
    let descs: Vec<Desc> = data
        .iter()
        .map(|s| Desc {
            addr: s.addr,
            len: s.len,
            writable: false,
        })
        .collect();
    let mut ranges = Vec::with_capacity(count);
    for index in 0..count {
        let mut raw = [0u8; DISCARD_SEGMENT_LEN];
        gather(mem, &descs, (index * DISCARD_SEGMENT_LEN) as u64, &mut raw)
            .map_err(|()| (STATUS_IOERR, "cannot read a discard/write-zeroes segment"))?;
        let sector = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Discard has no flags; write-zeroes only UNMAP (virtio 1.2, 5.2.6.2).
        let allowed = if kind == VIRTIO_BLK_T_DISCARD {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err((STATUS_UNSUPP, "unsupported discard/write-zeroes flags"));
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Err((
                STATUS_IOERR,
                "discard/write-zeroes segment larger than the device allows",
            ));
        }
        let bytes = u64::from(sectors) * SECTOR_SIZE;
        let offset = byte_range(sector, bytes, capacity).ok_or((
            STATUS_IOERR,
            "discard/write-zeroes beyond the end of the disk",
        ))?;
        if bytes == 0 {
            continue;
        }
        // A discarded range reads back as zeros too; punching keeps the image sparse.
        let mode = if kind == VIRTIO_BLK_T_DISCARD || unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        ranges.push(Range {
            offset,
            len: bytes,
            mode,
        });
    }
    Ok(ranges)
}

/// Writes a request's status byte. A failure means the guest removed the memory under an
/// in-flight request; there is nobody left to tell.
pub fn write_status(mem: &GuestMemory, addr: GuestAddress, status: u8) {
    if let Err(e) = mem.store(status, addr, Ordering::Relaxed) {
        log::debug!("cannot write status byte at {:#x}: {e}", addr.raw_value());
    }
}

#[cfg(test)]
mod tests;

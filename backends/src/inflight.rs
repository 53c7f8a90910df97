//! In-flight request tracking shared with the frontend: vhost-user's `INFLIGHT_SHMFD`, in the
//! split-ring layout of QEMU's vhost-user specification (and libvhost-user's).
//!
//! The backend marks each request it takes from a ring, and unmarks it once its completion is
//! in the used ring. The region is shared memory the frontend keeps: when the backend dies,
//! the frontend hands the same region to the next one (`SET_INFLIGHT_FD`), which takes up
//! again, in their original order, the requests that were marked, and goes on from the used
//! ring's index plus their number. A request the guest saw complete is never taken again, and
//! none the backend took is lost.
//!
//! Per queue, at `queue * queue_region_size(queue_size)`:
//!
//! ```text
//! 0   u64 features       (unused)
//! 8   u16 version        (1)
//! 10  u16 desc_num       (the ring's size)
//! 12  u16 last_batch_head (the request whose completion is being published)
//! 14  u16 used_idx       (the used ring's index once that completion is in)
//! 16  desc[desc_num]     16 bytes each: u8 inflight, 5 bytes padding, u16 next, u64 counter
//! ```
//!
//! A completion is published as: `last_batch_head = head`, the used element and index
//! written, `desc[head].inflight = 0`, `used_idx = index`. A backend that dies between the
//! second and third steps leaves `used_idx` behind the used ring's: the next one then knows
//! that `last_batch_head` is done.
//!
//! Nothing here trusts the region's contents: the frontend owns it, and indexes are checked.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
const ALIGN: usize = 64;

/// Bytes one queue's part of the region takes.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).next_multiple_of(ALIGN)
}

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("in-flight region of {queues} queue(s) of {queue_size}: an empty queue count or size")]
    Empty { queues: u16, queue_size: u16 },
    #[error("in-flight region: {size} bytes at offset {offset} is smaller than {queues} queue(s) of {queue_size} need ({needed} bytes)")]
    TooSmall {
        size: u64,
        offset: u64,
        queues: u16,
        queue_size: u16,
        needed: usize,
    },
    #[error("in-flight region: cannot create its memory")]
    Create(#[source] io::Error),
    #[error("in-flight region: cannot map it")]
    Map(#[source] io::Error),
}

/// A mapped in-flight region.
pub struct InflightRegion {
    base: NonNull<u8>,
    len: usize,
    queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory, accessed only through volatile reads and writes
// of whole fields at checked offsets; which thread does so does not matter.
unsafe impl Send for InflightRegion {}
// SAFETY: as above; each queue's part is written by that queue's worker only.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// A new, empty region for `queues` rings of `queue_size` (`GET_INFLIGHT_FD`): the region,
    /// the descriptor the frontend keeps, and its size.
    pub fn create(queues: u16, queue_size: u16) -> Result<(Self, OwnedFd, u64), InflightError> {
        if queues == 0 || queue_size == 0 {
            return Err(InflightError::Empty { queues, queue_size });
        }
        let len = usize::from(queues) * queue_region_size(queue_size);
        // SAFETY: a constant NUL-terminated name; the descriptor is owned right after.
        let fd = unsafe { libc::memfd_create(c"cloister-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(InflightError::Create(io::Error::last_os_error()));
        }
        let region = Self::map(&fd, len, 0, queues, queue_size)?;
        for q in 0..queues {
            let at = region.queue_offset(q);
            region.write_u16(at + 8, VERSION);
            region.write_u16(at + 10, queue_size);
        }
        Ok((region, fd, len as u64))
    }

    /// The region a frontend hands over (`SET_INFLIGHT_FD`): `size` bytes of `fd` from
    /// `offset`, for `queues` rings of `queue_size`.
    pub fn adopt(
        fd: &OwnedFd,
        size: u64,
        offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        if queues == 0 || queue_size == 0 {
            return Err(InflightError::Empty { queues, queue_size });
        }
        let needed = usize::from(queues) * queue_region_size(queue_size);
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        if len < needed || offset % page_size() != 0 {
            return Err(InflightError::TooSmall {
                size,
                offset,
                queues,
                queue_size,
                needed,
            });
        }
        Self::map(fd, needed, offset, queues, queue_size)
    }

    fn map(
        fd: &OwnedFd,
        len: usize,
        offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        // SAFETY: a new shared mapping of a descriptor we hold; nothing else is at the address
        // the kernel picks. A file shorter than the mapping faults on access beyond its end
        // (SIGBUS): the frontend's own file, which it made as large as we said.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(InflightError::Map(io::Error::last_os_error()));
        }
        let base = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| InflightError::Map(io::Error::from_raw_os_error(libc::EINVAL)))?;
        Ok(Self {
            base,
            len,
            queues,
            queue_size,
        })
    }

    pub fn queues(&self) -> u16 {
        self.queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_offset(&self, queue: u16) -> usize {
        usize::from(queue) * queue_region_size(self.queue_size)
    }

    fn ptr(&self, at: usize, len: usize) -> *mut u8 {
        assert!(
            at + len <= self.len,
            "in-flight region access out of bounds"
        );
        // SAFETY: within the mapping (checked above).
        unsafe { self.base.as_ptr().add(at) }
    }

    fn read_u8(&self, at: usize) -> u8 {
        // SAFETY: a byte within the mapping.
        unsafe { std::ptr::read_volatile(self.ptr(at, 1)) }
    }

    fn write_u8(&self, at: usize, v: u8) {
        // SAFETY: a byte within the mapping.
        unsafe { std::ptr::write_volatile(self.ptr(at, 1), v) }
    }

    fn read_u16(&self, at: usize) -> u16 {
        // SAFETY: two bytes within the mapping (a byte array: no alignment needed).
        u16::from_le_bytes(unsafe { std::ptr::read_volatile(self.ptr(at, 2).cast::<[u8; 2]>()) })
    }

    fn write_u16(&self, at: usize, v: u16) {
        // SAFETY: two bytes within the mapping.
        unsafe { std::ptr::write_volatile(self.ptr(at, 2).cast::<[u8; 2]>(), v.to_le_bytes()) }
    }

    fn read_u64(&self, at: usize) -> u64 {
        // SAFETY: eight bytes within the mapping.
        u64::from_le_bytes(unsafe { std::ptr::read_volatile(self.ptr(at, 8).cast::<[u8; 8]>()) })
    }

    fn write_u64(&self, at: usize, v: u64) {
        // SAFETY: eight bytes within the mapping.
        unsafe { std::ptr::write_volatile(self.ptr(at, 8).cast::<[u8; 8]>(), v.to_le_bytes()) }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

/// One queue's part of a region, as its worker uses it.
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    at: usize,
    /// The ring's size the region was made for (requests' heads are below it).
    size: u16,
    /// Orders the requests taken, so that they are taken again in that order.
    counter: u64,
}

/// What a new backend finds in a queue's part of the region.
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    /// Requests taken and not completed, oldest first: to be taken again before new ones.
    pub resubmit: Vec<u16>,
    /// Where the available ring is to be read from next: the used index plus their number.
    pub next_avail: u16,
}

impl InflightQueue {
    /// Queue `queue`'s part of `region`, for a ring of `ring_size`; None when the region has
    /// no such queue or was made for another ring size.
    pub fn new(region: Arc<InflightRegion>, queue: u16, ring_size: u16) -> Option<Self> {
        if queue >= region.queues || ring_size != region.queue_size {
            return None;
        }
        let at = region.queue_offset(queue);
        Some(Self {
            region,
            at,
            size: ring_size,
            counter: 0,
        })
    }

    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.size).then(|| self.at + HEADER_LEN + usize::from(head) * DESC_LEN)
    }

    /// Request `head` was taken from the available ring.
    pub fn begin(&mut self, head: u16) {
        let Some(d) = self.desc(head) else { return };
        self.counter += 1;
        self.region.write_u64(d + 8, self.counter);
        fence(Ordering::Release);
        self.region.write_u8(d, 1);
    }

    /// Request `head`'s completion is about to go into the used ring.
    pub fn completing(&self, head: u16) {
        if self.desc(head).is_some() {
            self.region.write_u16(self.at + 12, head);
            fence(Ordering::Release);
        }
    }

    /// Request `head`'s completion is in the used ring, whose index is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        let Some(d) = self.desc(head) else { return };
        fence(Ordering::Release);
        self.region.write_u8(d, 0);
        fence(Ordering::Release);
        self.region.write_u16(self.at + 14, used_idx);
    }

    /// Reads what a previous backend left, given the used ring's index now: the requests to
    /// take again, in order, and where to go on. Makes the region agree with the used ring.
    pub fn resume(&mut self, used_idx: u16) -> Resume {
        let r = &self.region;
        if r.read_u16(self.at + 14) != used_idx {
            // The last completion reached the used ring, and the backend died before it could
            // say so here.
            if let Some(d) = self.desc(r.read_u16(self.at + 12)) {
                r.write_u8(d, 0);
            }
            r.write_u16(self.at + 14, used_idx);
        }
        let mut taken: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|head| {
                let d = self.desc(head)?;
                (r.read_u8(d) == 1).then(|| (r.read_u64(d + 8), head))
            })
            .collect();
        taken.sort_unstable();
        self.counter = taken.last().map_or(0, |&(c, _)| c);
        let count = u16::try_from(taken.len()).unwrap_or(u16::MAX);
        Resume {
            resubmit: taken.into_iter().map(|(_, head)| head).collect(),
            next_avail: used_idx.wrapping_add(count),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_aligned_and_hold_every_descriptor() {
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(128), 2112);
        assert!(queue_region_size(256) >= HEADER_LEN + 256 * DESC_LEN);
    }

    #[test]
    fn a_new_backend_takes_up_what_the_last_left_in_order() {
        let (region, fd, size) = InflightRegion::create(2, 8).unwrap();
        let region = Arc::new(region);
        let mut q = InflightQueue::new(Arc::clone(&region), 1, 8).unwrap();
        // Taken: 3, 5, 1, 7; 5 completes fully (used index 1); 1's completion reaches the
        // used ring (index 2) but the backend dies before unmarking it.
        for head in [3, 5, 1, 7] {
            q.begin(head);
        }
        q.completing(5);
        q.completed(5, 1);
        q.completing(1);
        drop(q);
        drop(region);
        // The next backend, given the same memory.
        let adopted = Arc::new(InflightRegion::adopt(&fd, size, 0, 2, 8).unwrap());
        assert!(InflightQueue::new(Arc::clone(&adopted), 1, 16).is_none());
        assert!(InflightQueue::new(Arc::clone(&adopted), 2, 8).is_none());
        let mut q = InflightQueue::new(Arc::clone(&adopted), 1, 8).unwrap();
        assert_eq!(
            q.resume(2),
            Resume {
                resubmit: vec![3, 7],
                next_avail: 4
            }
        );
        // Queue 0 had nothing.
        let mut q0 = InflightQueue::new(adopted, 0, 8).unwrap();
        assert_eq!(
            q0.resume(0),
            Resume {
                resubmit: vec![],
                next_avail: 0
            }
        );
        // The counter goes on after the oldest left, so new requests sort after.
        q.begin(2);
        assert_eq!(q.resume(2).resubmit, vec![3, 7, 2]);
    }

    #[test]
    fn a_short_or_empty_region_is_refused_and_bad_heads_ignored() {
        let (_, fd, size) = InflightRegion::create(1, 8).unwrap();
        assert!(matches!(
            InflightRegion::adopt(&fd, size, 0, 2, 8),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::adopt(&fd, size, 0, 0, 8),
            Err(InflightError::Empty { .. })
        ));
        let region = Arc::new(InflightRegion::adopt(&fd, size, 0, 1, 8).unwrap());
        let mut q = InflightQueue::new(region, 0, 8).unwrap();
        q.begin(8);
        q.completing(200);
        q.completed(9, 0);
        assert_eq!(q.resume(0).resubmit, Vec::<u16>::new());
    }
}

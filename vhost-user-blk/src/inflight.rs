//! A queue's in-flight tracking (vhost-user's `INFLIGHT_SHMFD`): each request is marked in the
//! region the frontend keeps while the disk works on it, so that a backend started after this
//! one died takes up, in order, what was left unfinished (see `cloister_backends::inflight`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use cloister_backends::inflight::{InflightQueue, InflightRegion};
use cloister_backends::server::GuestMemory;
use vhost_user_backend::VringState;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};

type State = VringState<GuestMemoryAtomic<GuestMemory>>;

/// The connection's region, as the relay last gave it; one for every queue.
pub type RegionSlot = Arc<Mutex<Option<Arc<InflightRegion>>>>;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const DESCRIPTOR_LEN: u64 = 16;

pub struct Tracking {
    slot: RegionSlot,
    index: u16,
    queue: Option<InflightQueue>,
    /// The ring has been (re)started: what an earlier backend left is looked at before the
    /// first request is taken.
    pending: bool,
    /// Requests an earlier backend took and did not finish, oldest first.
    pub resubmit: VecDeque<u16>,
}

impl Tracking {
    pub fn new(slot: RegionSlot, index: usize) -> Self {
        Self {
            slot,
            index: u16::try_from(index).unwrap_or(u16::MAX),
            queue: None,
            pending: true,
            resubmit: VecDeque::new(),
        }
    }

    /// The ring stops or the device resets: the next start looks at the region again.
    pub fn restart(&mut self) {
        self.pending = true;
        self.queue = None;
        self.resubmit.clear();
    }

    /// Once per start, with the ring ready: takes the queue's part of the region (if the
    /// frontend gave one of this ring's size) and, from it and the used ring's index, where to
    /// go on and what to take again.
    pub fn resume(&mut self, state: &mut State, mem: &GuestMemory) {
        if !self.pending || !state.get_queue().ready() {
            return;
        }
        self.pending = false;
        let region = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let size = state.get_queue().size();
        self.queue = region.and_then(|r| InflightQueue::new(r, self.index, size));
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let used = match state.get_queue().used_idx(mem, Ordering::Acquire) {
            Ok(used) => used.0,
            Err(e) => {
                log::warn!(
                    "queue {}: cannot read the used ring ({e}); in-flight requests are not tracked",
                    self.index
                );
                self.queue = None;
                return;
            }
        };
        let resume = queue.resume(used);
        let q = state.get_queue_mut();
        q.set_next_used(used);
        q.set_next_avail(resume.next_avail);
        if used != 0 {
            // A running ring taken over: the last backend may have completed requests without
            // interrupting the guest, which then waits (with EVENT_IDX) for an interrupt at a
            // used index already passed. One interrupt makes it look; a frontend need not send
            // it (QEMU does not).
            if let Err(e) = state.signal_used_queue() {
                log::warn!("queue {}: cannot signal the guest: {e}", self.index);
            }
        }
        if !resume.resubmit.is_empty() {
            log::info!(
                "queue {}: taking up {} request(s) left in flight, then the ring from {}",
                self.index,
                resume.resubmit.len(),
                resume.next_avail
            );
        }
        self.resubmit = resume.resubmit.into();
    }

    pub fn begin(&mut self, head: u16) {
        if let Some(q) = self.queue.as_mut() {
            q.begin(head);
        }
    }

    pub fn completing(&self, head: u16) {
        if let Some(q) = self.queue.as_ref() {
            q.completing(head);
        }
    }

    pub fn completed(&self, head: u16, used_idx: u16) {
        if let Some(q) = self.queue.as_ref() {
            q.completed(head, used_idx);
        }
    }
}

/// The descriptors of the chain at `head` of the ring whose descriptor table is at `table`
/// (`size` entries), as `virtio_queue::DescriptorChain` yields them: an indirect table
/// followed, a loop or a `next` out of the table ending the walk with the last descriptor
/// still saying `NEXT` (which the request parser refuses). (`DescriptorChain::new` is private
/// to virtio-queue, so a chain cannot be made from a head the available ring no longer holds.)
pub fn chain_at(mem: &GuestMemory, table: GuestAddress, size: u16, head: u16) -> Vec<Descriptor> {
    let mut out = Vec::new();
    let (mut table, mut entries, mut index) = (table, u32::from(size), u32::from(head));
    let mut indirect = false;
    let mut budget = u32::from(size);
    while index < entries && budget > 0 {
        budget -= 1;
        let Some(at) = table.checked_add(u64::from(index) * DESCRIPTOR_LEN) else {
            break;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(at) else {
            break;
        };
        if desc.flags() & VIRTQ_DESC_F_INDIRECT != 0 && !indirect && out.is_empty() {
            let len = desc.len();
            if len == 0 || u64::from(len) % DESCRIPTOR_LEN != 0 {
                out.push(desc);
                break;
            }
            indirect = true;
            table = GuestAddress(desc.addr().0);
            entries = len / DESCRIPTOR_LEN as u32;
            budget = entries;
            index = 0;
            continue;
        }
        out.push(desc);
        if desc.flags() & VIRTQ_DESC_F_NEXT == 0 {
            break;
        }
        index = u32::from(desc.next());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryMmap, GuestRegionMmap, MmapRegion};

    fn memory() -> GuestMemory {
        let region =
            GuestRegionMmap::new(MmapRegion::new(0x10000).unwrap(), GuestAddress(0)).unwrap();
        GuestMemoryMmap::from_regions(vec![region]).unwrap()
    }

    fn put(mem: &GuestMemory, table: u64, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + index * DESCRIPTOR_LEN);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    #[test]
    fn chains_are_walked_like_the_ring_would() {
        let mem = memory();
        // 0 -> 3 -> 1, and 2 points to an indirect table of two.
        put(&mem, 0x1000, 0, 0x4000, 16, VIRTQ_DESC_F_NEXT, 3);
        put(&mem, 0x1000, 3, 0x5000, 512, VIRTQ_DESC_F_NEXT, 1);
        put(&mem, 0x1000, 1, 0x6000, 1, 2, 0);
        put(&mem, 0x1000, 2, 0x2000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        put(&mem, 0x2000, 0, 0x7000, 16, VIRTQ_DESC_F_NEXT, 1);
        put(&mem, 0x2000, 1, 0x8000, 1, 2, 0);
        let addrs = |head| {
            chain_at(&mem, GuestAddress(0x1000), 4, head)
                .iter()
                .map(|d| d.addr().0)
                .collect::<Vec<_>>()
        };
        assert_eq!(addrs(0), [0x4000, 0x5000, 0x6000]);
        assert_eq!(addrs(2), [0x7000, 0x8000]);
        assert!(addrs(4).is_empty());
        // A loop stops after the table's size, the last one still saying NEXT.
        put(&mem, 0x1000, 1, 0x6000, 1, VIRTQ_DESC_F_NEXT, 0);
        let looped = chain_at(&mem, GuestAddress(0x1000), 4, 0);
        assert_eq!(looped.len(), 4);
        assert!(looped.last().unwrap().flags() & VIRTQ_DESC_F_NEXT != 0);
    }
}

//! The I/O engine of one queue: takes parsed requests, runs them against the image, and hands
//! back completions. Both engines write the status byte themselves; the queue only returns the
//! chain to the used ring.

use std::os::fd::RawFd;
use std::sync::Arc;

use cloister_backends::server::GuestMemory;
use vm_memory::GuestMemoryBackend;

use crate::io_uring_engine::UringEngine;
use crate::request::{Request, Segment};
use crate::sync_engine::SyncEngine;

/// How a request just submitted completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completes {
    /// On the queue's own thread, by the end of the batch's `commit`: a copy to or from the
    /// page cache (falling back to the kernel only if the data isn't cached), or an error.
    Inline,
    /// When the kernel finishes it (O_DIRECT I/O, flushes, discards): the completion event
    /// fires.
    Later,
}

/// A request that is finished: its status byte is written; return `head` with `used_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub used_len: u32,
}

// One engine per queue, created once and never moved on the data path: its size is irrelevant.
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    Uring(UringEngine),
    Sync(SyncEngine),
}

impl Engine {
    /// Whether another request can be accepted now.
    pub fn has_room(&self) -> bool {
        match self {
            Engine::Uring(e) => e.has_room(),
            Engine::Sync(_) => true,
        }
    }

    /// Requests handed to the kernel and not finished yet.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(e) => e.in_flight(),
            Engine::Sync(_) => 0,
        }
    }

    /// Starts `request`; finished requests (all of them, for the sync engine) go to `done`.
    pub fn submit(
        &mut self,
        request: Request,
        mem: &Arc<GuestMemory>,
        done: &mut Vec<Completion>,
    ) -> Completes {
        match self {
            Engine::Uring(e) => e.submit(request, mem, done),
            Engine::Sync(e) => {
                e.submit(request, mem, done);
                Completes::Inline
            }
        }
    }

    /// Pushes what was submitted to the kernel and collects what already finished.
    pub fn commit(&mut self, done: &mut Vec<Completion>) {
        if let Engine::Uring(e) = self {
            e.commit(done);
        }
    }

    /// Collects finished requests (after the completion event fired).
    pub fn reap(&mut self, done: &mut Vec<Completion>) {
        if let Engine::Uring(e) = self {
            e.reap(done);
        }
    }

    /// Waits for every in-flight request. With `deliver`, they complete normally (status
    /// written, pushed to `done`); without, their results are thrown away (the guest reset the
    /// device, its buffers may already be reused).
    pub fn drain(&mut self, deliver: bool, done: &mut Vec<Completion>) {
        if let Engine::Uring(e) = self {
            e.drain(deliver, done);
        }
    }

    /// Readable when completions are waiting.
    pub fn event_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(e) => Some(e.event_fd()),
            Engine::Sync(_) => None,
        }
    }
}

/// Host iovecs for guest segments, appended to `out`. Fails if a segment is not (or no longer)
/// guest memory.
pub fn iovecs(mem: &GuestMemory, data: &[Segment], out: &mut Vec<libc::iovec>) -> Result<(), ()> {
    for segment in data {
        let mut covered = 0usize;
        // A segment may span two memory regions; each region is one host mapping.
        for slice in mem.get_slices(segment.addr, segment.len as usize) {
            let slice = slice.map_err(drop)?;
            covered += slice.len();
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        if covered != segment.len as usize {
            return Err(());
        }
    }
    Ok(())
}

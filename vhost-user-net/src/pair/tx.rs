//! Transmit: frames go to the tap straight from guest memory, a batch per `io_uring_enter`
//! (`tx_ring`), or a `writev` each where io_uring is not available.

use std::sync::atomic::Ordering;
use std::time::Instant;

use cloister_backends::poll::{events_waiting, spin_until, suppress_kicks};
use vhost_user_backend::VringT;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

use super::{GuestMemory, PairWorker, State, Vring, BATCH};

/// The kernel takes at most this many iovecs per writev.
const MAX_IOVECS: usize = 1024;
/// A chain whose frame was not written (a bad chain, or a ring that failed).
const NOT_SENT: i32 = i32::MIN;

impl PairWorker {
    /// Sends what the transmit queue holds to the tap; polls it for a while when it runs empty
    /// (see `--poll-max-us`), then re-arms notifications.
    pub fn serve_tx(&mut self, vring: &Vring, mem: &GuestMemory) {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
        // A kick after a sleep: how long the wait was tells the poll window.
        self.tx_poll.work(Instant::now());
        loop {
            if let Err(e) = state.disable_notification() {
                self.guest_error(format_args!("transmit queue: {e}"));
            }
            loop {
                let Some(sent) = self.send_batch(&mut state, mem) else {
                    // An available ring we cannot read: nothing more until the driver resets.
                    return;
                };
                if sent > 0 {
                    self.notify(&mut state);
                }
                if sent < BATCH {
                    break;
                }
            }
            let now = Instant::now();
            let window = self.tx_poll.idle(now);
            if !window.is_zero() {
                suppress_kicks(state.get_queue(), mem);
                let queue = state.get_queue();
                let thread_events = self.thread_events;
                let mut frames = false;
                spin_until(now, window, || {
                    frames = queue
                        .avail_idx(mem, Ordering::Acquire)
                        .is_ok_and(|idx| idx.0 != queue.next_avail());
                    frames || events_waiting(thread_events)
                });
                if frames {
                    self.tx_poll.work(Instant::now());
                    continue;
                }
            }
            match state.enable_notification() {
                Ok(true) => {
                    self.tx_poll.work(Instant::now());
                    continue;
                }
                Ok(false) => break,
                Err(e) => {
                    self.guest_error(format_args!("transmit queue: {e}"));
                    break;
                }
            }
        }
    }

    /// Sends up to `BATCH` frames; returns how many chains it took, None if the available
    /// ring cannot be read.
    fn send_batch(&mut self, state: &mut State, mem: &GuestMemory) -> Option<usize> {
        let mut heads = [0u16; BATCH];
        // Per chain: what its write returned (bytes or a negated errno), or NOT_SENT.
        let mut results = [NOT_SENT; BATCH];
        // The frames to send: their iovecs, and the chain each is.
        let mut frames = [(0usize, 0usize); BATCH];
        let mut chain_of = [0usize; BATCH];
        let mut sendable = 0;
        let mut count = 0;
        self.iovecs.clear();
        {
            let mut chains = match state.get_queue_mut().iter(mem) {
                Ok(chains) => chains,
                Err(e) => {
                    self.guest_error(format_args!("transmit queue: {e}"));
                    return None;
                }
            };
            while count < BATCH {
                let Some(chain) = chains.next() else { break };
                heads[count] = chain.head_index();
                let start = self.iovecs.len();
                let mut bad = None;
                let mut total = 0usize;
                for desc in chain {
                    if desc.is_write_only() {
                        bad = Some("a transmit buffer the device may only write".to_string());
                        break;
                    }
                    for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                        match slice {
                            Ok(slice) if self.iovecs.len() - start < MAX_IOVECS => {
                                total += slice.len();
                                self.iovecs.push(libc::iovec {
                                    iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                                    iov_len: slice.len(),
                                });
                            }
                            Ok(_) => bad = Some("more than 1024 segments".to_string()),
                            Err(e) => bad = Some(format!("a buffer outside guest memory: {e}")),
                        }
                    }
                    if bad.is_some() {
                        break;
                    }
                }
                match bad {
                    None if total >= 14 + 10 => {
                        frames[sendable] = (start, self.iovecs.len());
                        chain_of[sendable] = count;
                        sendable += 1;
                    }
                    bad => {
                        self.iovecs.truncate(start);
                        let why = bad.unwrap_or_else(|| format!("a {total}-byte frame"));
                        self.guest_error(format_args!("frame dropped: {why}"));
                    }
                }
                count += 1;
            }
        }
        let mut written = [NOT_SENT; BATCH];
        self.write_frames(&frames[..sendable], &mut written[..sendable]);
        self.iovecs.clear();
        for (i, &chain) in chain_of[..sendable].iter().enumerate() {
            results[chain] = written[i];
        }
        let queue = state.get_queue_mut();
        let mut failed = None;
        for (&head, &result) in heads[..count].iter().zip(&results[..count]) {
            if result >= 0 {
                self.counters.tx_frames += 1;
            } else {
                self.counters.tx_dropped += 1;
                if result != NOT_SENT {
                    failed = Some(result);
                }
            }
            // Straight on the queue with the memory at hand (VringState's own add_used loads
            // the memory anew for each).
            if let Err(e) = queue.add_used(mem, head, 0) {
                self.guest_error(format_args!("cannot return a transmit buffer: {e}"));
            }
        }
        if let Some(errno) = failed {
            let e = std::io::Error::from_raw_os_error(-errno);
            self.guest_error(format_args!("frame dropped: tap write: {e}"));
        }
        Some(count)
    }

    /// Writes `frames` (ranges of `iovecs`) to the tap, through the ring while there is one.
    fn write_frames(&mut self, frames: &[(usize, usize)], written: &mut [i32]) {
        if let Some(ring) = &mut self.tx_ring {
            // SAFETY: every iovec points into guest memory mapped for its length, which the
            // caller's `mem` keeps mapped until this returns.
            match unsafe { ring.send(&self.iovecs, frames, written) } {
                Ok(()) => return,
                Err(e) => {
                    // What was submitted may have gone out; the rest is dropped, not sent
                    // twice, and later batches use writev.
                    log::warn!("pair {}: transmit ring: {e}; using writev", self.index);
                    self.tx_ring = None;
                    return;
                }
            }
        }
        for (&(start, end), result) in frames.iter().zip(written.iter_mut()) {
            // SAFETY: as above.
            *result = match unsafe { self.tap.writev(&self.iovecs[start..end]) } {
                Ok(n) => n as i32,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
        }
    }
}

//! One queue pair's worker: frames from the tap to the receive queue, frames from the transmit
//! queue to the tap, each with one notification per batch.
//!
//! The tap descriptor is in the worker thread's epoll edge-triggered: the worker reads until
//! the tap is empty or the guest runs out of receive buffers. In the second case it keeps the
//! frame it holds, asks the driver for a kick (the receive queue's notifications are otherwise
//! off), and carries on when buffers come. Frames are read into a buffer of the worker's and
//! copied into the guest's (a frame's length is known only once read, and with MRG_RXBUF it
//! decides how many buffers it takes); transmitted frames go to the tap straight from guest
//! memory with one `writev` each.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloister_backends::logging::RateLimit;
use cloister_backends::server::GuestMemory;
use cloister_tap::TapQueue;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend};

use crate::filter::RxFilter;
use crate::state::DeviceState;

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;
type State = VringState<GuestMemoryAtomic<GuestMemory>>;

/// The largest frame a tap hands over: a 64 KiB GSO frame, its Ethernet header and the
/// virtio-net header.
const MAX_FRAME: usize = 65536 + 14 + 4 + 12;
/// Frames per batch before the used ring is published and the guest told.
const BATCH: usize = 64;
/// The kernel takes at most this many iovecs per writev.
const MAX_IOVECS: usize = 1024;

/// Frames and bytes moved, and what was dropped; read by the tests through the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

pub struct PairWorker {
    index: usize,
    tap: Arc<TapQueue>,
    frame: Vec<u8>,
    /// Length of the frame in `frame` not yet given to the guest.
    pending: Option<usize>,
    /// The tap may have frames (its edge was seen and it was not read empty since).
    tap_readable: bool,
    /// Receive buffers gathered for the frame being delivered: (address, length) and, per
    /// chain, its head and how many segments it has.
    segments: Vec<(GuestAddress, usize)>,
    chains: Vec<(u16, usize)>,
    iovecs: Vec<libc::iovec>,
    counters: Counters,
    guest_errors: RateLimit,
}

// SAFETY: `iovecs` only holds pointers between the gathering of one frame and its writev, on
// the thread that holds the worker's lock.
unsafe impl Send for PairWorker {}

/// How delivering one frame ended.
enum Delivery {
    Done,
    /// Not enough receive buffers: the frame stays. `seen`: the available index read.
    NoBuffers {
        seen: u16,
    },
    /// The frame cannot be delivered (too big for a buffer without MRG_RXBUF, or for the
    /// whole ring; a bad chain); `used` buffers went back to the guest.
    Dropped {
        used: usize,
    },
    /// The available ring cannot be read.
    Broken,
}

impl PairWorker {
    pub fn new(index: usize, tap: Arc<TapQueue>) -> Self {
        Self {
            index,
            tap,
            frame: vec![0; MAX_FRAME],
            pending: None,
            tap_readable: true,
            segments: Vec::new(),
            chains: Vec::new(),
            iovecs: Vec::with_capacity(64),
            counters: Counters::default(),
            guest_errors: RateLimit::new(Duration::from_secs(1)),
        }
    }

    pub fn tap(&self) -> &TapQueue {
        &self.tap
    }

    /// What moved since the last call (a connection's worth).
    pub fn take_counters(&mut self) -> Counters {
        std::mem::take(&mut self.counters)
    }

    /// A reset or a disconnect: the frame held is for a driver that is gone.
    pub fn reset(&mut self) {
        self.pending = None;
        self.tap_readable = true;
    }

    /// The tap's edge: it has frames.
    pub fn tap_ready(&mut self) {
        self.tap_readable = true;
    }

    /// Moves frames from the tap to the receive queue until one of them runs dry.
    pub fn serve_rx(&mut self, vring: &Vring, mem: &GuestMemory, device: &DeviceState) {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
        // Buffers returned since the guest was last told (delivered or dropped frames alike:
        // a guest never told of its used buffers never posts new ones).
        let mut unsignalled = 0;
        loop {
            if self.pending.is_none() && !self.read_frame(device) {
                break;
            }
            let Some(len) = self.pending else { break };
            match self.deliver(&mut state, mem, len, device) {
                Delivery::Done => {
                    self.pending = None;
                    self.counters.rx_frames += 1;
                    unsignalled += 1;
                }
                Delivery::Dropped { used } => {
                    self.pending = None;
                    self.counters.rx_dropped += 1;
                    unsignalled += used;
                }
                Delivery::NoBuffers { seen } => {
                    // What was used goes back first: the guest refills only after that.
                    if unsignalled > 0 {
                        self.notify(&mut state);
                        unsignalled = 0;
                    }
                    // A kick once the guest adds past what it had made available: only new
                    // buffers make the frame fit.
                    if !rearm_past(&mut state, mem, seen) {
                        break;
                    }
                }
                // An available ring we cannot read: nothing more until the driver resets.
                Delivery::Broken => break,
            }
            if unsignalled >= BATCH {
                self.notify(&mut state);
                unsignalled = 0;
            }
        }
        if unsignalled > 0 {
            self.notify(&mut state);
        }
    }

    /// Reads the next frame the guest accepts into `frame`; false when the tap is empty.
    fn read_frame(&mut self, device: &DeviceState) -> bool {
        while self.tap_readable {
            match self.tap.read(&mut self.frame) {
                Ok(Some(len)) => {
                    let header = device.header_len();
                    let dest = self.frame.get(header..header + 6).unwrap_or(&[]);
                    if len >= header + 14 && device.filter(|f: &RxFilter| f.accepts(dest)) {
                        self.pending = Some(len);
                        return true;
                    }
                    self.counters.rx_dropped += 1;
                }
                Ok(None) => self.tap_readable = false,
                Err(e) => {
                    // A detached queue (EBADFD) or a tap gone down: nothing to read until the
                    // next edge.
                    log::debug!("pair {}: tap read: {e}", self.index);
                    self.tap_readable = false;
                }
            }
        }
        false
    }

    /// Copies the `len`-byte frame into receive buffers: one chain, or with MRG_RXBUF as many
    /// as it takes (their count goes in the header's `num_buffers`).
    fn deliver(
        &mut self,
        state: &mut State,
        mem: &GuestMemory,
        len: usize,
        device: &DeviceState,
    ) -> Delivery {
        let mergeable = device.mergeable_rx();
        self.segments.clear();
        self.chains.clear();
        let mut capacity = 0usize;
        let mut bad = None;
        let queue = state.get_queue();
        let (next, size) = (queue.next_avail(), queue.size());
        let Ok(seen) = queue.avail_idx(mem, Ordering::Acquire).map(|i| i.0) else {
            return Delivery::Broken;
        };
        {
            let mut chains = match state.get_queue_mut().iter(mem) {
                Ok(chains) => chains,
                Err(e) => {
                    self.guest_error(format_args!("receive queue: {e}"));
                    return Delivery::Broken;
                }
            };
            while capacity < len {
                let Some(chain) = chains.next() else { break };
                let head = chain.head_index();
                let first = self.segments.len();
                for desc in chain {
                    if !desc.is_write_only() {
                        bad = Some("a receive buffer the device may not write");
                        break;
                    }
                    self.segments.push((desc.addr(), desc.len() as usize));
                    capacity += desc.len() as usize;
                }
                self.chains.push((head, self.segments.len() - first));
                if bad.is_some() || !mergeable {
                    break;
                }
            }
        }
        if let Some(why) = bad {
            // Return the chains untouched (used length 0): the driver's problem, not the tap's.
            for &(head, _) in &self.chains {
                let _ = state.add_used(head, 0);
            }
            self.guest_error(format_args!("frame dropped: {why}"));
            return Delivery::Dropped {
                used: self.chains.len(),
            };
        }
        if capacity < len {
            if !mergeable {
                if let Some(&(head, _)) = self.chains.first() {
                    // One buffer is all a driver without MRG_RXBUF gives a frame, and this one
                    // is too small. It goes back empty (the driver counts a length error and
                    // posts it again) rather than staying at the head of the ring, where it
                    // would refuse every later frame as well.
                    let _ = state.add_used(head, 0);
                    self.guest_error(format_args!(
                        "a {len}-byte frame does not fit a {capacity}-byte receive buffer"
                    ));
                    return Delivery::Dropped { used: 1 };
                }
            }
            for _ in 0..self.chains.len() {
                state.get_queue_mut().go_to_previous_position();
            }
            if seen.wrapping_sub(next) >= size {
                // The whole ring is not enough (buffers far smaller than the MTU the guest was
                // promised): waiting would wait for ever.
                self.guest_error(format_args!(
                    "a {len}-byte frame does not fit the whole receive ring ({capacity} bytes)"
                ));
                return Delivery::Dropped { used: 0 };
            }
            return Delivery::NoBuffers { seen };
        }
        let header = device.header_len();
        if header == 12 {
            let buffers = self.chains.len() as u16;
            self.frame[10..12].copy_from_slice(&buffers.to_le_bytes());
        }
        // Copy chain by chain; each chain's used length is what landed in it.
        let mut offset = 0usize;
        let mut segment = 0usize;
        for ci in 0..self.chains.len() {
            let (head, count) = self.chains[ci];
            let mut written = 0usize;
            for &(addr, seg_len) in &self.segments[segment..segment + count] {
                if offset == len {
                    break;
                }
                let n = seg_len.min(len - offset);
                if mem
                    .write_slice(&self.frame[offset..offset + n], addr)
                    .is_err()
                {
                    bad = Some("a receive buffer outside guest memory");
                    break;
                }
                offset += n;
                written += n;
            }
            segment += count;
            if let Err(e) = state.add_used(head, written as u32) {
                self.guest_error(format_args!("cannot return a receive buffer: {e}"));
            }
        }
        if let Some(why) = bad {
            self.guest_error(format_args!("frame dropped: {why}"));
            return Delivery::Dropped {
                used: self.chains.len(),
            };
        }
        Delivery::Done
    }

    /// Sends what the transmit queue holds to the tap; re-arms notifications when it is empty.
    pub fn serve_tx(&mut self, vring: &Vring, mem: &GuestMemory) {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
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
            match state.enable_notification() {
                Ok(true) => continue,
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
        let mut done: [(u16, bool); BATCH] = [(0, false); BATCH];
        let mut count = 0;
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
                let head = chain.head_index();
                self.iovecs.clear();
                let mut bad = None;
                let mut total = 0usize;
                for desc in chain {
                    if desc.is_write_only() {
                        bad = Some("a transmit buffer the device may only write".to_string());
                        break;
                    }
                    for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                        match slice {
                            Ok(slice) if self.iovecs.len() < MAX_IOVECS => {
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
                let sent = match bad {
                    Some(why) => Err(why),
                    None if total < 14 + 10 => Err(format!("a {total}-byte frame")),
                    // SAFETY: every iovec points into guest memory mapped for its length,
                    // which `mem` keeps mapped until the call returns.
                    None => unsafe { self.tap.writev(&self.iovecs) }
                        .map(|_| ())
                        .map_err(|e| format!("tap write: {e}")),
                };
                if let Err(why) = &sent {
                    self.guest_error(format_args!("frame dropped: {why}"));
                }
                done[count] = (head, sent.is_ok());
                count += 1;
            }
        }
        self.iovecs.clear();
        for &(head, ok) in &done[..count] {
            if ok {
                self.counters.tx_frames += 1;
            } else {
                self.counters.tx_dropped += 1;
            }
            if let Err(e) = state.add_used(head, 0) {
                self.guest_error(format_args!("cannot return a transmit buffer: {e}"));
            }
        }
        Some(count)
    }

    fn notify(&mut self, state: &mut State) {
        if state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("pair {}: cannot signal the guest: {e}", self.index);
            }
        }
    }

    fn guest_error(&mut self, message: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.guest_errors.check() {
            if suppressed > 0 {
                log::warn!(
                    "pair {}: {message} ({suppressed} similar messages suppressed)",
                    self.index
                );
            } else {
                log::warn!("pair {}: {message}", self.index);
            }
        }
    }
}

/// Asks the driver for a kick once it makes buffers available past index `seen`; true if it
/// already has (the caller goes round again).
///
/// With EVENT_IDX, virtio-queue's `enable_notification` would set `avail_event` to the next
/// entry to pop, behind buffers that are there but too few for the frame: the driver, adding
/// past them, would never cross it and never kick. `avail_event` is written here instead.
fn rearm_past(state: &mut State, mem: &GuestMemory, seen: u16) -> bool {
    let queue = state.get_queue();
    if queue.event_idx_enabled() {
        let size = u64::from(queue.size());
        // After the used ring's flags and idx (2 bytes each) and its elements (8 bytes each);
        // the used ring was checked to lie in guest memory when the queue was set up.
        let at = queue
            .used_ring()
            .checked_add(4 + 8 * size)
            .map(GuestAddress);
        match at {
            Some(at) if mem.store(seen.to_le(), at, Ordering::Release).is_ok() => {}
            _ => return false,
        }
    } else if state.enable_notification().is_err() {
        return false;
    }
    fence(Ordering::SeqCst);
    state
        .get_queue()
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != seen)
}

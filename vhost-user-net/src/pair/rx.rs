//! Receive: frames from the tap to the receive queue.
//!
//! The tap descriptor is in the worker thread's epoll edge-triggered: the worker reads until
//! the tap is empty or the guest runs out of receive buffers. Frames are read straight into
//! the guest's buffers (`rx_buffers`) whenever the ring holds enough of them for the longest
//! frame the tap may hand over. When it does not, the frame is read into a buffer of the
//! worker's and copied, and if it does not fit either, kept while the worker asks the driver
//! for a kick (the receive queue's notifications are otherwise off) and carries on when
//! buffers come.

use std::sync::atomic::{fence, Ordering};

use vhost_user_backend::VringT;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;

use cloister_backends::poll::avail_event_address;

use super::{GuestMemory, PairWorker, State, Vring, BATCH};
use crate::filter::RxFilter;
use crate::state::DeviceState;

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

/// How reading one frame straight into held buffers ended.
enum Direct {
    /// Delivered in this many chains.
    Delivered(usize),
    /// Read and dropped: a runt, or a frame the receive filter refuses.
    Refused,
    /// The tap is empty.
    Empty,
    /// No buffers held: read the frame into the worker's buffer instead.
    Short,
    /// Longer than the buffers held: it is in the worker's buffer now (`pending`).
    Copied,
    /// The available ring cannot be read.
    Broken,
}

impl PairWorker {
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
            if self.pending.is_none() {
                if !self.tap_readable {
                    break;
                }
                match self.receive_direct(&mut state, mem, device, &mut unsignalled) {
                    Direct::Delivered(chains) => {
                        self.counters.rx_frames += 1;
                        unsignalled += chains;
                    }
                    Direct::Refused => self.counters.rx_dropped += 1,
                    Direct::Empty | Direct::Broken => break,
                    Direct::Short => {
                        // (Nothing is held that a frame could use; whatever is, goes back.)
                        self.held.release(&mut state);
                        if !self.read_frame(device) {
                            break;
                        }
                    }
                    // The copying path pops buffers itself, from where the held ones were.
                    Direct::Copied => self.held.release(&mut state),
                }
            }
            if let Some(len) = self.pending {
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
                        // A kick once the guest adds past what it had made available: only
                        // new buffers make the frame fit.
                        if !rearm_past(&mut state, mem, seen) {
                            break;
                        }
                    }
                    // An available ring we cannot read: nothing more until the driver resets.
                    Delivery::Broken => break,
                }
            }
            if unsignalled >= BATCH {
                self.notify(&mut state);
                unsignalled = 0;
            }
        }
        self.held.release(&mut state);
        if unsignalled > 0 {
            self.notify(&mut state);
        }
    }

    /// Reads one frame from the tap straight into held receive buffers.
    fn receive_direct(
        &mut self,
        state: &mut State,
        mem: &GuestMemory,
        device: &DeviceState,
        unsignalled: &mut usize,
    ) -> Direct {
        let mergeable = device.mergeable_rx();
        let mut returned = Vec::new();
        let topped = self
            .held
            .top_up(state, mem, device.max_rx_frame(), mergeable, &mut returned);
        *unsignalled += returned.len();
        for why in returned {
            self.guest_error(format_args!("receive buffer returned unused: {why}"));
        }
        let short = match topped {
            Ok(enough) => !enough,
            Err(e) => {
                self.guest_error(format_args!("receive queue: {e}"));
                return Direct::Broken;
            }
        };
        let (target, room) = self.held.target(mergeable);
        if room == 0 {
            return Direct::Short;
        }
        // With too few buffers for the longest frame, what does not fit them goes on into the
        // worker's buffer, and a frame that reaches it is delivered by copying.
        self.iovecs.clear();
        self.iovecs.extend_from_slice(target);
        let max = device.max_rx_frame().min(self.frame.len());
        if short && room < max {
            self.iovecs.push(libc::iovec {
                iov_base: self.frame[room..max].as_mut_ptr().cast(),
                iov_len: max - room,
            });
        }
        // SAFETY: the held iovecs point into guest memory that `mem` keeps mapped, in
        // buffers the driver gave the device to write; the last may point into `frame`.
        let read = unsafe { self.tap.readv(&self.iovecs) };
        self.iovecs.clear();
        let len = match read {
            Ok(Some(len)) => len,
            Ok(None) => {
                self.tap_readable = false;
                return Direct::Empty;
            }
            // Longer than the buffers (the tap's MTU raised past the guest's): the kernel
            // dropped it.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                self.guest_error(format_args!("a frame longer than the receive buffers"));
                return Direct::Refused;
            }
            Err(e) => {
                // A detached queue (EBADFD) or a tap gone down: nothing to read until the
                // next edge.
                log::debug!("pair {}: tap read: {e}", self.index);
                self.tap_readable = false;
                return Direct::Empty;
            }
        };
        let header = device.header_len();
        let mut dest = [0u8; 6];
        if len > room {
            self.held.read_at(0, &mut self.frame[..room]);
            dest.copy_from_slice(self.frame.get(header..header + 6).unwrap_or(&[0; 6]));
        } else {
            self.held.read_at(header, &mut dest);
        }
        if len < header + 14 || !device.filter(|f: &RxFilter| f.accepts(&dest)) {
            // The buffers were written but are not given back: the next frame overwrites them.
            return Direct::Refused;
        }
        if len > room {
            self.pending = Some(len);
            return Direct::Copied;
        }
        let chains = self.held.chains_for(len);
        if header == 12 {
            // `num_buffers`, which the tap leaves alone.
            self.held.write_at(10, &(chains as u16).to_le_bytes());
        }
        if let Err(e) = self.held.complete(state, mem, len, chains) {
            self.guest_error(format_args!("cannot return a receive buffer: {e}"));
        }
        Direct::Delivered(chains)
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
        // The used ring was checked to lie in guest memory when the queue was set up.
        match avail_event_address(queue) {
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

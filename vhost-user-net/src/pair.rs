//! One queue pair's worker: frames from the tap to the receive queue (`rx`), frames from the
//! transmit queue to the tap (`tx`), each with one notification per batch.

mod rx;
mod rx_buffers;
mod tx;
mod tx_ring;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use cloister_backends::logging::RateLimit;
use cloister_backends::poll::AdaptivePoll;
use cloister_backends::server::GuestMemory;
use cloister_tap::TapQueue;
use vhost_user_backend::{VringRwLock, VringState};
use vm_memory::{GuestAddress, GuestMemoryAtomic};

use rx_buffers::HeldBuffers;
use tx_ring::TxRing;

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;
type State = VringState<GuestMemoryAtomic<GuestMemory>>;

/// The largest frame a tap hands over: a 64 KiB GSO frame, its Ethernet header and the
/// virtio-net header.
const MAX_FRAME: usize = 65536 + 14 + 4 + 12;
/// Frames per batch before the used ring is published and the guest told.
const BATCH: usize = 64;

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
    /// Receive buffers held for frames read straight into them.
    held: HeldBuffers,
    /// Receive buffers gathered for the frame in `frame`: (address, length) and, per chain,
    /// its head and how many segments it has.
    segments: Vec<(GuestAddress, usize)>,
    chains: Vec<(u16, usize)>,
    iovecs: Vec<libc::iovec>,
    /// Transmits a batch per system call; None where io_uring is not available.
    tx_ring: Option<TxRing>,
    /// How long to poll the transmit queue once it runs empty.
    tx_poll: AdaptivePoll,
    /// The worker thread's epoll descriptor: polling stops when it has events.
    thread_events: Option<RawFd>,
    counters: Counters,
    guest_errors: RateLimit,
}

// SAFETY: `iovecs` only holds pointers between the gathering of one frame and its writev, on
// the thread that holds the worker's lock.
unsafe impl Send for PairWorker {}

impl PairWorker {
    /// Called at start-up, before the sandbox (the transmit ring is made here).
    pub fn new(index: usize, tap: Arc<TapQueue>, poll_max: Duration) -> Self {
        let tx_ring = match TxRing::new(tap.as_raw_fd(), BATCH as u32) {
            Ok(ring) => Some(ring),
            Err(e) => {
                log::info!("pair {index}: no io_uring ({e}): a writev per frame sent");
                None
            }
        };
        Self {
            tx_ring,
            tx_poll: AdaptivePoll::new(poll_max),
            thread_events: None,
            index,
            tap,
            frame: vec![0; MAX_FRAME],
            pending: None,
            tap_readable: true,
            held: HeldBuffers::default(),
            segments: Vec::new(),
            chains: Vec::new(),
            iovecs: Vec::with_capacity(64),
            counters: Counters::default(),
            guest_errors: RateLimit::new(Duration::from_secs(1)),
        }
    }

    /// The epoll descriptor of the thread that serves this pair (for this connection).
    pub fn share_thread(&mut self, thread_events: RawFd) {
        self.thread_events = Some(thread_events);
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
        self.tx_poll.cancel();
        self.thread_events = None;
    }

    /// The tap's edge: it has frames.
    pub fn tap_ready(&mut self) {
        self.tap_readable = true;
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

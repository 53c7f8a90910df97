//! Adaptive busy-polling: how long a thread spins for more work before it goes to sleep.
//!
//! Waking a sleeping thread costs tens of microseconds on a virtual machine's host (an IPI
//! through the hypervisor: 24 µs each way on the development machines, measured with an eventfd
//! ping-pong), which is more than a whole 4 KiB request takes. A worker that spins briefly after
//! it runs out of work sees the next request without that wake-up, and the guest need not kick
//! it at all (notifications stay off while it polls). Spinning is only worth it when work comes
//! back soon, so the window adapts the way KVM's halt polling does: it grows (doubling) while
//! the waits it sees are short, and halves whenever a wait is longer than the largest window,
//! down to zero, so an idle device costs no CPU. (QEMU's AioContext polling drops straight to
//! zero instead; with a frontend whose turnaround sometimes exceeds the maximum, e.g. a
//! descheduled vCPU, that throws away a window that was paying off. Single runs, buffered 4 KiB
//! reads at QD32, halving vs closing: 407k vs 330k IOPS with a 200 µs maximum, 353k vs 334k with
//! 100 µs, 234k vs 274k with 50 µs.)

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::server::GuestMemory;

/// The first window after polling was off (QEMU starts at 4 µs too).
const GROW_START: Duration = Duration::from_micros(4);

/// The polling window of one kind of wait, adapted to how long those waits turn out to be.
#[derive(Debug, Clone)]
pub struct AdaptivePoll {
    max: Duration,
    window: Duration,
    idle_since: Option<Instant>,
}

impl AdaptivePoll {
    /// Polls at most `max` per wait; `Duration::ZERO` never polls.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            window: Duration::ZERO,
            idle_since: None,
        }
    }

    /// How long to poll now.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The thread ran out of work at `now` and starts waiting (polling first, if the window is
    /// open). Returns the window.
    pub fn idle(&mut self, now: Instant) -> Duration {
        if self.idle_since.is_none() {
            self.idle_since = Some(now);
        }
        self.window
    }

    /// Work arrived at `now`, whether during the poll or after sleeping: adapt the window to
    /// how long this wait was.
    pub fn work(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        let waited = now.saturating_duration_since(since);
        if waited <= self.window {
            // Polling caught it: the sweet spot.
        } else if waited > self.max {
            // Even the largest window would have been spun in vain: poll less, and not at all
            // once the window is smaller than the smallest that ever grows.
            self.window /= 2;
            if self.window < GROW_START {
                self.window = Duration::ZERO;
            }
        } else {
            // A window this size would have caught it: poll longer next time.
            self.window = if self.window.is_zero() {
                GROW_START
            } else {
                self.window.saturating_mul(2)
            }
            .min(self.max);
        }
    }

    /// The wait ended without work (the thread stopped caring, e.g. the queue was stopped):
    /// forget it, it says nothing about how soon work comes.
    pub fn cancel(&mut self) {
        self.idle_since = None;
    }
}

/// Spins until `ready` says so or `window` has passed since `start`; true if it became ready.
/// `ready` is checked at least once.
pub fn spin_until(start: Instant, window: Duration, mut ready: impl FnMut() -> bool) -> bool {
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= window {
            return false;
        }
        // KVM's halt polling stops as soon as another task wants the CPU; the nearest a thread
        // can do is let any runnable thread (another queue's worker, the guest's vCPU) go first
        // on every turn. It returns at once when there is none. Measured with 4 queues on 2
        // CPUs: 1.6 times the IOPS of spinning without it; about the same with one queue.
        // SAFETY: no arguments, no memory touched.
        unsafe { libc::sched_yield() };
    }
}

/// Whether the thread's epoll has events waiting (another queue's kick or completions, the
/// event loop's own): a worker that shares its thread hands it back for them. Without a shared
/// thread, never.
pub fn events_waiting(thread_events: Option<RawFd>) -> bool {
    let Some(fd) = thread_events else {
        return false;
    };
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting; the descriptor is the thread's epoll, which lives
    // as long as the thread that is running this.
    unsafe { libc::poll(&mut poll, 1, 0) > 0 }
}

/// Where EVENT_IDX's `avail_event` lives: after the used ring's flags and idx (2 bytes each)
/// and its elements (8 bytes each).
pub fn avail_event_address(queue: &impl QueueT) -> Option<GuestAddress> {
    queue
        .used_ring()
        .checked_add(4 + 8 * u64::from(queue.size()))
        .map(GuestAddress)
}

/// Tells the driver not to kick while a worker polls its queue. Without EVENT_IDX the used ring's
/// NO_NOTIFY flag, set before popping, already does. With it, virtio-queue's
/// `disable_notification` leaves avail_event where it was last armed (it has no way to move it
/// back), so a worker that re-armed before sleeping on in-flight I/O would be kicked for the
/// next request even while it polls for it: the driver pays the kick and the worker a spurious
/// wake-up. avail_event one behind the next entry to pop asks for a kick only once the driver
/// has gone past an entry the worker already took, which it never does; `enable_notification`
/// re-arms it properly before the worker sleeps.
pub fn suppress_kicks(queue: &impl QueueT, mem: &GuestMemory) {
    if !queue.event_idx_enabled() || !queue.ready() {
        return;
    }
    // The used ring was checked to lie in guest memory when the queue was set up; the store is
    // checked again anyway, and a failure only means the driver keeps kicking.
    if let Some(addr) = avail_event_address(queue) {
        let behind = queue.next_avail().wrapping_sub(1);
        let _ = mem.store(behind.to_le(), addr, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(poll: &mut AdaptivePoll, start: Instant, micros: u64) {
        poll.idle(start);
        poll.work(start + Duration::from_micros(micros));
    }

    #[test]
    fn starts_closed_and_grows_while_waits_are_short() {
        let mut poll = AdaptivePoll::new(Duration::from_micros(50));
        let t = Instant::now();
        assert_eq!(poll.window(), Duration::ZERO);
        wait(&mut poll, t, 20);
        assert_eq!(poll.window(), Duration::from_micros(4));
        wait(&mut poll, t, 20);
        assert_eq!(poll.window(), Duration::from_micros(8));
        wait(&mut poll, t, 20);
        wait(&mut poll, t, 20);
        assert_eq!(poll.window(), Duration::from_micros(32));
        // Caught within the window: stays.
        wait(&mut poll, t, 20);
        assert_eq!(poll.window(), Duration::from_micros(32));
        // Longer than the window but within the maximum: grows, capped at the maximum.
        wait(&mut poll, t, 40);
        assert_eq!(poll.window(), Duration::from_micros(50));
    }

    #[test]
    fn long_waits_halve_the_window_down_to_zero() {
        let mut poll = AdaptivePoll::new(Duration::from_micros(64));
        let t = Instant::now();
        for _ in 0..10 {
            wait(&mut poll, t, 40);
        }
        assert_eq!(poll.window(), Duration::from_micros(64));
        wait(&mut poll, t, 65);
        assert_eq!(poll.window(), Duration::from_micros(32));
        // One short wait in between grows it back.
        wait(&mut poll, t, 40);
        assert_eq!(poll.window(), Duration::from_micros(64));
        for expected in [32, 16, 8, 4, 0, 0] {
            wait(&mut poll, t, 1_000_000);
            assert_eq!(poll.window(), Duration::from_micros(expected));
        }
    }

    #[test]
    fn zero_maximum_never_polls() {
        let mut poll = AdaptivePoll::new(Duration::ZERO);
        let t = Instant::now();
        for micros in [0, 1, 5, 1000] {
            wait(&mut poll, t, micros);
            assert_eq!(poll.window(), Duration::ZERO);
        }
    }

    #[test]
    fn the_wait_is_measured_from_its_first_idle() {
        let mut poll = AdaptivePoll::new(Duration::from_micros(50));
        let t = Instant::now();
        for _ in 0..10 {
            wait(&mut poll, t, 10);
        }
        assert_eq!(poll.window(), Duration::from_micros(16));
        // Idle, polled in vain, idle again later (a spurious wake-up): still one wait, of
        // 60 µs (longer than the maximum: halved), not one of 20 µs (would have grown).
        poll.idle(t);
        poll.idle(t + Duration::from_micros(40));
        poll.work(t + Duration::from_micros(60));
        assert_eq!(poll.window(), Duration::from_micros(8));
        // Cancelled waits don't count.
        poll.idle(t);
        poll.cancel();
        poll.work(t + Duration::from_secs(1));
        assert_eq!(poll.window(), Duration::from_micros(8));
        wait(&mut poll, t, 10);
        assert_eq!(poll.window(), Duration::from_micros(16));
    }

    #[test]
    fn spin_until_checks_at_least_once_and_gives_up() {
        let start = Instant::now();
        assert!(spin_until(start, Duration::ZERO, || true));
        assert!(!spin_until(start, Duration::from_micros(100), || false));
        assert!(start.elapsed() >= Duration::from_micros(100));
        let mut calls = 0;
        assert!(spin_until(Instant::now(), Duration::from_secs(5), || {
            calls += 1;
            calls == 3
        }));
    }
}

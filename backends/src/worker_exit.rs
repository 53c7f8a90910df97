//! Exit events for the vring worker threads of one connection.
//!
//! `vhost-user-backend` asks the backend for one exit event per worker thread
//! (`VhostUserBackend::exit_event`); without one, the workers never stop and the daemon hangs
//! when a connection ends. The crate registers the consumer end with its epoll via
//! `into_raw_fd()` and never closes it, which would leak one descriptor per worker per
//! connection in a daemon that serves connection after connection. This type remembers those
//! descriptors so the serve loop can close them once the connection's workers are gone.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Hands out exit events and reclaims them. One per connection; the backend keeps an `Arc`.
#[derive(Debug, Default)]
pub struct WorkerExits {
    handed_out: Mutex<Vec<RawFd>>,
}

impl WorkerExits {
    /// A fresh exit event for one worker thread (what `VhostUserBackend::exit_event` returns).
    pub fn event(&self) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                self.handed_out
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                // Without an exit event this worker cannot be stopped; the connection still
                // works, the thread lingers until the process exits.
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    /// Closes the consumer ends the crate leaked.
    ///
    /// # Safety
    /// Only once every epoll handler of the connection has been dropped (the vhost-user daemon
    /// joined its workers), so nothing uses these descriptors any more.
    pub(crate) unsafe fn reclaim(&self) {
        let fds = std::mem::take(
            &mut *self
                .handed_out
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for fd in fds {
            // SAFETY: the caller guarantees the descriptor is open and no longer used; it was
            // created by `event()` and nothing else closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

//! A deadline for a vhost-user request, or for a run of them.
//!
//! The `vhost` crate's frontend blocks in recvmsg until the reply is complete and retries on
//! EAGAIN, so a socket timeout would only make it spin: a backend that never answers would hang
//! the vCPU thread that asked. Instead, a watchdog thread shuts the socket down when a request
//! outlives its deadline; the blocked call then sees end-of-file and fails, and the device is
//! marked broken.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cloister_seccomp::ThreadRole;

#[derive(Default)]
struct State {
    deadline: Option<Instant>,
    fired: bool,
    quit: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// A duplicate of the connection's socket: shutdown(2) acts on the socket, not on a
    /// descriptor, so this one stops the frontend's.
    socket: OwnedFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// While alive, the requests it covers have a deadline.
pub struct Armed {
    shared: Arc<Shared>,
}

impl Watchdog {
    pub fn new(socket: OwnedFd, name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            socket,
        });
        let s = shared.clone();
        let thread = crate::signals::spawn_helper(
            std::thread::Builder::new().name(format!("{name}-watchdog")),
            move || {
                // Confined before it can touch the socket.
                if let Err(e) = cloister_seccomp::enter_thread(ThreadRole::VmmWatchdog) {
                    eprintln!(
                        "cloister: error: a vhost-user watchdog cannot enter its sandbox: {}",
                        crate::error_chain(&e)
                    );
                    std::process::exit(1);
                }
                watch(&s)
            },
        )?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    pub fn arm(&self, timeout: Duration) -> Armed {
        self.shared.lock().deadline = Some(Instant::now() + timeout);
        self.shared.wake.notify_one();
        Armed {
            shared: self.shared.clone(),
        }
    }

    /// Whether the watchdog has shut the socket down.
    pub fn fired(&self) -> bool {
        self.shared.lock().fired
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.shared.lock().deadline = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.quit {
            return;
        }
        st = match st.deadline {
            None => shared.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    // SAFETY: shutdown on a socket descriptor we own; no memory involved.
                    unsafe { libc::shutdown(shared.socket.as_raw_fd(), libc::SHUT_RDWR) };
                    st.fired = true;
                    st.deadline = None;
                    continue;
                }
                shared
                    .wake
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn unblocks_a_stuck_read() {
        let (mut ours, _peer) = UnixStream::pair().unwrap();
        let dog = Watchdog::new(OwnedFd::from(ours.try_clone().unwrap()), "test").unwrap();
        let start = Instant::now();
        let armed = dog.arm(Duration::from_millis(100));
        let mut b = [0u8; 1];
        // The peer never writes: only the watchdog ends this read.
        assert_eq!(ours.read(&mut b).unwrap(), 0);
        drop(armed);
        assert!(dog.fired());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn disarmed_in_time_does_nothing() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let dog = Watchdog::new(OwnedFd::from(ours.try_clone().unwrap()), "test").unwrap();
        drop(dog.arm(Duration::from_millis(50)));
        std::thread::sleep(Duration::from_millis(150));
        assert!(!dog.fired());
        drop(ours);
        drop(dog);
        let mut b = [0u8; 1];
        assert_eq!(peer.read(&mut b).unwrap(), 0);
    }
}

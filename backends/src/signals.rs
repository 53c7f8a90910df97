//! SIGTERM and SIGINT stop the daemon cleanly: the listener stops waiting, the current
//! connection is shut down, and the socket file is removed on the way out.
//!
//! The signals are blocked in every thread and received synchronously by one dedicated thread
//! (`sigtimedwait`), so no code runs in signal-handler context and no worker thread is
//! interrupted. A stop that cannot finish (a worker stuck for good) ends the process after
//! `STOP_GRACE`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vhost_user_backend::ShutdownHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::error::Error;

/// The daemon's stop request, shared by the signal thread and the serve loop.
pub struct Stop {
    requested: AtomicBool,
    /// Becomes readable once a stop is requested, so the listener's poll wakes up.
    wake: EventFd,
    /// The live connection, shut down when a stop is requested.
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Stop {
    /// A stop that only [`Stop::request`] triggers (tests, embedding).
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            connection: Mutex::new(None),
        }))
    }

    /// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread it spawns
    /// later: call it first thing in `main`. A signal that comes before [`Stop::listen`] stays
    /// pending and is handled then.
    pub fn block_signals() -> Result<Arc<Self>, Error> {
        let stop = Self::new().map_err(Error::Signals)?;
        let set = termination_signals();
        // SAFETY: `set` is a valid, initialised signal set; the old mask is not needed.
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(Error::Signals(io::Error::from_raw_os_error(ret)));
        }
        Ok(stop)
    }

    /// Starts the thread that turns the blocked signals into a stop request (a second signal
    /// while stopping exits at once, and so does a stop that takes longer than `STOP_GRACE`).
    /// Started after the sandbox, the thread is confined from its first instruction, and
    /// narrows its seccomp policy to the signal thread's.
    pub fn listen(
        self: &Arc<Self>,
        socket_to_remove: Option<std::path::PathBuf>,
    ) -> Result<(), Error> {
        let set = termination_signals();
        let thread_stop = Arc::clone(self);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                // It removes the socket file when it ends the process itself: it keeps the
                // main thread's Landlock rights (the socket's directory) for that.
                crate::sandbox::enter_worker_keeping_landlock(
                    cloister_seccomp::ThreadRole::BackendSignals,
                );
                wait_for_signals(&thread_stop, set, socket_to_remove)
            })
            .map_err(Error::Signals)?;
        Ok(())
    }

    /// Asks the daemon to stop: wakes the listener and shuts the live connection down.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the listener: {e}");
        }
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = connection.as_ref() {
            handle.shutdown();
        }
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Readable once a stop has been requested.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Records the live connection; if a stop came first, shuts it down right away.
    pub(crate) fn set_connection(&self, handle: Option<ShutdownHandle>) {
        let mut connection = self
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.requested() {
            if let Some(handle) = handle.as_ref() {
                handle.shutdown();
            }
        }
        *connection = handle;
    }
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a set we own; the signals are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// How long a stop may take before the daemon exits without finishing it. A clean stop
/// drains the requests in flight, which takes milliseconds; a worker that never returns (one
/// blocked for good writing a frontend's call descriptor, which vhost-user-backend does
/// blocking) would otherwise keep the process alive until SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

fn wait_for_signals(stop: &Stop, set: libc::sigset_t, socket: Option<std::path::PathBuf>) {
    let exit_now = |why: std::fmt::Arguments<'_>| -> ! {
        log::warn!("{why}: exiting now");
        if let Some(path) = socket.as_ref() {
            let _ = std::fs::remove_file(path);
        }
        std::process::exit(1);
    };
    loop {
        let timeout = stop.requested().then_some(STOP_GRACE);
        let signal = match next_signal(&set, timeout) {
            Ok(Some(signal)) => signal,
            Ok(None) => exit_now(format_args!(
                "the daemon did not stop within {} s of the request",
                STOP_GRACE.as_secs()
            )),
            Err(e) => {
                log::error!("sigwait failed: {e}; signals no longer stop the daemon");
                return;
            }
        };
        let name = if signal == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        };
        if stop.requested() {
            exit_now(format_args!("{name} again while stopping"));
        }
        log::info!("{name} received: stopping");
        stop.request();
    }
}

/// The next of the blocked signals in `set`; None if `timeout` passed first.
fn next_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> io::Result<Option<i32>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let left = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(left.subsec_nanos()),
            }
        });
        let wait = left.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: `set` is initialised; a null siginfo is allowed; `wait` is null or points to
        // `left`, which outlives the call.
        let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), wait) };
        if signal >= 0 {
            return Ok(Some(signal));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(None),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

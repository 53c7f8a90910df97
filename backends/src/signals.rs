//! SIGTERM and SIGINT stop the daemon cleanly: the listener stops waiting, the current
//! connection is shut down, and the socket file is removed on the way out.
//!
//! The signals are blocked in every thread and received synchronously by one dedicated thread
//! (`sigwait`), so no code runs in signal-handler context and no worker thread is interrupted.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    /// while stopping exits at once). Started after the sandbox, the thread is confined from
    /// its first instruction, and narrows its policy to the signal thread's.
    pub fn listen(
        self: &Arc<Self>,
        socket_to_remove: Option<std::path::PathBuf>,
    ) -> Result<(), Error> {
        let set = termination_signals();
        let thread_stop = Arc::clone(self);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                crate::sandbox::enter_worker(cloister_seccomp::ThreadRole::BackendSignals);
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

fn wait_for_signals(stop: &Stop, set: libc::sigset_t, socket: Option<std::path::PathBuf>) {
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is initialised and `signal` is a valid out-pointer.
        let ret = unsafe { libc::sigwait(&set, &mut signal) };
        if ret != 0 {
            log::error!(
                "sigwait failed: {}; signals no longer stop the daemon",
                io::Error::from_raw_os_error(ret)
            );
            return;
        }
        let name = if signal == libc::SIGTERM {
            "SIGTERM"
        } else {
            "SIGINT"
        };
        if stop.requested() {
            log::warn!("{name} again while stopping: exiting now");
            if let Some(path) = socket.as_ref() {
                let _ = std::fs::remove_file(path);
            }
            std::process::exit(1);
        }
        log::info!("{name} received: stopping");
        stop.request();
    }
}

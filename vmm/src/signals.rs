//! Signal masks for the helper threads of `cloister`, and the main thread's signalfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Spawns a helper thread that never takes SIGINT, SIGTERM or SIGHUP (they are the main
/// thread's, through its signalfd). The signals are blocked in the calling thread around the
/// spawn, so the new thread starts with them blocked: blocking them in the new thread itself
/// would leave a window, before it first runs, in which one could land there and end the
/// process (a loaded machine saw it).
pub fn spawn_helper<F, T>(
    builder: std::thread::Builder,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // SAFETY: sigset manipulation on zeroed locals; pthread_sigmask with valid pointers.
    let old = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    let spawned = builder.spawn(f);
    // SAFETY: restores the caller's own mask, saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
}

/// Termination signals, blocked for the whole process and read from a signalfd.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// SIGINT, SIGTERM and SIGHUP: what stops cloister.
    pub fn termination() -> io::Result<Self> {
        Self::new(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn new(signals: &[libc::c_int]) -> io::Result<Self> {
        // SAFETY: sigset manipulation on a zeroed local, then pthread_sigmask/signalfd with
        // valid pointers; results checked.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in signals {
                libc::sigaddset(&mut set, *s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SignalFd {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    pub fn read(&self) -> Option<i32> {
        // SAFETY: reading one signalfd_siginfo into a zeroed buffer of exactly its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

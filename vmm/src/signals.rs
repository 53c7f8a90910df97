//! Signal masks for the helper threads of `cloister`.

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

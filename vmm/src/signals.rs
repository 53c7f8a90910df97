//! Signal masks for the helper threads of `cloister`.

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread; they are the main thread's.
pub fn block_termination_signals() {
    // SAFETY: sigset manipulation on a zeroed local; pthread_sigmask with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

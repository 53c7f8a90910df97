//! The sandbox step, taken after the device has opened everything it needs and before it
//! serves a frontend.
//!
//! For now it only sets `PR_SET_NO_NEW_PRIVS` (which seccomp needs anyway, and which keeps a
//! compromised backend from gaining privileges through exec). The seccomp filter and Landlock
//! rules (crate `cloister-seccomp`) plug in here, so every backend gets them from one place.

use crate::error::Error;
use crate::options::SeccompMode;

/// How the process will be confined.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox {
    seccomp: SeccompMode,
}

impl Sandbox {
    pub fn new(seccomp: SeccompMode) -> Self {
        Self { seccomp }
    }

    /// The seccomp mode the user asked for (stored for the filter that comes later).
    pub fn seccomp(&self) -> SeccompMode {
        self.seccomp
    }

    /// Confines the calling process. Call after set-up, before serving: every later thread
    /// inherits the restrictions.
    pub fn enter(&self) -> Result<(), Error> {
        // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if ret != 0 {
            return Err(Error::NoNewPrivs(std::io::Error::last_os_error()));
        }
        log::info!(
            "sandbox: no-new-privs set; seccomp mode {:?} recorded, filter not installed yet",
            self.seccomp
        );
        Ok(())
    }
}

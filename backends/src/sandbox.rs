//! The sandbox step, taken after the device has opened everything it needs (image, io_uring
//! rings, the bound socket) and before it serves a frontend, while the process still has a
//! single thread: every thread it creates later inherits the confinement, and narrows it.
//!
//! What a backend writes is a few lines:
//!
//! ```no_run
//! # use cloister_backends::{Sandbox, SeccompMode};
//! # use cloister_seccomp::{landlock::Rules, ThreadRole};
//! # fn f(image: &std::path::Path, socket_dir: &std::path::Path) -> Result<(), cloister_backends::Error> {
//! let rules = Rules::new().read_write_file(image).remove_entries(socket_dir);
//! Sandbox::new("vhost-user-blk", SeccompMode::True, rules).enter(ThreadRole::BlkMain)?;
//! // ... and in each worker thread, before it touches a request:
//! cloister_backends::sandbox::enter_worker(ThreadRole::BlkWorker);
//! # Ok(()) }
//! ```
//!
//! The policies themselves, and the Landlock and privilege machinery, are in
//! `cloister-seccomp`.

use std::cell::Cell;

use cloister_seccomp::landlock::{self, Rules};
use cloister_seccomp::ThreadRole;

use crate::error::Error;
use crate::options::SeccompMode;

/// How the process will be confined.
#[derive(Debug, Clone)]
pub struct Sandbox {
    name: &'static str,
    seccomp: SeccompMode,
    rules: Rules,
}

impl Sandbox {
    /// `rules`: what the main thread may still reach on the file system (its threads get
    /// nothing more).
    pub fn new(name: &'static str, seccomp: SeccompMode, rules: Rules) -> Self {
        Self {
            name,
            seccomp,
            rules,
        }
    }

    /// The seccomp mode the user asked for.
    pub fn seccomp(&self) -> SeccompMode {
        self.seccomp
    }

    /// Confines the calling thread (call it from `main`, before any other thread exists) with
    /// `role`'s seccomp policy, the Landlock rules and no privileges.
    pub fn enter(&self, role: ThreadRole) -> Result<(), Error> {
        cloister_seccomp::init(self.name, self.seccomp)?;
        let entered = cloister_seccomp::enter(role, &self.rules)?;
        if let Some(warning) = entered.landlock.warning() {
            log::warn!("{warning}");
        }
        log::info!(
            "sandbox: {} system calls allowed ({} policy, --seccomp={}); {}: {}; no capabilities",
            entered.syscalls,
            role.name(),
            self.seccomp.as_arg(),
            entered.landlock.describe(),
            landlock::describe(&self.rules),
        );
        Ok(())
    }
}

thread_local! {
    static WORKER_ENTERED: Cell<bool> = const { Cell::new(false) };
}

/// Narrows the calling worker thread to `role` the first time it is called in that thread
/// (cheap afterwards): call it at the top of the worker's event handler, so the thread is
/// confined before it handles its first guest request. A worker that cannot narrow its
/// sandbox stops the daemon: it would otherwise serve the guest with its creator's wider
/// policy.
pub fn enter_worker(role: ThreadRole) {
    narrow_worker(role, cloister_seccomp::enter_thread);
}

/// [`enter_worker`] for a thread that keeps the main thread's Landlock domain (the signal
/// thread, which removes the socket file when it has to end the process itself).
pub fn enter_worker_keeping_landlock(role: ThreadRole) {
    narrow_worker(role, cloister_seccomp::enter_thread_keeping_landlock);
}

fn narrow_worker(
    role: ThreadRole,
    enter: fn(ThreadRole) -> Result<Option<cloister_seccomp::Entered>, cloister_seccomp::Error>,
) {
    if WORKER_ENTERED.with(Cell::get) {
        return;
    }
    WORKER_ENTERED.with(|e| e.set(true));
    if let Err(e) = enter(role) {
        log::error!(
            "cannot confine a {} thread: {}",
            role.name(),
            crate::error::chain(&e)
        );
        std::process::exit(1);
    }
}

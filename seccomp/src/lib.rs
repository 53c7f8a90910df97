//! The sandbox of every Cloister process: a seccomp filter per thread role, Landlock rules, and
//! no privileges.
//!
//! A process calls [`init`] once, early, with its name and the `--seccomp` mode. After its
//! set-up (everything opened, the io_uring rings created, the sockets bound or connected), each
//! thread calls [`enter`] with its [`ThreadRole`] and the file system paths it may still use,
//! before it handles any guest or backend input. In that thread, in this order:
//! 1. `PR_SET_NO_NEW_PRIVS`;
//! 2. every capability dropped: bounding set (where permitted), securebits locked, ambient,
//!    effective, permitted and inheritable sets emptied ([`privileges`]);
//! 3. a Landlock domain: file system access to exactly the given paths, no TCP or UDP, and
//!    (unless the caller needs them) no signals to, nor abstract unix sockets of, processes
//!    outside the domain ([`landlock`]);
//! 4. the role's seccomp filter ([`policy`]), unless the mode is `false`.
//!
//! All four are per thread. Threads created later inherit them and may narrow them further:
//! a backend's main thread allows what its worker threads need, and each worker stacks its own,
//! narrower filter when it starts. Threads created before (a VMM's vCPU threads) install their
//! own before they run the guest.
//!
//! A forbidden system call is reported by name ([`trap`]): with `--seccomp=true` the process
//! then dies of SIGSYS; with `--seccomp=log` the call is made anyway and reported once per
//! thread role and system call.

pub mod landlock;
pub mod line;
pub mod panic_report;
pub mod policy;
pub mod privileges;
mod rules;
pub mod syscall_names;
pub mod test_hooks;
mod trap;

use std::io;
use std::sync::OnceLock;

pub use policy::ThreadRole;

/// How the sandbox treats a system call outside a thread's policy (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum SeccompMode {
    /// Report the call by name, then kill the process (SIGSYS).
    True,
    /// Report the call by name, once per thread role, and let it run (for finding a missing
    /// rule; this mode does not confine).
    Log,
    /// Install no seccomp filter (Landlock and the privilege drop still apply).
    False,
}

impl SeccompMode {
    /// The value as written on the command line.
    pub fn as_arg(self) -> &'static str {
        match self {
            SeccompMode::True => "true",
            SeccompMode::Log => "log",
            SeccompMode::False => "false",
        }
    }
}

/// What the sandbox can fail at. One short line each; the caller prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the sandbox was entered before it was initialised")]
    NotInitialised,
    #[error("cannot set PR_SET_NO_NEW_PRIVS")]
    NoNewPrivs(#[source] io::Error),
    #[error("cannot drop capabilities")]
    Capabilities(#[source] io::Error),
    #[error("cannot install the SIGSYS handler")]
    SigsysHandler(#[source] io::Error),
    #[error("cannot build the seccomp filter of the {role} thread")]
    Build {
        role: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of the {role} thread")]
    Install {
        role: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error(transparent)]
    Landlock(#[from] landlock::LandlockError),
}

struct Process {
    name: &'static str,
    mode: SeccompMode,
}

static PROCESS: OnceLock<Process> = OnceLock::new();

/// Once per process, before any thread enters the sandbox: records the process name (for
/// messages) and the mode, and installs the SIGSYS handler that names forbidden system calls.
/// With [`SeccompMode::False`] a warning says that system calls are not filtered. Later calls
/// keep the first configuration.
pub fn init(name: &'static str, mode: SeccompMode) -> Result<(), Error> {
    let mut first = false;
    let process = PROCESS.get_or_init(|| {
        first = true;
        Process { name, mode }
    });
    if !first {
        return Ok(());
    }
    panic_report::install(process.name);
    trap::configure(process.name, process.mode);
    if process.mode == SeccompMode::False {
        eprintln!("{}", disabled_warning(process.name));
    } else {
        trap::install_handler().map_err(Error::SigsysHandler)?;
    }
    test_hooks::load();
    Ok(())
}

/// The mode given to [`init`], if it was called.
pub fn mode() -> Option<SeccompMode> {
    PROCESS.get().map(|p| p.mode)
}

/// What [`enter`] put in place, for the caller's log.
#[derive(Debug, Clone, Copy)]
pub struct Entered {
    pub role: ThreadRole,
    /// System calls the role's filter allows (0 without a filter).
    pub syscalls: usize,
    pub landlock: landlock::Outcome,
}

/// Confines the calling thread for `role`, with file system access to what `fs` allows (see
/// the module documentation for the steps). Fails if [`init`] was not called.
pub fn enter(role: ThreadRole, fs: &landlock::Rules) -> Result<Entered, Error> {
    confine(role, Some(fs))
}

/// [`enter`] for a thread that keeps its creator's Landlock domain: one that must still
/// remove a file there, since it cannot open the directory for a narrower rule once the
/// creator is confined. Its seccomp policy is what keeps it from opening anything. Does
/// nothing if the process never called [`init`].
pub fn enter_thread_keeping_landlock(role: ThreadRole) -> Result<Option<Entered>, Error> {
    if PROCESS.get().is_none() {
        return Ok(None);
    }
    confine(role, None).map(Some)
}

/// No new privileges, no capabilities, the Landlock rules `fs` (None: the inherited domain
/// stays as it is), then `role`'s seccomp filter.
fn confine(role: ThreadRole, fs: Option<&landlock::Rules>) -> Result<Entered, Error> {
    let process = PROCESS.get().ok_or(Error::NotInitialised)?;
    privileges::set_no_new_privs().map_err(Error::NoNewPrivs)?;
    privileges::drop_all().map_err(Error::Capabilities)?;
    let landlock = match fs {
        Some(fs) => fs.restrict_self()?,
        None => landlock::Outcome::Inherited,
    };
    let syscalls = match process.mode {
        SeccompMode::False => 0,
        mode => policy::install(role, mode)?,
    };
    trap::set_thread_role(role.name());
    test_hooks::after_enter(role);
    Ok(Entered {
        role,
        syscalls,
        landlock,
    })
}

/// [`enter`] for a thread that needs no file system access at all; does nothing if the process
/// never called [`init`] (a library used outside a Cloister binary, unit tests).
pub fn enter_thread(role: ThreadRole) -> Result<Option<Entered>, Error> {
    if PROCESS.get().is_none() {
        return Ok(None);
    }
    enter(role, &landlock::Rules::new()).map(Some)
}

/// The one-line warning [`init`] prints when a process runs without a seccomp filter.
fn disabled_warning(process: &str) -> String {
    format!(
        "{process}: warning: --seccomp=false: system calls are not filtered; a compromised \
         {process} can use any of them"
    )
}

//! The options every backend daemon accepts; a device flattens [`CommonOptions`] into its own
//! clap `Args`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
pub use cloister_seccomp::SeccompMode;

/// Options shared by all Cloister vhost-user backends.
#[derive(Debug, Clone, Args)]
pub struct CommonOptions {
    /// Unix socket to listen on for the VMM (the vhost-user frontend). A stale socket file left
    /// by a previous run is replaced; the file is removed on exit.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Seccomp policy for the sandbox: `true` names a system call outside the policy and
    /// kills the process (SIGSYS), `log` names it and lets it run, `false` installs no filter
    /// (with a warning). Landlock and the privilege drop apply in every mode.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::True)]
    pub seccomp: SeccompMode,

    /// Messages at this level and above go to stderr.
    #[arg(long, value_enum, value_name = "LEVEL", default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

/// Verbosity of the stderr log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

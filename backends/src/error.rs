//! Errors of the shared daemon machinery, and how a daemon's own errors are classified.

use std::io;
use std::path::PathBuf;

/// What the shared machinery can fail at. Messages are one short line each; the caller prints
/// the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{0} is in use by a running backend")]
    SocketInUse(PathBuf),
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for a frontend failed")]
    Poll(#[source] io::Error),
    #[error("cannot set up the vhost-user daemon")]
    Daemon(#[source] VhostUserDaemonError),
    #[error("cannot accept a frontend")]
    Accept(#[source] VhostUserDaemonError),
    #[error("cannot prepare the device for a connection")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot relay the frontend's connection")]
    Relay(#[source] io::Error),
    #[error("cannot install the stop signal handler")]
    Signals(#[source] io::Error),
    #[error("cannot enter the sandbox")]
    Sandbox(#[from] cloister_seccomp::Error),
}

/// `vhost_user_backend::Error` implements `Display` but not `std::error::Error`; this wrapper
/// lets it sit in an error chain.
#[derive(Debug)]
pub struct VhostUserDaemonError(pub vhost_user_backend::Error);

impl std::fmt::Display for VhostUserDaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for VhostUserDaemonError {}

/// A daemon's top-level error: [`crate::cli::main`] exits with status 2 for usage errors and 1
/// for everything else.
pub trait DaemonError: std::error::Error {
    /// True if the user asked for something invalid (a bad option value, a missing argument).
    fn is_usage(&self) -> bool {
        false
    }
}

impl DaemonError for Error {}

/// The message of `error` followed by each of its sources, separated by ": ".
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        // Some errors repeat their source's text in their own message; don't print it twice.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_sources() {
        let error = Error::Listen {
            path: PathBuf::from("/x.sock"),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let text = chain(&error);
        assert!(text.starts_with("cannot listen on /x.sock: "), "{text}");
        assert!(text.contains("Permission denied"), "{text}");
    }
}

//! Errors of the vhost-user-net daemon (start-up and set-up; a bad frame from the guest is
//! dropped and counted, never an error here).

use cloister_backends::DaemonError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Tap(#[from] cloister_tap::Error),
    #[error("--tap-fd {0}: not an open descriptor")]
    NotOpen(i32),
    #[error("--tap-fd: the descriptors are queues of different taps ({0} and {1})")]
    MixedTaps(String, String),
    #[error(transparent)]
    Daemon(#[from] cloister_backends::Error),
}

impl DaemonError for Error {
    fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }
}

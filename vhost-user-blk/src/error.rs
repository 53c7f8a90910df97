//! Errors of the vhost-user-blk daemon (start-up and set-up; per-request failures are status
//! bytes for the guest, never errors here).

use std::io;
use std::path::PathBuf;

use cloister_backends::DaemonError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("cannot open image {path}")]
    OpenImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is in use by another process (it is locked)")]
    ImageLocked { path: PathBuf },
    #[error("cannot lock image {path}")]
    LockImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the size of image {path}")]
    ImageSize {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is smaller than one 512-byte sector")]
    ImageTooSmall { path: PathBuf },
    #[error("cannot set up io_uring for queue {queue}")]
    IoUring {
        queue: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the worker of queue {queue}")]
    Worker {
        queue: usize,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Daemon(#[from] cloister_backends::Error),
}

impl DaemonError for Error {
    fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_))
    }
}

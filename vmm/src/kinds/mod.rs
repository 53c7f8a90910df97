//! Device kinds. Each file is one kind on one screen: its option keys and their parsing, its
//! virtio side (a [`DeviceKind`]: type, features, config space) and, for devices cloister
//! starts itself, the backend's spawn profile. Everything else (ids, placement, connection,
//! supervision) is the device manager's and the same for every kind.

pub mod blk;
pub mod fs;
pub mod generic;
pub mod net;
pub mod rng;
pub mod vsock;

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::device::{OptionError, TransportKind};
use crate::vhost_user::DeviceKind;

/// The programs cloister may start as managed backends; the spawner starts nothing else.
pub const BACKEND_PROGRAMS: &[&str] = &[
    "vhost-user-blk",
    "vhost-user-net",
    "virtiofsd",
    "vhost-device-rng",
    "vhost-device-vsock",
];

/// One device as the user asked for it, validated.
#[derive(Clone)]
pub struct DeviceSpec {
    /// The option (`--disk`) and its value as written, for messages.
    pub option: &'static str,
    pub value: String,
    /// The user's `id=`; the device manager gives one otherwise.
    pub id: Option<String>,
    pub kind: Arc<dyn DeviceKind>,
    pub backend: Backend,
    /// The guest-visible queues and the largest ring each may have.
    pub queue_sizes: Vec<u16>,
    pub transport: TransportKind,
}

impl fmt::Debug for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.option, self.value)
    }
}

/// Who runs the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Someone else; it listens on this socket.
    Socket(PathBuf),
    /// Someone else; cloister listens on this socket and the backend connects (its client
    /// mode: `vhost_mode=server`).
    Listen(PathBuf),
    /// cloister starts it, supervises it and stops it with the VM.
    Managed(SpawnProfile),
}

/// How to start a managed backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpawnProfile {
    /// Found next to `cloister` first, then on `PATH`.
    pub program: String,
    pub args: Vec<Arg>,
    /// What the backend appends to the socket path it is given (vhost-device-rng listens on
    /// `PATH0`); usually nothing.
    pub socket_suffix: String,
    /// What the user named on the host, checked before anything starts.
    pub paths: Vec<HostPath>,
    /// A tap the spawner opens (creating it if need be) and hands over as `--tap-fd`s.
    pub tap: Option<TapRequest>,
}

/// A tap for a managed network backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapRequest {
    /// Empty: the kernel picks a free name.
    pub name: String,
    /// One tap queue per queue pair.
    pub queues: u16,
    /// The host side's address, MAC and MTU; brought up in any case.
    pub interface: cloister_tap::InterfaceConfig,
}

/// One argument of a managed backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    Plain(String),
    /// The socket path cloister chooses, between two strings (`--socket=` and ``, or
    /// `guest-cid=3,socket=` and `,uds-path=...`).
    Socket {
        before: String,
        after: String,
    },
}

impl Arg {
    pub fn plain(s: impl Into<String>) -> Self {
        Arg::Plain(s.into())
    }

    pub fn socket(before: impl Into<String>) -> Self {
        Arg::Socket {
            before: before.into(),
            after: String::new(),
        }
    }
}

/// A path the user gave, and how the backend will use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPath {
    /// The option key that named it.
    pub key: &'static str,
    pub path: PathBuf,
    pub access: Access,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A regular file or block device, read-only or read-write.
    Image { writable: bool },
    /// A directory.
    Directory,
    /// Anything readable (a character device such as /dev/urandom, too).
    Readable,
    /// A unix socket the backend will create: its directory must exist.
    NewSocket,
}

impl HostPath {
    /// Opens it the way the backend will, so a mistake is an option error before any
    /// process starts.
    pub fn check(&self) -> Result<(), OptionError> {
        let open_error = |source| OptionError::Open {
            key: self.key,
            path: self.path.clone(),
            source,
        };
        match self.access {
            Access::Image { writable } => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(&self.path)
                    .map_err(open_error)?;
                let kind = file.metadata().map_err(open_error)?.file_type();
                if !kind.is_file() && !kind.is_block_device() {
                    return Err(OptionError::Invalid(format!(
                        "{}: {} is not a regular file or block device",
                        self.key,
                        self.path.display()
                    )));
                }
            }
            Access::Readable => {
                std::fs::File::open(&self.path).map_err(open_error)?;
            }
            Access::NewSocket => {
                let dir = self
                    .path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !dir.is_dir() {
                    return Err(OptionError::Invalid(format!(
                        "{}: directory {} does not exist",
                        self.key,
                        dir.display()
                    )));
                }
            }
            Access::Directory => {
                let meta = std::fs::metadata(&self.path).map_err(open_error)?;
                if !meta.is_dir() {
                    return Err(OptionError::Invalid(format!(
                        "{}: {} is not a directory",
                        self.key,
                        self.path.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Who runs a device's backend, as its options say.
pub enum Source {
    /// cloister starts it, for this path (an image, a directory, an entropy source).
    Managed(PathBuf),
    /// Someone else did; it listens here.
    Socket(PathBuf),
}

/// The one of `key=` and `socket=` that was given (both is an error); `neither` says what
/// having none of them means: an error, or the kind's default path.
pub fn source(
    key: &'static str,
    path: Option<PathBuf>,
    socket: Option<PathBuf>,
    neither: impl FnOnce() -> Result<PathBuf, OptionError>,
) -> Result<Source, OptionError> {
    match (path, socket) {
        (Some(_), Some(_)) => Err(OptionError::Invalid(format!(
            "{key}= and socket= cannot be combined"
        ))),
        (Some(path), None) => Ok(Source::Managed(path)),
        (None, Some(socket)) => Ok(Source::Socket(socket)),
        (None, None) => neither().map(Source::Managed),
    }
}

/// `key=` given where the backend is someone else's: refused by name.
pub fn managed_only(key: &'static str) -> OptionError {
    OptionError::Invalid(format!(
        "{key}= only applies when cloister starts the backend (the backend behind socket= has its own)"
    ))
}

/// A path for [`Arg::Plain`]; non-UTF-8 paths are refused when parsed.
pub fn path_arg(prefix: &str, path: &Path) -> Arg {
    Arg::Plain(format!("{prefix}{}", path.display()))
}

//! `--disk`, in Cloud Hypervisor's syntax. Two kinds of disk, both served by a vhost-user-blk
//! backend process:
//!
//! - managed: `path=FILE[,readonly=on|off][,direct=on|off][,serial=S]` — cloister starts
//!   `vhost-user-blk` for the image and stops it with the VM;
//! - operator-launched: `socket=PATH` — someone else runs the backend; cloister connects.
//!
//! Both take `num_queues=N`, `queue_size=N` and `transport=pci|mmio`.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::kv::{self, KvError};

/// vhost-user-blk serves at most 64 queues (one worker thread each, a 64-bit mask).
pub const MAX_QUEUES: u16 = 64;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// vhost-user-blk's limit (IOV_MAX segments per request).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// virtio-blk's device ID string is 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;

const KEYS: &[&str] = &[
    "path",
    "socket",
    "readonly",
    "direct",
    "serial",
    "num_queues",
    "queue_size",
    "transport",
];
const EXPECTED: &str = "path=FILE or socket=PATH";

#[derive(Debug, Error)]
pub enum DiskError {
    #[error(transparent)]
    Syntax(#[from] KvError),
    #[error("needs path=FILE (cloister starts the backend) or socket=PATH (you did)")]
    NoSource,
    #[error("path= and socket= cannot be combined")]
    BothSources,
    #[error("{0}: empty value")]
    Empty(&'static str),
    #[error("{key}: '{value}' is not a number")]
    NotANumber { key: &'static str, value: String },
    #[error("num_queues: {0} is out of range (1 to {MAX_QUEUES})")]
    Queues(u64),
    #[error("queue_size: {0} is not a power of two from 2 to {MAX_QUEUE_SIZE}")]
    QueueSize(u64),
    #[error("{key}: '{value}' is not on or off")]
    Switch { key: &'static str, value: String },
    #[error("transport: '{0}' is not pci or mmio")]
    Transport(String),
    #[error("serial: {0} bytes is longer than {MAX_SERIAL_LEN}")]
    SerialTooLong(usize),
    #[error("{0}= only applies to path= disks (the backend behind socket= has its own)")]
    ManagedOnly(&'static str),
    #[error("path: cannot open {}", .0.display())]
    Image(PathBuf, #[source] io::Error),
    #[error("path: {} is not a regular file or block device", .0.display())]
    NotAnImage(PathBuf),
}

/// Who runs the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// cloister starts `vhost-user-blk` for this image.
    Managed {
        path: PathBuf,
        readonly: bool,
        direct: bool,
        serial: Option<String>,
    },
    /// A backend someone else started listens here.
    Socket(PathBuf),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportKind {
    #[default]
    Pci,
    Mmio,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The option as the user wrote it, for messages.
    pub spec: String,
    pub source: DiskSource,
    pub num_queues: u16,
    pub queue_size: u16,
    pub transport: TransportKind,
}

fn number(key: &'static str, value: &str) -> Result<u64, DiskError> {
    value.parse().map_err(|_| DiskError::NotANumber {
        key,
        value: value.to_string(),
    })
}

fn switch(key: &'static str, value: &str) -> Result<bool, DiskError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(DiskError::Switch {
            key,
            value: value.to_string(),
        }),
    }
}

fn non_empty(key: &'static str, value: &str) -> Result<PathBuf, DiskError> {
    if value.is_empty() {
        return Err(DiskError::Empty(key));
    }
    Ok(PathBuf::from(value))
}

impl DiskConfig {
    pub fn parse(s: &str) -> Result<Self, DiskError> {
        let mut path = None;
        let mut socket = None;
        let mut readonly = None;
        let mut direct = None;
        let mut serial = None;
        let mut num_queues = 1;
        let mut queue_size = DEFAULT_QUEUE_SIZE;
        let mut transport = TransportKind::Pci;
        for (key, value) in kv::parse(s, KEYS, EXPECTED)? {
            match key {
                "path" => path = Some(non_empty("path", value)?),
                "socket" => socket = Some(non_empty("socket", value)?),
                "readonly" => readonly = Some(switch("readonly", value)?),
                "direct" => direct = Some(switch("direct", value)?),
                "serial" => {
                    if value.len() > MAX_SERIAL_LEN {
                        return Err(DiskError::SerialTooLong(value.len()));
                    }
                    serial = Some(value.to_string());
                }
                "num_queues" => {
                    let n = number("num_queues", value)?;
                    if !(1..=u64::from(MAX_QUEUES)).contains(&n) {
                        return Err(DiskError::Queues(n));
                    }
                    num_queues = n as u16;
                }
                "queue_size" => {
                    let n = number("queue_size", value)?;
                    if !(2..=u64::from(MAX_QUEUE_SIZE)).contains(&n) || !n.is_power_of_two() {
                        return Err(DiskError::QueueSize(n));
                    }
                    queue_size = n as u16;
                }
                _ => {
                    transport = match value {
                        "pci" => TransportKind::Pci,
                        "mmio" => TransportKind::Mmio,
                        other => return Err(DiskError::Transport(other.to_string())),
                    }
                }
            }
        }
        let source = match (path, socket) {
            (Some(_), Some(_)) => return Err(DiskError::BothSources),
            (None, None) => return Err(DiskError::NoSource),
            (Some(path), None) => DiskSource::Managed {
                path,
                readonly: readonly.unwrap_or(false),
                direct: direct.unwrap_or(false),
                serial,
            },
            (None, Some(socket)) => {
                for (key, given) in [
                    ("readonly", readonly.is_some()),
                    ("direct", direct.is_some()),
                    ("serial", serial.is_some()),
                ] {
                    if given {
                        return Err(DiskError::ManagedOnly(key));
                    }
                }
                DiskSource::Socket(socket)
            }
        };
        Ok(DiskConfig {
            spec: s.to_string(),
            source,
            num_queues,
            queue_size,
            transport,
        })
    }

    /// For a managed disk, checks that the image can be opened the way the backend will open
    /// it, so a mistake is a `--disk` error before any process is started.
    pub fn check_image(&self) -> Result<(), DiskError> {
        let DiskSource::Managed { path, readonly, .. } = &self.source else {
            return Ok(());
        };
        check_image(path, *readonly)
    }
}

fn check_image(path: &Path, readonly: bool) -> Result<(), DiskError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(|e| DiskError::Image(path.to_path_buf(), e))?;
    let kind = file
        .metadata()
        .map_err(|e| DiskError::Image(path.to_path_buf(), e))?
        .file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(DiskError::NotAnImage(path.to_path_buf()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn managed(path: &str) -> DiskSource {
        DiskSource::Managed {
            path: path.into(),
            readonly: false,
            direct: false,
            serial: None,
        }
    }

    #[test]
    fn managed_defaults() {
        assert_eq!(
            DiskConfig::parse("path=/img").unwrap(),
            DiskConfig {
                spec: "path=/img".into(),
                source: managed("/img"),
                num_queues: 1,
                queue_size: 256,
                transport: TransportKind::Pci,
            }
        );
    }

    #[test]
    fn every_key() {
        let d = DiskConfig::parse(
            "path=/a.raw,readonly=on,direct=on,serial=abc,num_queues=4,queue_size=128,transport=mmio",
        )
        .unwrap();
        assert_eq!(
            d.source,
            DiskSource::Managed {
                path: "/a.raw".into(),
                readonly: true,
                direct: true,
                serial: Some("abc".into()),
            }
        );
        assert_eq!((d.num_queues, d.queue_size), (4, 128));
        assert_eq!(d.transport, TransportKind::Mmio);
        let s = DiskConfig::parse("socket=/run/x.sock,num_queues=2").unwrap();
        assert_eq!(s.source, DiskSource::Socket("/run/x.sock".into()));
        assert_eq!(s.num_queues, 2);
    }

    fn err(s: &str) -> String {
        let e = DiskConfig::parse(s).unwrap_err();
        let mut msg = e.to_string();
        if let Some(src) = std::error::Error::source(&e) {
            msg = format!("{msg}: {src}");
        }
        msg
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("path=/a,size=1").contains("unknown key 'size'"));
        assert_eq!(
            err("num_queues=2"),
            "needs path=FILE (cloister starts the backend) or socket=PATH (you did)"
        );
        assert_eq!(
            err("path=/a,socket=/b"),
            "path= and socket= cannot be combined"
        );
        assert_eq!(
            err("path=/a,num_queues=x"),
            "num_queues: 'x' is not a number"
        );
        assert_eq!(
            err("path=/a,num_queues=0"),
            "num_queues: 0 is out of range (1 to 64)"
        );
        assert_eq!(
            err("path=/a,num_queues=65"),
            "num_queues: 65 is out of range (1 to 64)"
        );
        assert_eq!(
            err("path=/a,num_queues=-1"),
            "num_queues: '-1' is not a number"
        );
        assert!(err("path=/a,queue_size=100").starts_with("queue_size: 100 is not a power of two"));
        assert!(err("path=/a,queue_size=2048").starts_with("queue_size: 2048"));
        assert_eq!(
            err("path=/a,readonly=yes"),
            "readonly: 'yes' is not on or off"
        );
        assert_eq!(
            err("path=/a,transport=usb"),
            "transport: 'usb' is not pci or mmio"
        );
        assert_eq!(err("path="), "path: empty value");
        assert!(err("path=/a,serial=123456789012345678901").starts_with("serial: 21 bytes"));
        assert_eq!(
            err("socket=/s,readonly=on"),
            "readonly= only applies to path= disks (the backend behind socket= has its own)"
        );
        assert!(err("path=/a,path=/b").contains("given twice"));
        assert!(err("").contains("empty value"));
        assert!(err("/img").contains("not key=value"));
    }

    #[test]
    fn image_checks() {
        let d = DiskConfig::parse("path=/nonexistent/disk.img").unwrap();
        let e = d.check_image().unwrap_err();
        assert!(matches!(e, DiskError::Image(..)), "{e}");
        let d = DiskConfig::parse("path=/tmp,readonly=on").unwrap();
        assert!(matches!(d.check_image(), Err(DiskError::NotAnImage(_))));
        let d = DiskConfig::parse("socket=/nonexistent.sock").unwrap();
        assert!(d.check_image().is_ok(), "sockets may appear later");
    }
}

//! What every device option (`--disk`, `--fs`, `--rng`, `--vsock`, `--generic-vhost-user`)
//! shares, parsed once: `socket=`, `id=`, `num_queues=`, `queue_size=`, `transport=`, and
//! Cloud Hypervisor's `pci_segment=` and `iommu=`, accepted at their defaults. A device kind
//! declares its own keys and gets their values back.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use super::kv::list as kv_list;
use super::kv::{self, KvError};

/// The largest ring we offer a guest (QEMU's limit too); backends may accept more.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Longest `id=`: it names sockets and log lines.
pub const MAX_ID_LEN: usize = 64;

const COMMON_KEYS: &[&str] = &[
    "socket",
    "id",
    "num_queues",
    "queue_size",
    "transport",
    "pci_segment",
    "iommu",
];

/// A user error in one device option's value; the caller adds the option and the value.
#[derive(Debug, Error)]
pub enum OptionError {
    #[error(transparent)]
    Syntax(#[from] KvError),
    #[error("{0}: empty value")]
    Empty(&'static str),
    #[error("{key}: '{value}' is not a number")]
    NotANumber { key: &'static str, value: String },
    #[error("{key}: {value} is out of range ({min} to {max})")]
    Range {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("{key}: {value} is not a power of two from 2 to {max}")]
    QueueSize {
        key: &'static str,
        value: u64,
        max: u16,
    },
    #[error("{key}: '{value}' is not on or off")]
    Switch { key: &'static str, value: String },
    #[error("transport: '{0}' is not pci or mmio")]
    Transport(String),
    #[error("id: '{0}' must be 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.', not starting with '_' (ids starting with '_' are the defaults cloister gives)")]
    Id(String),
    #[error("{key}={value} is not supported: {why}")]
    Unsupported {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    /// A kind-specific rule, said in full.
    #[error("{0}")]
    Invalid(String),
    #[error("{key}: cannot open {}", .path.display())]
    Open {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportKind {
    #[default]
    Pci,
    Mmio,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Pci => "pci",
            TransportKind::Mmio => "mmio",
        }
    }
}

/// A kind's own keys and their values, in the order given.
pub type KindKeys<'a> = Vec<(&'a str, &'a str)>;

/// The shared keys of one device option.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommonOptions {
    pub id: Option<String>,
    pub socket: Option<PathBuf>,
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub transport: TransportKind,
}

impl CommonOptions {
    /// Splits `s` into the shared keys and the kind's own (`kind_keys`), which come back in
    /// the order given. `expected` is an example for messages; `max_queues` bounds
    /// `num_queues=`.
    pub fn parse<'a>(
        s: &'a str,
        kind_keys: &[&str],
        expected: &'static str,
        max_queues: u16,
    ) -> Result<(Self, KindKeys<'a>), OptionError> {
        let valid: Vec<&str> = kind_keys.iter().chain(COMMON_KEYS).copied().collect();
        let mut common = CommonOptions::default();
        let mut rest = Vec::new();
        for (key, value) in kv::parse(s, &valid, expected)? {
            match key {
                "socket" => common.socket = Some(non_empty("socket", value)?),
                "id" => common.id = Some(id(value)?),
                "num_queues" => {
                    common.num_queues = Some(ranged("num_queues", value, 1, max_queues.into())?)
                }
                "queue_size" => common.queue_size = Some(queue_size("queue_size", value)?),
                "transport" => {
                    common.transport = match value {
                        "pci" => TransportKind::Pci,
                        "mmio" => TransportKind::Mmio,
                        other => return Err(OptionError::Transport(other.to_string())),
                    }
                }
                "pci_segment" => {
                    if number("pci_segment", value)? != 0 {
                        return Err(OptionError::Unsupported {
                            key: "pci_segment",
                            value: value.to_string(),
                            why: "cloister has one PCI segment, 0",
                        });
                    }
                }
                "iommu" => {
                    if switch("iommu", value)? {
                        return Err(OptionError::Unsupported {
                            key: "iommu",
                            value: value.to_string(),
                            why: "cloister has no virtual IOMMU",
                        });
                    }
                }
                _ => rest.push((key, value)),
            }
        }
        Ok((common, rest))
    }
}

pub fn number(key: &'static str, value: &str) -> Result<u64, OptionError> {
    value.parse().map_err(|_| OptionError::NotANumber {
        key,
        value: value.to_string(),
    })
}

/// A number from `min` to `max` (which fit in a u16).
pub fn ranged(key: &'static str, value: &str, min: u64, max: u64) -> Result<u16, OptionError> {
    let n = number(key, value)?;
    if !(min..=max).contains(&n) {
        return Err(OptionError::Range {
            key,
            value: n,
            min,
            max,
        });
    }
    Ok(n as u16)
}

/// A ring size: a power of two from 2 to [`MAX_QUEUE_SIZE`].
pub fn queue_size(key: &'static str, value: &str) -> Result<u16, OptionError> {
    let n = number(key, value)?;
    if !(2..=u64::from(MAX_QUEUE_SIZE)).contains(&n) || !n.is_power_of_two() {
        return Err(OptionError::QueueSize {
            key,
            value: n,
            max: MAX_QUEUE_SIZE,
        });
    }
    Ok(n as u16)
}

/// `on`/`off`, and Cloud Hypervisor's `true`/`false`.
pub fn switch(key: &'static str, value: &str) -> Result<bool, OptionError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(OptionError::Switch {
            key,
            value: value.to_string(),
        }),
    }
}

pub fn non_empty(key: &'static str, value: &str) -> Result<PathBuf, OptionError> {
    if value.is_empty() {
        return Err(OptionError::Empty(key));
    }
    Ok(PathBuf::from(value))
}

/// A user's device id: it names the device in messages, the API and socket file names.
fn id(value: &str) -> Result<String, OptionError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && !value.starts_with('_')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(OptionError::Id(value.to_string()));
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_and_kind_keys() {
        let (c, rest) = CommonOptions::parse(
            "tag=a,socket=/s,id=fs-1,num_queues=2,queue_size=512,transport=mmio,pci_segment=0,iommu=off",
            &["tag"],
            "tag=TAG",
            8,
        )
        .unwrap();
        assert_eq!(c.id.as_deref(), Some("fs-1"));
        assert_eq!(c.socket, Some(PathBuf::from("/s")));
        assert_eq!((c.num_queues, c.queue_size), (Some(2), Some(512)));
        assert_eq!(c.transport, TransportKind::Mmio);
        assert_eq!(rest, vec![("tag", "a")]);
    }

    fn err(s: &str) -> String {
        CommonOptions::parse(s, &["path"], "path=FILE", 64)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(
            err("num_queues=0"),
            "num_queues: 0 is out of range (1 to 64)"
        );
        assert_eq!(err("num_queues=x"), "num_queues: 'x' is not a number");
        assert!(err("queue_size=100").starts_with("queue_size: 100 is not a power of two"));
        assert!(err("queue_size=2048").starts_with("queue_size: 2048"));
        assert_eq!(err("transport=usb"), "transport: 'usb' is not pci or mmio");
        assert!(err("pci_segment=1").contains("one PCI segment"));
        assert!(err("iommu=on").contains("no virtual IOMMU"));
        assert!(err("id=_disk0").starts_with("id: '_disk0' must be"));
        assert!(err("id=a/b").starts_with("id: 'a/b'"));
        assert!(err("id=").starts_with("id: ''"));
        assert_eq!(err("socket="), "socket: empty value");
        assert!(err("size=1").contains("unknown key 'size'"));
        assert!(err("socket=/a,socket=/b").contains("given twice"));
    }
}

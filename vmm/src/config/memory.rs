//! `--memory size=SIZE`.

use thiserror::Error;

use super::kv::{self, KvError};
use super::size::{format_size, parse_size, SizeError};

/// Guest RAM granularity: KVM memory slots and our mappings work in pages.
pub const RAM_ALIGN: u64 = 4 << 10;
/// Below this nothing we load (boot structures, ACPI tables, a kernel at 1 MiB) fits.
pub const MIN_RAM: u64 = 2 << 20;
pub const DEFAULT_RAM: u64 = 512 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemoryOptionError {
    #[error(transparent)]
    Syntax(#[from] KvError),
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("size must be greater than 0")]
    Zero,
    #[error("size {} is below the minimum of {}", format_size(*.0), format_size(MIN_RAM))]
    TooSmall(u64),
    #[error("size {} is not a multiple of 4K", .0)]
    Unaligned(u64),
    #[error("size {} exceeds the host's total RAM ({})", format_size(*.size), format_size(*.host))]
    ExceedsHost { size: u64, host: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { size: DEFAULT_RAM }
    }
}

impl MemoryConfig {
    /// Parses and checks the option against `host_total`, the host's RAM in bytes.
    ///
    /// Guest RAM is mapped with MAP_NORESERVE, so nothing stops a user from asking for more
    /// than the host has except this check; a guest that touches it would be OOM-killed later.
    pub fn parse(s: &str, host_total: u64) -> Result<Self, MemoryOptionError> {
        let mut cfg = MemoryConfig::default();
        for (key, value) in kv::parse(s, &["size"], "size=SIZE")? {
            if key == "size" {
                cfg.size = parse_size(value)?;
            }
        }
        match cfg.size {
            0 => Err(MemoryOptionError::Zero),
            n if n > host_total => Err(MemoryOptionError::ExceedsHost {
                size: n,
                host: host_total,
            }),
            n if n < MIN_RAM => Err(MemoryOptionError::TooSmall(n)),
            n if n % RAM_ALIGN != 0 => Err(MemoryOptionError::Unaligned(n)),
            _ => Ok(cfg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 24 << 30;

    #[test]
    fn parses() {
        assert_eq!(
            MemoryConfig::parse("size=512M", HOST),
            Ok(MemoryConfig { size: 512 << 20 })
        );
        assert_eq!(
            MemoryConfig::parse("size=16G", HOST),
            Ok(MemoryConfig { size: 16 << 30 })
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(
            MemoryConfig::parse("size=0", HOST),
            Err(MemoryOptionError::Zero)
        );
        assert_eq!(
            MemoryConfig::parse("size=100T", HOST),
            Err(MemoryOptionError::ExceedsHost {
                size: 100 << 40,
                host: HOST
            })
        );
        assert_eq!(
            MemoryConfig::parse("size=1M", HOST),
            Err(MemoryOptionError::TooSmall(1 << 20))
        );
        assert_eq!(
            MemoryConfig::parse("size=4194305", HOST),
            Err(MemoryOptionError::Unaligned(4194305))
        );
        assert!(matches!(
            MemoryConfig::parse("size=lots", HOST),
            Err(MemoryOptionError::Size(_))
        ));
        assert!(matches!(
            MemoryConfig::parse("512M", HOST),
            Err(MemoryOptionError::Syntax(_))
        ));
    }

    #[test]
    fn message_names_sizes() {
        let e = MemoryConfig::parse("size=100T", HOST).unwrap_err();
        assert_eq!(
            e.to_string(),
            "size 100T exceeds the host's total RAM (24G)"
        );
    }
}

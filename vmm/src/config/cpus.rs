//! `--cpus boot=N`.

use thiserror::Error;

use super::kv::{self, KvError};

/// The MADT describes each vCPU with an 8-bit xAPIC ID, and 0xff is the broadcast ID.
pub const MAX_VCPUS: usize = 254;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpusError {
    #[error(transparent)]
    Syntax(#[from] KvError),
    #[error("'{0}' is not a vCPU count")]
    NotANumber(String),
    #[error("boot must be at least 1")]
    Zero,
    #[error("{0} vCPUs requested, at most {MAX_VCPUS} are supported (8-bit xAPIC IDs)")]
    TooMany(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpusConfig {
    /// vCPUs present and started at boot.
    pub boot: usize,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig { boot: 1 }
    }
}

impl CpusConfig {
    pub fn parse(s: &str) -> Result<Self, CpusError> {
        let mut cfg = CpusConfig::default();
        for (key, value) in kv::parse(s, &["boot"], "boot=N")? {
            if key == "boot" {
                let n: usize = value
                    .parse()
                    .map_err(|_| CpusError::NotANumber(value.to_string()))?;
                cfg.boot = n;
            }
        }
        match cfg.boot {
            0 => Err(CpusError::Zero),
            n if n > MAX_VCPUS => Err(CpusError::TooMany(n)),
            _ => Ok(cfg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(CpusConfig::parse("boot=1"), Ok(CpusConfig { boot: 1 }));
        assert_eq!(CpusConfig::parse("boot=8"), Ok(CpusConfig { boot: 8 }));
    }

    #[test]
    fn rejects() {
        assert_eq!(CpusConfig::parse("boot=0"), Err(CpusError::Zero));
        assert!(matches!(
            CpusConfig::parse("boot=x"),
            Err(CpusError::NotANumber(_))
        ));
        assert!(matches!(
            CpusConfig::parse("boot=-1"),
            Err(CpusError::NotANumber(_))
        ));
        assert_eq!(CpusConfig::parse("boot=255"), Err(CpusError::TooMany(255)));
        assert!(matches!(
            CpusConfig::parse("max=2"),
            Err(CpusError::Syntax(KvError::UnknownKey { .. }))
        ));
        assert!(matches!(
            CpusConfig::parse("2"),
            Err(CpusError::Syntax(KvError::NotKeyValue { .. }))
        ));
    }
}

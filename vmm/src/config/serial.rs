//! `--serial tty|off|file=PATH`.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SerialError {
    #[error("'{0}' is not a serial mode (expected tty, off or file=PATH)")]
    Invalid(String),
    #[error("file= needs a path")]
    EmptyPath,
}

/// Where the guest's ttyS0 goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialConfig {
    /// Output to our stdout, input from our stdin.
    #[default]
    Tty,
    /// The UART exists (so guests that expect it still boot) but output is discarded.
    Off,
    /// Output appended to a file created or truncated at start; no input.
    File(PathBuf),
}

impl SerialConfig {
    pub fn parse(s: &str) -> Result<Self, SerialError> {
        match s {
            "tty" => Ok(SerialConfig::Tty),
            "off" => Ok(SerialConfig::Off),
            _ => match s.strip_prefix("file=") {
                Some("") => Err(SerialError::EmptyPath),
                Some(path) => Ok(SerialConfig::File(PathBuf::from(path))),
                None => Err(SerialError::Invalid(s.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(SerialConfig::parse("tty"), Ok(SerialConfig::Tty));
        assert_eq!(SerialConfig::parse("off"), Ok(SerialConfig::Off));
        assert_eq!(
            SerialConfig::parse("file=/tmp/console.log"),
            Ok(SerialConfig::File("/tmp/console.log".into()))
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(
            SerialConfig::parse("bogus"),
            Err(SerialError::Invalid("bogus".into()))
        );
        assert_eq!(SerialConfig::parse("file="), Err(SerialError::EmptyPath));
    }
}

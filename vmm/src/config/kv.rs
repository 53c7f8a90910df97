//! The `key=value,key=value` option syntax shared by `--cpus`, `--memory` and friends.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KvError {
    #[error("empty value (expected {0})")]
    Empty(&'static str),
    #[error("'{item}' is not key=value (expected {expected})")]
    NotKeyValue {
        item: String,
        expected: &'static str,
    },
    #[error("unknown key '{key}' (valid keys: {valid})")]
    UnknownKey { key: String, valid: String },
    #[error("key '{0}' given twice")]
    Duplicate(String),
}

/// Splits `s` into `(key, value)` pairs, checking every key against `valid`.
///
/// `expected` is an example shown in messages, e.g. `"boot=N"`.
pub fn parse<'a>(
    s: &'a str,
    valid: &'static [&'static str],
    expected: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, KvError> {
    if s.trim().is_empty() {
        return Err(KvError::Empty(expected));
    }
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for item in s.split(',') {
        let (key, value) = item.split_once('=').ok_or_else(|| KvError::NotKeyValue {
            item: item.to_string(),
            expected,
        })?;
        let key = key.trim();
        if !valid.contains(&key) {
            return Err(KvError::UnknownKey {
                key: key.to_string(),
                valid: valid.join(", "),
            });
        }
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(KvError::Duplicate(key.to_string()));
        }
        pairs.push((key, value.trim()));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs() {
        assert_eq!(
            parse("boot=2", &["boot"], "boot=N"),
            Ok(vec![("boot", "2")])
        );
        assert_eq!(
            parse(" size = 1G ", &["size"], "size=SIZE"),
            Ok(vec![("size", "1G")])
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse("", &["boot"], "boot=N"),
            Err(KvError::Empty("boot=N"))
        );
        assert!(matches!(
            parse("2", &["boot"], "boot=N"),
            Err(KvError::NotKeyValue { .. })
        ));
        assert_eq!(
            parse("max=2", &["boot"], "boot=N"),
            Err(KvError::UnknownKey {
                key: "max".into(),
                valid: "boot".into()
            })
        );
        assert_eq!(
            parse("boot=1,boot=2", &["boot"], "boot=N"),
            Err(KvError::Duplicate("boot".into()))
        );
    }
}

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

/// Splits `s` into `(key, value)` pairs, checking every key against `valid`. A value in
/// brackets may hold commas (`queue_sizes=[256,256]`, Cloud Hypervisor's list syntax).
///
/// `expected` is an example shown in messages, e.g. `"boot=N"`.
pub fn parse<'a>(
    s: &'a str,
    valid: &[&str],
    expected: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, KvError> {
    if s.trim().is_empty() {
        return Err(KvError::Empty(expected));
    }
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for item in split_items(s) {
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

/// `s` as `(key, value)` pairs, unchecked (for showing a value that was checked already);
/// an item without `=` is left out.
pub fn split(s: &str) -> Vec<(&str, &str)> {
    split_items(s)
        .into_iter()
        .filter_map(|item| item.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

/// `s` split at the commas outside brackets.
fn split_items(s: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    items
}

/// The items of a bracketed list value, `[a,b]` (brackets optional for a single item).
pub fn list(value: &str) -> Vec<&str> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    if inner.trim().is_empty() {
        return Vec::new();
    }
    inner.split(',').map(str::trim).collect()
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

    #[test]
    fn bracketed_lists_keep_their_commas() {
        assert_eq!(
            parse("a=[1,2],b=3", &["a", "b"], "a=[N,...]"),
            Ok(vec![("a", "[1,2]"), ("b", "3")])
        );
        assert_eq!(list("[1, 2]"), vec!["1", "2"]);
        assert_eq!(list("7"), vec!["7"]);
        assert!(list("[]").is_empty());
    }
}

//! Cloud Hypervisor's JSON bodies (`VmConfig`, `DiskConfig`, `NetConfig`, …) turned into
//! cloister's command-line option values, so that one parser checks both and an option means
//! the same whichever way it came.
//!
//! Cloud Hypervisor's clients (`ch-remote`, Kata's generated client) send every field of a
//! config, most at their defaults. A field cloister does not support is accepted when it
//! holds Cloud Hypervisor's default (or null) and refused by name otherwise; a field Cloud
//! Hypervisor does not know is refused too, so a typo never passes silently.

use serde_json::{Map, Value};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("{at}: expected {expected}")]
    Type { at: String, expected: &'static str },
    #[error("{at}: unknown field")]
    Unknown { at: String },
    #[error("{at}: not supported by cloister (accepted only as {default})")]
    Unsupported { at: String, default: &'static str },
    #[error("{at}: required")]
    Missing { at: String },
    #[error("{at}: {why}")]
    Invalid { at: String, why: String },
}

/// What a field of Cloud Hypervisor's that cloister does not support must hold.
#[derive(Clone, Copy)]
pub(super) enum Default {
    /// Absent, null, or empty (`[]`, `{}`, `""`).
    Absent,
    False,
    True,
    Zero,
    /// This string (or absent).
    Str(&'static str),
}

impl Default {
    pub(super) fn holds(self, v: &Value) -> bool {
        let absent = match v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::String(s) => s.is_empty(),
            _ => false,
        };
        absent
            || match self {
                Default::Absent => false,
                Default::False => v == &Value::Bool(false),
                Default::True => v == &Value::Bool(true),
                Default::Zero => v.as_u64() == Some(0),
                Default::Str(s) => v.as_str() == Some(s),
            }
    }

    pub(super) fn describe(self) -> &'static str {
        match self {
            Default::Absent => "null",
            Default::False => "false",
            Default::True => "true",
            Default::Zero => "0",
            Default::Str(s) => s,
        }
    }
}

/// How one field of a device's config becomes part of the option's value.
#[derive(Clone, Copy)]
enum Rule {
    /// A string, as `key=value`.
    Str(&'static str),
    /// A non-negative integer, as `key=N`.
    Int(&'static str),
    /// A boolean, as `key=on|off`.
    Switch(&'static str),
    /// Not cloister's: must hold this default.
    Unsupported(Default),
    /// Handled by the kind's own code.
    Special,
}

/// The `key=value,…` option value, built field by field.
#[derive(Default)]
struct OptionValue {
    parts: Vec<String>,
}

impl OptionValue {
    fn push(&mut self, at: &str, key: &str, value: &str) -> Result<(), BodyError> {
        // The option syntax separates keys with commas, groups lists in brackets and has no
        // quoting.
        if value.contains([',', '[', ']']) {
            return Err(BodyError::Invalid {
                at: at.to_string(),
                why: "contains a comma or a bracket, which cloister's option syntax cannot carry"
                    .into(),
            });
        }
        self.parts.push(format!("{key}={value}"));
        Ok(())
    }

    fn finish(self) -> String {
        self.parts.join(",")
    }
}

pub(super) fn object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, BodyError> {
    v.as_object().ok_or_else(|| BodyError::Type {
        at: at.to_string(),
        expected: "an object",
    })
}

pub(super) fn string<'a>(v: &'a Value, at: &str) -> Result<&'a str, BodyError> {
    v.as_str().ok_or_else(|| BodyError::Type {
        at: at.to_string(),
        expected: "a string",
    })
}

pub(super) fn integer(v: &Value, at: &str) -> Result<u64, BodyError> {
    v.as_u64().ok_or_else(|| BodyError::Type {
        at: at.to_string(),
        expected: "a non-negative integer",
    })
}

pub(super) fn boolean(v: &Value, at: &str) -> Result<bool, BodyError> {
    v.as_bool().ok_or_else(|| BodyError::Type {
        at: at.to_string(),
        expected: "true or false",
    })
}

/// Applies `rules`, in their order, to the fields of `o`; fields under [`Rule::Special`] are
/// left to the caller.
fn translate(
    o: &Map<String, Value>,
    at: &str,
    rules: &[(&str, Rule)],
    out: &mut OptionValue,
) -> Result<(), BodyError> {
    if let Some(name) = o.keys().find(|k| !rules.iter().any(|(n, _)| n == k)) {
        return Err(BodyError::Unknown {
            at: format!("{at}.{name}"),
        });
    }
    for &(name, rule) in rules {
        let Some(v) = field(o, name) else {
            continue;
        };
        let here = format!("{at}.{name}");
        match rule {
            Rule::Str(key) => out.push(&here, key, string(v, &here)?)?,
            Rule::Int(key) => out.push(&here, key, &integer(v, &here)?.to_string())?,
            Rule::Switch(key) => {
                out.push(&here, key, if boolean(v, &here)? { "on" } else { "off" })?
            }
            Rule::Unsupported(default) => {
                if !default.holds(v) {
                    return Err(BodyError::Unsupported {
                        at: here,
                        default: default.describe(),
                    });
                }
            }
            Rule::Special => {}
        }
    }
    Ok(())
}

pub(super) fn field<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

/// `vhost_user` and `vhost_socket`: a backend someone else runs, at `socket=`.
fn vhost_socket(
    o: &Map<String, Value>,
    at: &str,
    out: &mut OptionValue,
) -> Result<bool, BodyError> {
    let vhost_user = match field(o, "vhost_user") {
        Some(v) => boolean(v, &format!("{at}.vhost_user"))?,
        None => false,
    };
    match field(o, "vhost_socket") {
        Some(v) => {
            let here = format!("{at}.vhost_socket");
            out.push(&here, "socket", string(v, &here)?)?;
            Ok(true)
        }
        None if vhost_user => Err(BodyError::Missing {
            at: format!("{at}.vhost_socket"),
        }),
        None => Ok(false),
    }
}

const PCI_PLACEMENT: [(&str, Rule); 2] = [
    ("pci_segment", Rule::Unsupported(Default::Zero)),
    ("pci_device_id", Rule::Unsupported(Default::Absent)),
];

/// A `DiskConfig` as `--disk`'s value.
pub fn disk(v: &Value, at: &str) -> Result<String, BodyError> {
    let o = object(v, at)?;
    let mut out = OptionValue::default();
    let rules = [
        ("path", Rule::Str("path")),
        ("readonly", Rule::Switch("readonly")),
        ("direct", Rule::Switch("direct")),
        ("num_queues", Rule::Int("num_queues")),
        ("queue_size", Rule::Int("queue_size")),
        ("id", Rule::Str("id")),
        ("serial", Rule::Str("serial")),
        ("vhost_user", Rule::Special),
        ("vhost_socket", Rule::Special),
        ("iommu", Rule::Unsupported(Default::False)),
        ("rate_limiter_config", Rule::Unsupported(Default::Absent)),
        ("rate_limit_group", Rule::Unsupported(Default::Absent)),
        ("queue_affinity", Rule::Unsupported(Default::Absent)),
        ("backing_files", Rule::Unsupported(Default::False)),
        ("sparse", Rule::Unsupported(Default::True)),
        ("image_type", Rule::Unsupported(Default::Str("Raw"))),
        (
            "lock_granularity",
            Rule::Unsupported(Default::Str("ByteRange")),
        ),
        PCI_PLACEMENT[0],
        PCI_PLACEMENT[1],
    ];
    translate(o, at, &rules, &mut out)?;
    if vhost_socket(o, at, &mut out)? && field(o, "path").is_some() {
        return Err(BodyError::Invalid {
            at: at.to_string(),
            why: "path and vhost_socket together: give one".into(),
        });
    }
    Ok(out.finish())
}

/// A `NetConfig` as `--net`'s value. Tap descriptors (`fds`) are not taken yet.
pub fn net(v: &Value, at: &str) -> Result<String, BodyError> {
    let o = object(v, at)?;
    let mut out = OptionValue::default();
    let rules = [
        ("tap", Rule::Str("tap")),
        ("ip", Rule::Str("ip")),
        ("mask", Rule::Str("mask")),
        ("mac", Rule::Str("mac")),
        ("host_mac", Rule::Str("host_mac")),
        ("mtu", Rule::Int("mtu")),
        ("num_queues", Rule::Int("num_queues")),
        ("queue_size", Rule::Int("queue_size")),
        ("id", Rule::Str("id")),
        ("offload_tso", Rule::Switch("offload_tso")),
        ("offload_ufo", Rule::Switch("offload_ufo")),
        ("offload_csum", Rule::Switch("offload_csum")),
        ("vhost_user", Rule::Special),
        ("vhost_socket", Rule::Special),
        ("vhost_mode", Rule::Special),
        ("fds", Rule::Unsupported(Default::Absent)),
        ("iommu", Rule::Unsupported(Default::False)),
        ("rate_limiter_config", Rule::Unsupported(Default::Absent)),
        PCI_PLACEMENT[0],
        PCI_PLACEMENT[1],
    ];
    translate(o, at, &rules, &mut out)?;
    let socket = vhost_socket(o, at, &mut out)?;
    if let Some(v) = field(o, "vhost_mode") {
        let here = format!("{at}.vhost_mode");
        let mode = string(v, &here)?.to_ascii_lowercase();
        if mode != "client" && mode != "server" {
            return Err(BodyError::Invalid {
                at: here,
                why: "expected Client or Server".into(),
            });
        }
        if socket {
            out.push(&here, "vhost_mode", &mode)?;
        }
    }
    Ok(out.finish())
}

/// A config whose fields all follow `rules`, as an option value.
fn by_rules(v: &Value, at: &str, rules: &[(&str, Rule)]) -> Result<String, BodyError> {
    let mut out = OptionValue::default();
    translate(object(v, at)?, at, rules, &mut out)?;
    Ok(out.finish())
}

/// An `FsConfig` as `--fs`'s value.
pub fn fs(v: &Value, at: &str) -> Result<String, BodyError> {
    by_rules(
        v,
        at,
        &[
            ("tag", Rule::Str("tag")),
            ("socket", Rule::Str("socket")),
            ("num_queues", Rule::Int("num_queues")),
            ("queue_size", Rule::Int("queue_size")),
            ("id", Rule::Str("id")),
            PCI_PLACEMENT[0],
            PCI_PLACEMENT[1],
        ],
    )
}

/// A `VsockConfig` as `--vsock`'s value.
pub fn vsock(v: &Value, at: &str) -> Result<String, BodyError> {
    by_rules(
        v,
        at,
        &[
            ("cid", Rule::Int("cid")),
            ("socket", Rule::Str("socket")),
            ("id", Rule::Str("id")),
            ("iommu", Rule::Unsupported(Default::False)),
            PCI_PLACEMENT[0],
            PCI_PLACEMENT[1],
        ],
    )
}

/// An `RngConfig` as `--rng`'s value.
pub fn rng(v: &Value, at: &str) -> Result<String, BodyError> {
    by_rules(
        v,
        at,
        &[
            ("src", Rule::Str("src")),
            ("id", Rule::Str("id")),
            ("iommu", Rule::Unsupported(Default::False)),
            PCI_PLACEMENT[0],
            PCI_PLACEMENT[1],
        ],
    )
}

/// A `GenericVhostUserConfig` as `--generic-vhost-user`'s value.
pub fn generic_vhost_user(v: &Value, at: &str) -> Result<String, BodyError> {
    let o = object(v, at)?;
    let mut out = OptionValue::default();
    let rules = [
        ("socket", Rule::Str("socket")),
        ("device_type", Rule::Int("device_type")),
        ("id", Rule::Str("id")),
        ("queue_sizes", Rule::Special),
        PCI_PLACEMENT[0],
        PCI_PLACEMENT[1],
    ];
    translate(o, at, &rules, &mut out)?;
    if let Some(v) = field(o, "queue_sizes") {
        let here = format!("{at}.queue_sizes");
        let sizes = v.as_array().ok_or_else(|| BodyError::Type {
            at: here.clone(),
            expected: "an array of integers",
        })?;
        let sizes = sizes
            .iter()
            .map(|s| integer(s, &here).map(|n| n.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        // Brackets keep the list's commas inside one value for the option parser.
        out.parts.push(format!("queue_sizes=[{}]", sizes.join(",")));
    }
    Ok(out.finish())
}

/// An option's `key=value,…` (`option` being `--disk`, `--net`, …) as Cloud Hypervisor's
/// JSON: its field names where they differ, numbers and booleans as such. The reverse of
/// [`disk`], [`net`] and the others, for showing a configuration and for `cloister-remote`.
pub fn option_json(option: &str, value: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, v) in crate::config::kv::split(value) {
        let v = match key {
            // A disk's or a NIC's backend someone else runs.
            "socket" if option == "--disk" || option == "--net" => {
                out.insert("vhost_user".into(), Value::Bool(true));
                out.insert("vhost_socket".into(), Value::String(v.into()));
                continue;
            }
            "vhost_user" => continue,
            "vhost_mode" => {
                let mut mode = v.to_ascii_lowercase();
                if let Some(first) = mode.get_mut(..1) {
                    first.make_ascii_uppercase();
                }
                Value::String(mode)
            }
            "readonly" | "direct" | "offload_tso" | "offload_ufo" | "offload_csum" => {
                Value::Bool(matches!(v, "on" | "true"))
            }
            "num_queues" | "queue_size" | "mtu" | "cid" | "device_type" => v
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::String(v.into())),
            "queue_sizes" => {
                let list = crate::config::kv::list(v);
                Value::Array(
                    list.iter()
                        .map(|n| {
                            n.parse::<u64>()
                                .map(Value::from)
                                .unwrap_or_else(|_| Value::String(n.to_string()))
                        })
                        .collect(),
                )
            }
            _ => Value::String(v.into()),
        };
        out.insert(key.to_string(), v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_read_as_cloud_hypervisor_fields() {
        let disk = option_json("--disk", "path=/a.img,readonly=on,num_queues=2");
        assert_eq!(
            Value::Object(disk),
            json!({"path": "/a.img", "readonly": true, "num_queues": 2})
        );
        let net = option_json(
            "--net",
            "vhost_user=true,socket=/run/n.sock,vhost_mode=server",
        );
        assert_eq!(
            Value::Object(net),
            json!({"vhost_user": true, "vhost_socket": "/run/n.sock", "vhost_mode": "Server"})
        );
        let fs = option_json("--fs", "tag=share,socket=/run/fs.sock");
        assert_eq!(
            Value::Object(fs),
            json!({"tag": "share", "socket": "/run/fs.sock"})
        );
        let generic = option_json(
            "--generic-vhost-user",
            "socket=/s,device_type=26,queue_sizes=[256,128]",
        );
        assert_eq!(
            Value::Object(generic),
            json!({"socket": "/s", "device_type": 26, "queue_sizes": [256, 128]})
        );
    }

    /// What the command line says and what the API is sent mean the same.
    #[test]
    fn an_option_survives_the_round_trip() {
        for (option, value, back) in [
            (
                "--disk",
                "path=/a.img,readonly=on,direct=off,id=d",
                disk as fn(&Value, &str) -> _,
            ),
            ("--disk", "socket=/run/b.sock,num_queues=2", disk),
            (
                "--net",
                "tap=t0,mac=52:54:00:00:00:01,num_queues=4,offload_tso=off",
                net,
            ),
            ("--net", "socket=/run/n.sock,vhost_mode=server", net),
            ("--fs", "tag=share,socket=/run/fs.sock,num_queues=1", fs),
            ("--vsock", "cid=3,socket=/run/v.sock", vsock),
            (
                "--generic-vhost-user",
                "socket=/s,device_type=26,queue_sizes=[256,256]",
                generic_vhost_user,
            ),
        ] {
            let json = Value::Object(option_json(option, value));
            let sorted = |v: &str| {
                let mut parts = crate::config::kv::split(v);
                parts.sort();
                parts
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
            };
            let again = back(&json, "x").unwrap();
            assert_eq!(sorted(&again), sorted(value), "{option} {value}: {json}");
        }
    }

    /// A disk as `ch-remote add-disk` sends it: every field, most at their defaults.
    #[test]
    fn a_disk_with_every_field_at_its_default() {
        let v = json!({
            "path": "/img/a.raw", "readonly": false, "direct": true, "iommu": false,
            "num_queues": 1, "queue_size": 128, "vhost_user": false, "vhost_socket": null,
            "rate_limiter_config": null, "pci_segment": 0, "id": "d0", "serial": null,
            "rate_limit_group": null, "queue_affinity": null, "backing_files": false,
            "sparse": true, "image_type": "Raw"
        });
        assert_eq!(
            disk(&v, "disk").unwrap(),
            "path=/img/a.raw,readonly=off,direct=on,num_queues=1,queue_size=128,id=d0"
        );
    }

    #[test]
    fn an_unsupported_field_off_its_default_is_named() {
        let e = disk(&json!({"path": "/a", "iommu": true}), "disk").unwrap_err();
        assert_eq!(
            e.to_string(),
            "disk.iommu: not supported by cloister (accepted only as false)"
        );
        let e = disk(&json!({"path": "/a", "pathh": 1}), "disk").unwrap_err();
        assert_eq!(e.to_string(), "disk.pathh: unknown field");
        let e = disk(&json!({"path": 3}), "disk").unwrap_err();
        assert_eq!(e.to_string(), "disk.path: expected a string");
        let e = disk(&json!({"path": "/a,b"}), "disk").unwrap_err();
        assert!(e.to_string().contains("comma"));
        let e = disk(&json!({"vhost_user": true}), "disk").unwrap_err();
        assert_eq!(e.to_string(), "disk.vhost_socket: required");
    }

    #[test]
    fn vhost_user_devices() {
        assert_eq!(
            disk(
                &json!({"vhost_user": true, "vhost_socket": "/run/b.sock"}),
                "d"
            )
            .unwrap(),
            "socket=/run/b.sock"
        );
        assert_eq!(
            net(
                &json!({"vhost_user": true, "vhost_socket": "/run/n.sock", "vhost_mode": "Server",
                        "num_queues": 2, "queue_size": 256, "offload_tso": true}),
                "n"
            )
            .unwrap(),
            "num_queues=2,queue_size=256,offload_tso=on,socket=/run/n.sock,vhost_mode=server"
        );
        assert_eq!(
            generic_vhost_user(
                &json!({"socket": "/s", "device_type": 26, "queue_sizes": [256, 256]}),
                "g"
            )
            .unwrap(),
            "socket=/s,device_type=26,queue_sizes=[256,256]"
        );
        let e = net(&json!({"tap": "t0", "fds": [3]}), "n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "n.fds: not supported by cloister (accepted only as null)"
        );
    }
}

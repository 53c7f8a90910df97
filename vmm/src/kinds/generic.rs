//! `--generic-vhost-user device_type=NAME|NUMBER,socket=PATH,queue_sizes=[N,...]`: any
//! vhost-user device someone else runs, in Cloud Hypervisor's syntax (`virtio_id=` is its
//! older spelling of `device_type=`). The device's features pass through as the backend
//! offers them; its config space is read from the backend when it offers CONFIG, for the
//! device types whose config size we know.

use std::sync::Arc;

use cloister_seccomp::SeccompMode;

use super::{Backend, DeviceSpec};
use crate::config::device::{kv_list, number, queue_size, CommonOptions, OptionError};
use crate::vhost_user::kind::{ConfigSpace, DeviceKind, ALL_DEVICE_FEATURES};

pub const OPTION: &str = "--generic-vhost-user";
const MAX_QUEUES: usize = 64;
const KEYS: &[&str] = &["device_type", "virtio_id", "queue_sizes"];
const EXPECTED: &str = "device_type=T,socket=PATH,queue_sizes=[N,...]";

/// Virtio device types by name, with the size of their config space (what GET_CONFIG asks
/// for; 0 where the device has none or we do not know it).
const TYPES: &[(&str, u32, u32)] = &[
    ("net", 1, 20),
    ("blk", 2, 60),
    ("console", 3, 12),
    ("rng", 4, 0),
    ("scsi", 8, 36),
    ("gpu", 16, 16),
    ("input", 18, 136),
    ("vsock", 19, 8),
    ("crypto", 20, 40),
    ("sound", 25, 16),
    ("fs", 26, 40),
    ("scmi", 32, 0),
    ("i2c", 34, 0),
    ("can", 36, 2),
    ("gpio", 41, 8),
];

/// What the VMM itself would have to emulate, or what makes no sense as a backend.
const REFUSED: &[(u32, &str)] = &[
    (23, "an IOMMU is the VMM's own device"),
    (35, "a watchdog is the VMM's own device"),
];

fn device_type(value: &str) -> Result<(u32, u32), OptionError> {
    if let Some(&(_, t, len)) = TYPES.iter().find(|(name, ..)| *name == value) {
        return Ok((t, len));
    }
    let t = u32::try_from(number("device_type", value).map_err(|_| {
        let names: Vec<&str> = TYPES.iter().map(|(n, ..)| *n).collect();
        OptionError::Invalid(format!(
            "device_type: '{value}' is not a virtio device ID or one of {}",
            names.join(", ")
        ))
    })?)
    .unwrap_or(0);
    if t == 0 {
        return Err(OptionError::Invalid(format!(
            "device_type: {value} is not a virtio device ID"
        )));
    }
    let len = TYPES.iter().find(|e| e.1 == t).map_or(0, |e| e.2);
    Ok((t, len))
}

pub fn parse(value: &str, _seccomp: SeccompMode) -> Result<DeviceSpec, OptionError> {
    let (common, own) = CommonOptions::parse(value, KEYS, EXPECTED, MAX_QUEUES as u16)?;
    if common.num_queues.is_some() || common.queue_size.is_some() {
        return Err(OptionError::Invalid(
            "num_queues= and queue_size= are given as queue_sizes=[N,...]".into(),
        ));
    }
    let (mut kind, mut sizes) = (None, None);
    for (key, v) in own {
        match key {
            "queue_sizes" => {
                let list = kv_list(v)
                    .into_iter()
                    .map(|n| queue_size("queue_sizes", n))
                    .collect::<Result<Vec<_>, _>>()?;
                sizes = Some(list);
            }
            _ => {
                if kind.is_some() {
                    return Err(OptionError::Invalid(
                        "device_type= and virtio_id= name the same thing: give one".into(),
                    ));
                }
                kind = Some(device_type(v)?);
            }
        }
    }
    let (device_type, config_len) = kind.ok_or_else(|| {
        OptionError::Invalid("needs device_type=NAME|NUMBER (or virtio_id=NUMBER)".into())
    })?;
    if let Some((_, why)) = REFUSED.iter().find(|(t, _)| *t == device_type) {
        return Err(OptionError::Invalid(format!(
            "device_type: {device_type} is not supported: {why}"
        )));
    }
    let sizes = sizes.ok_or_else(|| {
        OptionError::Invalid("needs queue_sizes=[N,...], one size per queue".into())
    })?;
    if sizes.is_empty() || sizes.len() > MAX_QUEUES {
        return Err(OptionError::Invalid(format!(
            "queue_sizes: {} queues (1 to {MAX_QUEUES})",
            sizes.len()
        )));
    }
    let socket = common.socket.ok_or_else(|| {
        OptionError::Invalid("needs socket=PATH: the backend's vhost-user socket".into())
    })?;
    Ok(DeviceSpec {
        option: OPTION,
        value: value.to_string(),
        id: common.id,
        kind: Arc::new(Generic {
            device_type,
            config_len,
        }),
        backend: Backend::Socket(socket),
        queue_sizes: sizes,
        transport: common.transport,
    })
}

pub struct Generic {
    device_type: u32,
    config_len: u32,
}

impl DeviceKind for Generic {
    fn kind_name(&self) -> &'static str {
        "generic_vhost_user"
    }

    fn backend_name(&self) -> &str {
        "vhost-user backend"
    }

    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn device_features(&self) -> u64 {
        ALL_DEVICE_FEATURES
    }

    fn config_space(&self) -> ConfigSpace {
        match self.config_len {
            0 => ConfigSpace::Local(Vec::new()),
            len => ConfigSpace::BackendOr(len, Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        parse(s, SeccompMode::True).unwrap_err().to_string()
    }

    #[test]
    fn names_numbers_and_lists() {
        let d = parse(
            "device_type=vsock,socket=/v.sock,queue_sizes=[256,256,128],id=g",
            SeccompMode::True,
        )
        .unwrap();
        assert_eq!(d.kind.device_type(), 19);
        assert_eq!(d.queue_sizes, vec![256, 256, 128]);
        assert_eq!(d.kind.config_space(), ConfigSpace::BackendOr(8, Vec::new()));
        assert_eq!(d.backend, Backend::Socket("/v.sock".into()));
        let d = parse(
            "virtio_id=4,socket=/r.sock,queue_sizes=1024",
            SeccompMode::True,
        )
        .unwrap();
        assert_eq!(d.kind.device_type(), 4);
        assert_eq!(d.queue_sizes, vec![1024]);
        assert_eq!(d.kind.config_space(), ConfigSpace::Local(Vec::new()));
        // A type we know nothing of: no config space.
        let d = parse(
            "device_type=99,socket=/x,queue_sizes=[64]",
            SeccompMode::True,
        )
        .unwrap();
        assert_eq!(d.kind.device_type(), 99);
    }

    #[test]
    fn errors() {
        assert!(err("socket=/s,queue_sizes=[2]").starts_with("needs device_type"));
        assert!(err("device_type=rng,socket=/s").starts_with("needs queue_sizes"));
        assert!(err("device_type=rng,queue_sizes=[256]").starts_with("needs socket=PATH"));
        assert!(err("device_type=toaster,socket=/s,queue_sizes=[256]")
            .contains("not a virtio device ID or one of net, blk"));
        assert!(err("device_type=0,socket=/s,queue_sizes=[256]").contains("not a virtio"));
        assert!(err("device_type=35,socket=/s,queue_sizes=[256]").contains("watchdog"));
        assert!(err("device_type=rng,socket=/s,queue_sizes=[100]")
            .starts_with("queue_sizes: 100 is not a power of two"));
        assert!(err("device_type=rng,socket=/s,queue_sizes=[]").contains("0 queues"));
        assert!(err("device_type=rng,virtio_id=4,socket=/s,queue_sizes=[8]").contains("give one"));
        assert!(
            err("device_type=rng,socket=/s,queue_sizes=[8],num_queues=1")
                .contains("queue_sizes=[N,...]")
        );
    }
}

//! `--vsock cid=N,socket=PATH`: virtio-vsock, Cloud Hypervisor's syntax and hybrid model,
//! served by rust-vmm's `vhost-device-vsock`, which cloister starts: host programs connect to
//! the unix socket PATH and send `CONNECT <port>\n` to reach a guest port; a guest connection
//! to host port P goes to `PATH_P`. (A vsock backend someone else runs is a
//! `--generic-vhost-user device_type=vsock`.) Queues: rx, tx and event.

use std::sync::Arc;

use cloister_seccomp::SeccompMode;

use super::{path_arg, Access, Arg, Backend, DeviceSpec, HostPath, SpawnProfile};
use crate::config::device::{number, CommonOptions, OptionError};
use crate::vhost_user::kind::{ConfigSpace, DeviceKind, ALL_DEVICE_FEATURES};

pub const OPTION: &str = "--vsock";
pub const DEVICE_TYPE: u32 = 19;
const QUEUES: usize = 3;
const DEFAULT_QUEUE_SIZE: u16 = 256;
/// CIDs 0-2 are the hypervisor's, the loopback and the host's; u32::MAX is "any".
const FIRST_GUEST_CID: u64 = 3;
const KEYS: &[&str] = &["cid"];
const EXPECTED: &str = "cid=N,socket=PATH";

pub fn parse(value: &str, _seccomp: SeccompMode) -> Result<DeviceSpec, OptionError> {
    let (common, own) = CommonOptions::parse(value, KEYS, EXPECTED, QUEUES as u16)?;
    if common.num_queues.is_some_and(|n| usize::from(n) != QUEUES) {
        return Err(OptionError::Invalid(
            "num_queues: a vsock device has 3 queues (rx, tx, event)".into(),
        ));
    }
    let cid = match own.first() {
        Some((_, v)) => number("cid", v)?,
        None => return Err(OptionError::Invalid("needs cid=N (3 or more)".into())),
    };
    if !(FIRST_GUEST_CID..u64::from(u32::MAX)).contains(&cid) {
        return Err(OptionError::Invalid(format!(
            "cid: {cid} is not a guest CID (3 to {})",
            u32::MAX - 1
        )));
    }
    let uds = common.socket.ok_or_else(|| {
        OptionError::Invalid("needs socket=PATH: the unix socket host programs connect to".into())
    })?;
    let backend = Backend::Managed(SpawnProfile {
        program: "vhost-device-vsock".into(),
        args: vec![
            Arg::plain(format!("--guest-cid={cid}")),
            Arg::socket("--socket="),
            path_arg("--uds-path=", &uds),
        ],
        socket_suffix: String::new(),
        paths: vec![HostPath {
            key: "socket",
            path: uds,
            access: Access::NewSocket,
        }],
        tap: None,
    });
    Ok(DeviceSpec {
        option: OPTION,
        value: value.to_string(),
        id: common.id,
        kind: Arc::new(Vsock { cid }),
        backend,
        queue_sizes: vec![common.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE); QUEUES],
        transport: common.transport,
    })
}

pub struct Vsock {
    cid: u64,
}

impl DeviceKind for Vsock {
    fn kind_name(&self) -> &'static str {
        "vsock"
    }

    fn backend_name(&self) -> &str {
        "vhost-device-vsock"
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// SEQPACKET and whatever else the backend implements.
    fn device_features(&self) -> u64 {
        ALL_DEVICE_FEATURES
    }

    /// `guest_cid` (le64): the backend's, or ours if it keeps none.
    fn config_space(&self) -> ConfigSpace {
        ConfigSpace::BackendOr(8, self.cid.to_le_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        parse(s, SeccompMode::True).unwrap_err().to_string()
    }

    #[test]
    fn cid_and_socket() {
        let d = parse("cid=5,socket=/tmp/v.sock,id=v", SeccompMode::True).unwrap();
        let Backend::Managed(p) = &d.backend else {
            panic!("managed")
        };
        assert!(p.args.contains(&Arg::plain("--guest-cid=5")));
        assert!(p.args.contains(&Arg::plain("--uds-path=/tmp/v.sock")));
        assert_eq!(d.queue_sizes, vec![256; 3]);
        assert_eq!(
            d.kind.config_space(),
            ConfigSpace::BackendOr(8, 5u64.to_le_bytes().to_vec())
        );
        p.paths[0].check().unwrap();
        assert_eq!(err("socket=/tmp/v.sock"), "needs cid=N (3 or more)");
        assert!(err("cid=2,socket=/tmp/v.sock").starts_with("cid: 2 is not a guest CID"));
        assert!(err("cid=3").starts_with("needs socket=PATH"));
        assert!(err("cid=3,socket=/tmp/v.sock,num_queues=2").contains("3 queues"));
        let bad_dir = HostPath {
            key: "socket",
            path: "/nonexistent/v.sock".into(),
            access: Access::NewSocket,
        };
        assert!(bad_dir
            .check()
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }
}

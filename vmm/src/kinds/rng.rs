//! `--rng`: virtio-rng. Cloud Hypervisor's `src=FILE` (default /dev/urandom) makes cloister
//! start rust-vmm's `vhost-device-rng` reading FILE; `socket=PATH` (ours) connects to an rng
//! backend someone else runs. The device has one queue and no config space.

use std::sync::Arc;

use cloister_seccomp::SeccompMode;

use super::{path_arg, source, Access, Arg, Backend, DeviceSpec, HostPath, Source, SpawnProfile};
use crate::config::device::{non_empty, CommonOptions, OptionError};
use crate::vhost_user::kind::{ConfigSpace, DeviceKind};

pub const OPTION: &str = "--rng";
pub const DEVICE_TYPE: u32 = 4;
pub const DEFAULT_SOURCE: &str = "/dev/urandom";
const DEFAULT_QUEUE_SIZE: u16 = 256;
const KEYS: &[&str] = &["src"];
const EXPECTED: &str = "src=FILE or socket=PATH";

pub fn parse(value: &str, _seccomp: SeccompMode) -> Result<DeviceSpec, OptionError> {
    let (common, own) = CommonOptions::parse(value, KEYS, EXPECTED, 1)?;
    let src = own
        .into_iter()
        .map(|(_, v)| non_empty("src", v))
        .next()
        .transpose()?;
    let backend = match source("src", src, common.socket, || Ok(DEFAULT_SOURCE.into()))? {
        Source::Socket(socket) => Backend::Socket(socket),
        Source::Managed(src) => {
            Backend::Managed(SpawnProfile {
                program: "vhost-device-rng".into(),
                args: vec![
                    Arg::socket("--socket-path="),
                    path_arg("--rng-source=", &src),
                ],
                // It listens on PATH0, PATH1, ... (one per --socket-count).
                socket_suffix: "0".into(),
                paths: vec![HostPath {
                    key: "src",
                    path: src,
                    access: Access::Readable,
                }],
                tap: None,
            })
        }
    };
    let backend_name = match &backend {
        Backend::Managed(_) => "vhost-device-rng",
        Backend::Socket(_) | Backend::Listen(_) => "rng backend",
    };
    Ok(DeviceSpec {
        option: OPTION,
        value: value.to_string(),
        id: common.id,
        kind: Arc::new(Rng {
            backend: backend_name,
        }),
        backend,
        queue_sizes: vec![common.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE)],
        transport: common.transport,
    })
}

pub struct Rng {
    backend: &'static str,
}

impl DeviceKind for Rng {
    fn kind_name(&self) -> &'static str {
        "rng"
    }

    fn backend_name(&self) -> &str {
        self.backend
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// virtio-rng has no feature bits of its own.
    fn device_features(&self) -> u64 {
        0
    }

    fn config_space(&self) -> ConfigSpace {
        ConfigSpace::Local(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_sockets() {
        let d = parse("src=/dev/random", SeccompMode::True).unwrap();
        let Backend::Managed(p) = &d.backend else {
            panic!("managed")
        };
        assert_eq!(p.program, "vhost-device-rng");
        assert!(p.args.contains(&Arg::plain("--rng-source=/dev/random")));
        assert_eq!(p.socket_suffix, "0");
        assert_eq!(d.queue_sizes, vec![256]);
        p.paths[0].check().unwrap();
        let d = parse("socket=/run/rng.sock", SeccompMode::True).unwrap();
        assert_eq!(d.backend, Backend::Socket("/run/rng.sock".into()));
        let e = parse("src=/a,socket=/b", SeccompMode::True).unwrap_err();
        assert!(e.to_string().contains("cannot be combined"));
        let e = parse("src=/a,num_queues=2", SeccompMode::True).unwrap_err();
        assert_eq!(e.to_string(), "num_queues: 2 is out of range (1 to 1)");
        // The default source, as Cloud Hypervisor's `--rng` alone.
        let d = parse("src=/dev/urandom", SeccompMode::True).unwrap();
        assert_eq!(d.kind.config_space(), ConfigSpace::Local(Vec::new()));
    }
}

//! `--disk`: virtio-blk, served by a vhost-user-blk backend. Cloud Hypervisor's syntax:
//!
//! - managed: `path=FILE[,readonly=on|off][,direct=on|off][,serial=S]` — cloister starts
//!   `vhost-user-blk` for the image and stops it with the VM;
//! - operator-launched: `socket=PATH` — someone else runs the backend (ours,
//!   qemu-storage-daemon, SPDK, ...); cloister connects.
//!
//! Both take the shared keys (`id=`, `num_queues=`, `queue_size=`, `transport=`).

use std::sync::Arc;

use cloister_seccomp::SeccompMode;

use super::{
    managed_only, path_arg, source, Access, Arg, Backend, DeviceSpec, HostPath, Source,
    SpawnProfile,
};
use crate::config::device::{non_empty, switch, CommonOptions, OptionError};
use crate::vhost_user::kind::{ConfigSpace, DeviceKind};

pub const OPTION: &str = "--disk";
/// vhost-user-blk serves at most 64 queues (one worker thread each, a 64-bit mask).
pub const MAX_QUEUES: u16 = 64;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// virtio-blk's device ID string is 20 bytes.
pub const MAX_SERIAL_LEN: usize = 20;
const KEYS: &[&str] = &["path", "readonly", "direct", "serial", "vhost_user"];
const EXPECTED: &str = "path=FILE or socket=PATH";

pub const DEVICE_TYPE: u32 = 2;
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding. Later fields
/// (secure erase, zoned) belong to features we never pass, so drivers do not read them.
pub const CONFIG_LEN: u32 = 60;
/// `num_queues` (le16) in the config space.
const NUM_QUEUES_OFFSET: usize = 34;

const F_SIZE_MAX: u32 = 1;
const F_SEG_MAX: u32 = 2;
const F_GEOMETRY: u32 = 4;
const F_RO: u32 = 5;
const F_BLK_SIZE: u32 = 6;
const F_FLUSH: u32 = 9;
const F_TOPOLOGY: u32 = 10;
const F_MQ: u32 = 12;
const F_DISCARD: u32 = 13;
const F_WRITE_ZEROES: u32 = 14;

pub fn parse(value: &str, seccomp: SeccompMode) -> Result<DeviceSpec, OptionError> {
    let (common, own) = CommonOptions::parse(value, KEYS, EXPECTED, MAX_QUEUES)?;
    let (mut path, mut readonly, mut direct, mut serial) = (None, None, None, None);
    for (key, v) in own {
        match key {
            "path" => path = Some(non_empty("path", v)?),
            "readonly" => readonly = Some(switch("readonly", v)?),
            "direct" => direct = Some(switch("direct", v)?),
            // Cloud Hypervisor's spelling of an operator-launched disk: socket= says it all.
            "vhost_user" => {
                if !switch("vhost_user", v)? {
                    return Err(OptionError::Invalid(
                        "vhost_user=off: every cloister disk is a vhost-user backend; give \
                         path=FILE for one cloister starts"
                            .into(),
                    ));
                }
            }
            _ => {
                if v.len() > MAX_SERIAL_LEN {
                    return Err(OptionError::Invalid(format!(
                        "serial: {} bytes is longer than {MAX_SERIAL_LEN}",
                        v.len()
                    )));
                }
                serial = Some(v.to_string());
            }
        }
    }
    let queues = common.num_queues.unwrap_or(1);
    let needs = || {
        Err(OptionError::Invalid(
            "needs path=FILE (cloister starts the backend) or socket=PATH (you did)".into(),
        ))
    };
    let backend = match source("path", path, common.socket, needs)? {
        Source::Socket(socket) => {
            for (key, given) in [
                ("readonly", readonly.is_some()),
                ("direct", direct.is_some()),
                ("serial", serial.is_some()),
            ] {
                if given {
                    return Err(managed_only(key));
                }
            }
            Backend::Socket(socket)
        }
        Source::Managed(path) => {
            let readonly = readonly.unwrap_or(false);
            let mut args = vec![
                Arg::socket("--socket="),
                path_arg("--image=", &path),
                Arg::plain(format!("--queues={queues}")),
                // Its start-up and connection chatter is not the VM's business; warnings are.
                Arg::plain("--log-level=warn"),
                Arg::plain(format!("--seccomp={}", seccomp.as_arg())),
            ];
            if readonly {
                args.push(Arg::plain("--readonly"));
            }
            if direct == Some(true) {
                args.push(Arg::plain("--direct"));
            }
            if let Some(s) = serial {
                args.push(Arg::plain(format!("--serial={s}")));
            }
            Backend::Managed(SpawnProfile {
                program: "vhost-user-blk".into(),
                args,
                socket_suffix: String::new(),
                paths: vec![HostPath {
                    key: "path",
                    path,
                    access: Access::Image {
                        writable: !readonly,
                    },
                }],
                tap: None,
            })
        }
    };
    Ok(DeviceSpec {
        option: OPTION,
        value: value.to_string(),
        id: common.id,
        kind: Arc::new(Blk {
            backend: match &backend {
                Backend::Managed(_) => "vhost-user-blk",
                Backend::Socket(_) | Backend::Listen(_) => "vhost-user-blk backend",
            },
        }),
        backend,
        queue_sizes: vec![common.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE); usize::from(queues)],
        transport: common.transport,
    })
}

pub struct Blk {
    backend: &'static str,
}

impl DeviceKind for Blk {
    /// A disk's backend completes out of order: with in-flight tracking (ours, and any with
    /// INFLIGHT_SHMFD) a new one takes up exactly what was left; without it, it takes the ring
    /// up from the used index, as QEMU does, which is exact only for requests one at a time.
    fn recoverable(&self) -> bool {
        true
    }

    fn kind_name(&self) -> &'static str {
        "disk"
    }

    fn backend_name(&self) -> &str {
        self.backend
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// Block features whose config fields and semantics we pass through unchanged. Left out:
    /// CONFIG_WCE (its config field is writable, and we refuse config writes), LIFETIME,
    /// SECURE_ERASE and ZONED (fields past [`CONFIG_LEN`]).
    fn device_features(&self) -> u64 {
        [
            F_SIZE_MAX,
            F_SEG_MAX,
            F_GEOMETRY,
            F_RO,
            F_BLK_SIZE,
            F_FLUSH,
            F_TOPOLOGY,
            F_MQ,
            F_DISCARD,
            F_WRITE_ZEROES,
        ]
        .iter()
        .fold(0, |acc, f| acc | (1 << f))
    }

    fn config_space(&self) -> ConfigSpace {
        ConfigSpace::Backend(CONFIG_LEN)
    }

    /// The guest must see as many queues as we expose, which can be fewer than the backend
    /// serves (operator-launched backends).
    fn adjust_config(&self, config: &mut [u8], queues: u16) {
        if let Some(field) = config.get_mut(NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2) {
            field.copy_from_slice(&queues.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::device::TransportKind;
    use std::path::PathBuf;

    fn spec(s: &str) -> DeviceSpec {
        parse(s, SeccompMode::True).unwrap()
    }

    fn err(s: &str) -> String {
        crate::error_chain(&parse(s, SeccompMode::True).unwrap_err())
    }

    #[test]
    fn managed_defaults() {
        let d = spec("path=/img");
        assert_eq!(d.queue_sizes, vec![256]);
        assert_eq!(d.transport, TransportKind::Pci);
        assert_eq!(d.id, None);
        let Backend::Managed(p) = &d.backend else {
            panic!("not managed")
        };
        assert_eq!(p.program, "vhost-user-blk");
        assert!(p.args.contains(&Arg::plain("--image=/img")));
        assert!(p.args.contains(&Arg::plain("--queues=1")));
        assert!(p.args.contains(&Arg::plain("--seccomp=true")));
        assert!(!p.args.contains(&Arg::plain("--readonly")));
        assert_eq!(
            p.paths[0].access,
            Access::Image { writable: true },
            "opened for writing"
        );
    }

    #[test]
    fn every_key() {
        let d = spec(
            "path=/a.raw,readonly=on,direct=on,serial=abc,num_queues=4,queue_size=128,transport=mmio,id=data",
        );
        let Backend::Managed(p) = &d.backend else {
            panic!("not managed")
        };
        for a in ["--readonly", "--direct", "--serial=abc", "--queues=4"] {
            assert!(p.args.contains(&Arg::plain(a)), "{a}");
        }
        assert_eq!(p.paths[0].access, Access::Image { writable: false });
        assert_eq!(d.queue_sizes, vec![128; 4]);
        assert_eq!(d.transport, TransportKind::Mmio);
        assert_eq!(d.id.as_deref(), Some("data"));
        let s = spec("socket=/run/x.sock,num_queues=2");
        assert_eq!(s.backend, Backend::Socket(PathBuf::from("/run/x.sock")));
        assert_eq!(s.queue_sizes.len(), 2);
        let s = spec("vhost_user=true,socket=/run/x.sock");
        assert_eq!(s.backend, Backend::Socket(PathBuf::from("/run/x.sock")));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("path=/a,size=1").contains("unknown key 'size'"));
        assert_eq!(
            err("num_queues=2"),
            "needs path=FILE (cloister starts the backend) or socket=PATH (you did)"
        );
        assert_eq!(
            err("path=/a,socket=/b"),
            "path= and socket= cannot be combined"
        );
        assert_eq!(
            err("path=/a,num_queues=65"),
            "num_queues: 65 is out of range (1 to 64)"
        );
        assert_eq!(
            err("path=/a,readonly=yes"),
            "readonly: 'yes' is not on or off"
        );
        assert_eq!(err("path="), "path: empty value");
        assert!(err("path=/a,serial=123456789012345678901").starts_with("serial: 21 bytes"));
        assert_eq!(
            err("socket=/s,readonly=on"),
            "readonly= only applies when cloister starts the backend (the backend behind socket= has its own)"
        );
        assert!(err("path=/a,vhost_user=off").starts_with("vhost_user=off"));
        assert!(err("/img").contains("not key=value"));
    }

    #[test]
    fn image_checks() {
        let check = |s: &str| {
            let Backend::Managed(p) = spec(s).backend else {
                panic!("not managed")
            };
            p.paths[0].check()
        };
        let e = check("path=/nonexistent/disk.img").unwrap_err();
        assert!(matches!(e, OptionError::Open { key: "path", .. }), "{e}");
        let e = check("path=/tmp,readonly=on").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn num_queues_is_patched() {
        let blk = Blk { backend: "x" };
        let mut c = vec![0xffu8; CONFIG_LEN as usize];
        blk.adjust_config(&mut c, 3);
        assert_eq!(&c[34..36], &[3, 0]);
        assert_eq!(c[33], 0xff);
        assert_eq!(c[36], 0xff);
        let mut short = vec![0u8; 10];
        blk.adjust_config(&mut short, 3);
        assert_eq!(short, vec![0u8; 10]);
    }

    #[test]
    fn features_are_block_bits_only() {
        let f = Blk { backend: "x" }.device_features();
        assert_eq!(f >> 24, 0, "no transport or vhost-user bits");
        assert_ne!(f & (1 << F_MQ), 0);
        assert_eq!(f & (1 << 11), 0, "no CONFIG_WCE");
    }
}

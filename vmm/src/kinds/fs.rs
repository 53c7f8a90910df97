//! `--fs`: virtio-fs, served by virtiofsd. Cloud Hypervisor's syntax:
//!
//! - operator-launched: `tag=TAG,socket=PATH` — any standard virtiofsd (Rust or C);
//! - managed: `tag=TAG,path=DIR[,readonly=on][,cache=auto|always|never]` — cloister starts
//!   the Rust virtiofsd for DIR, in its own namespace sandbox with its own seccomp filter
//!   (plus the mount and network namespaces our supervisor adds), and stops it with the VM.
//!
//! `num_queues=` is the number of request queues (the device also has a high-priority queue).
//! The config space (tag, request queue count) is made here: virtiofsd offers one only when
//! given `--tag`, and the C one never does.

use std::sync::Arc;

use cloister_seccomp::SeccompMode;

use super::{
    managed_only, path_arg, source, Access, Arg, Backend, DeviceSpec, HostPath, Source,
    SpawnProfile,
};
use crate::config::device::{non_empty, switch, CommonOptions, OptionError};
use crate::vhost_user::kind::{ConfigSpace, DeviceKind};

pub const OPTION: &str = "--fs";
pub const DEVICE_TYPE: u32 = 26;
/// `struct virtio_fs_config`'s tag field.
pub const TAG_LEN: usize = 36;
/// Request queues; virtiofsd serves one, but any standard backend may serve more.
const MAX_REQUEST_QUEUES: u16 = 64;
/// Cloud Hypervisor's default.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
const KEYS: &[&str] = &["tag", "path", "readonly", "cache"];
const EXPECTED: &str = "tag=TAG,socket=PATH or tag=TAG,path=DIR";

pub fn parse(value: &str, seccomp: SeccompMode) -> Result<DeviceSpec, OptionError> {
    let (common, own) = CommonOptions::parse(value, KEYS, EXPECTED, MAX_REQUEST_QUEUES)?;
    let (mut tag, mut path, mut readonly, mut cache) = (None, None, None, None);
    for (key, v) in own {
        match key {
            "tag" => tag = Some(v.to_string()),
            "path" => path = Some(non_empty("path", v)?),
            "readonly" => readonly = Some(switch("readonly", v)?),
            _ => {
                if !matches!(v, "auto" | "always" | "never") {
                    return Err(OptionError::Invalid(format!(
                        "cache: '{v}' is not auto, always or never"
                    )));
                }
                cache = Some(v.to_string());
            }
        }
    }
    let tag = tag.ok_or_else(|| OptionError::Invalid("needs tag=TAG".into()))?;
    if tag.is_empty() || tag.len() > TAG_LEN {
        return Err(OptionError::Invalid(format!(
            "tag: '{tag}' must be 1 to {TAG_LEN} bytes"
        )));
    }
    let request_queues = common.num_queues.unwrap_or(1);
    let needs = || {
        Err(OptionError::Invalid(
            "needs path=DIR (cloister starts virtiofsd) or socket=PATH (you did)".into(),
        ))
    };
    let backend = match source("path", path, common.socket, needs)? {
        Source::Socket(socket) => {
            if readonly.is_some() {
                return Err(managed_only("readonly"));
            }
            if cache.is_some() {
                return Err(managed_only("cache"));
            }
            Backend::Socket(socket)
        }
        Source::Managed(dir) => {
            let mut args = vec![
                Arg::socket("--socket-path="),
                path_arg("--shared-dir=", &dir),
                Arg::plain(format!("--cache={}", cache.as_deref().unwrap_or("auto"))),
                // Its own sandbox: a private mount namespace whose root is the shared
                // directory, and its own seccomp filter, in the mode cloister runs with.
                Arg::plain("--sandbox=namespace"),
                Arg::plain(format!(
                    "--seccomp={}",
                    match seccomp {
                        SeccompMode::True => "kill",
                        SeccompMode::Log => "log",
                        SeccompMode::False => "none",
                    }
                )),
                Arg::plain("--log-level=warn"),
            ];
            if readonly == Some(true) {
                args.push(Arg::plain("--readonly"));
            }
            // virtiofsd keeps a descriptor per inode it knows and asks for a million; where the
            // hard limit is lower it says so at every start. Ask for what it can get.
            if let Some(limit) = open_files_hard_limit() {
                args.push(Arg::plain(format!("--rlimit-nofile={limit}")));
            }
            Backend::Managed(SpawnProfile {
                program: "virtiofsd".into(),
                args,
                socket_suffix: String::new(),
                paths: vec![HostPath {
                    key: "path",
                    path: dir,
                    access: Access::Directory,
                }],
                tap: None,
            })
        }
    };
    let backend_name = match &backend {
        Backend::Managed(_) => "virtiofsd",
        Backend::Socket(_) | Backend::Listen(_) => "virtio-fs backend",
    };
    Ok(DeviceSpec {
        option: OPTION,
        value: value.to_string(),
        id: common.id,
        kind: Arc::new(Fs {
            backend: backend_name,
            tag,
            request_queues,
        }),
        backend,
        // The high-priority queue, then the request queues.
        queue_sizes: vec![
            common.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
            1 + usize::from(request_queues)
        ],
        transport: common.transport,
    })
}

/// The hard limit on open files, which a backend inherits and may raise its soft limit to.
fn open_files_hard_limit() -> Option<u64> {
    // SAFETY: getrlimit writes into the struct we pass.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    (limit.rlim_max != libc::RLIM_INFINITY).then_some(limit.rlim_max)
}

pub struct Fs {
    backend: &'static str,
    tag: String,
    request_queues: u16,
}

impl DeviceKind for Fs {
    fn kind_name(&self) -> &'static str {
        "fs"
    }

    fn backend_name(&self) -> &str {
        self.backend
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// The guest mounts a share by its tag: two with one tag would be ambiguous.
    fn unique_key(&self) -> Option<String> {
        Some(format!("tag={}", self.tag))
    }

    /// VIRTIO_FS_F_NOTIFICATION needs a notification queue we do not set up.
    fn device_features(&self) -> u64 {
        0
    }

    /// `struct virtio_fs_config`: the tag, NUL-padded, and the request queue count.
    fn config_space(&self) -> ConfigSpace {
        let mut config = vec![0u8; TAG_LEN + 4];
        config[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&u32::from(self.request_queues).to_le_bytes());
        ConfigSpace::Local(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> DeviceSpec {
        parse(s, SeccompMode::True).unwrap()
    }

    fn err(s: &str) -> String {
        crate::error_chain(&parse(s, SeccompMode::True).unwrap_err())
    }

    #[test]
    fn operator_share() {
        let d = spec("tag=myfs,socket=/run/fs.sock,num_queues=2,queue_size=512,id=share");
        assert_eq!(d.backend, Backend::Socket("/run/fs.sock".into()));
        assert_eq!(d.queue_sizes, vec![512; 3], "hiprio + 2 request queues");
        let ConfigSpace::Local(c) = d.kind.config_space() else {
            panic!("local config")
        };
        assert_eq!(&c[..4], b"myfs");
        assert!(c[4..TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&c[TAG_LEN..], &2u32.to_le_bytes());
        assert_eq!(d.kind.device_type(), 26);
    }

    #[test]
    fn managed_share() {
        let d = parse("tag=t,path=/srv,readonly=on,cache=never", SeccompMode::Log).unwrap();
        let Backend::Managed(p) = &d.backend else {
            panic!("managed")
        };
        assert_eq!(p.program, "virtiofsd");
        for a in [
            "--shared-dir=/srv",
            "--cache=never",
            "--readonly",
            "--seccomp=log",
            "--sandbox=namespace",
        ] {
            assert!(p.args.contains(&Arg::plain(a)), "{a}");
        }
        assert_eq!(d.queue_sizes, vec![1024; 2]);
        assert_eq!(p.paths[0].access, Access::Directory);
        let d = spec("tag=t,path=/srv");
        let Backend::Managed(p) = &d.backend else {
            panic!("managed")
        };
        assert!(p.args.contains(&Arg::plain("--cache=auto")));
        assert!(p.args.contains(&Arg::plain("--seccomp=kill")));
        assert!(!p.args.contains(&Arg::plain("--readonly")));
    }

    #[test]
    fn errors() {
        assert_eq!(err("socket=/s"), "needs tag=TAG");
        assert!(err(&format!("tag={},socket=/s", "x".repeat(37))).contains("1 to 36 bytes"));
        assert!(err("tag=t").starts_with("needs path=DIR"));
        assert!(err("tag=t,path=/a,socket=/b").contains("cannot be combined"));
        assert!(err("tag=t,socket=/s,readonly=on").starts_with("readonly= only applies"));
        assert!(err("tag=t,path=/a,cache=sometimes").contains("not auto, always or never"));
        assert!(err("tag=t,socket=/s,iommu=on").contains("no virtual IOMMU"));
        let missing = HostPath {
            key: "path",
            path: "/nonexistent/dir".into(),
            access: Access::Directory,
        };
        assert!(matches!(missing.check(), Err(OptionError::Open { .. })));
        let file = HostPath {
            key: "path",
            path: concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into(),
            access: Access::Directory,
        };
        assert!(file
            .check()
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }
}

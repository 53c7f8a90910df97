//! `vm.create`'s body, Cloud Hypervisor's `VmConfig`, as the `cloister` command line that
//! would ask for the same VM (see [`super::body`] for the rules a field follows).

use std::path::PathBuf;

use serde_json::Value;

use super::body::{
    boolean, disk, field, fs, generic_vhost_user, integer, net, object, rng, string, vsock,
    BodyError, Default,
};
use crate::config::{Cli, DEFAULT_CMDLINE};

/// The parts of the `cloister` command line a `VmConfig` does not set.
#[derive(Clone, Copy, Debug)]
pub struct ProcessOptions {
    pub seccomp: cloister_seccomp::SeccompMode,
    pub backend_restarts: u32,
}

/// A `VmConfig` (`vm.create`'s body) as the command line that would ask for the same VM.
pub fn vm_config(body: &[u8], process: &ProcessOptions) -> Result<Cli, BodyError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| BodyError::NotJson(e.to_string()))?;
    let o = object(&v, "VmConfig")?;
    let mut cli = Cli {
        kernel: None,
        initramfs: None,
        cmdline: DEFAULT_CMDLINE.to_string(),
        cpus: "boot=1".into(),
        memory: "size=512M".into(),
        // Cloud Hypervisor's default serial port is "Null".
        serial: "off".into(),
        disk: Vec::new(),
        net: Vec::new(),
        fs: Vec::new(),
        rng: None,
        vsock: None,
        generic_vhost_user: Vec::new(),
        seccomp: process.seccomp,
        backend_restarts: process.backend_restarts,
        api_socket: None,
        event_monitor: None,
    };
    for (name, v) in o {
        let at = format!("VmConfig.{name}");
        if v.is_null() {
            continue;
        }
        match name.as_str() {
            "payload" => payload(v, &at, &mut cli)?,
            "cpus" => cli.cpus = cpus(v, &at)?,
            "memory" => cli.memory = memory(v, &at)?,
            "serial" => cli.serial = serial(v, &at)?,
            "console" => console(v, &at)?,
            "disks" => cli.disk = each(v, &at, disk)?,
            "net" => cli.net = each(v, &at, net)?,
            "fs" => cli.fs = each(v, &at, fs)?,
            "generic_vhost_user" => cli.generic_vhost_user = each(v, &at, generic_vhost_user)?,
            "rng" => {
                // Cloud Hypervisor always has an rng device (default /dev/urandom); cloister
                // adds one when asked. Its default src asks for nothing in particular.
                cli.rng = Some(rng(v, &at)?);
            }
            "vsock" => cli.vsock = Some(vsock(v, &at)?),
            "iommu" | "watchdog" | "landlock_enable" => {
                if !Default::False.holds(v) {
                    return Err(BodyError::Unsupported {
                        at,
                        default: "false",
                    });
                }
            }
            // Cloister always has a pvpanic device: either value describes it.
            "pvpanic" => {
                boolean(v, &at)?;
            }
            "debug_console" => {
                let mode = object(v, &at)?.get("mode").and_then(Value::as_str);
                if !matches!(mode, None | Some("Off")) {
                    return Err(BodyError::Unsupported {
                        at: format!("{at}.mode"),
                        default: "Off",
                    });
                }
            }
            "rate_limit_groups" | "balloon" | "pmem" | "devices" | "user_devices" | "vdpa"
            | "numa" | "rtc" | "pci_segments" | "platform" | "tpm" | "landlock_rules"
            | "sgx_epc" => {
                if !Default::Absent.holds(v) {
                    return Err(BodyError::Unsupported {
                        at,
                        default: "null",
                    });
                }
            }
            _ => return Err(BodyError::Unknown { at }),
        }
    }
    if cli.kernel.is_none() {
        return Err(BodyError::Missing {
            at: "VmConfig.payload.kernel".into(),
        });
    }
    Ok(cli)
}

fn each(
    v: &Value,
    at: &str,
    one: fn(&Value, &str) -> Result<String, BodyError>,
) -> Result<Vec<String>, BodyError> {
    let items = v.as_array().ok_or_else(|| BodyError::Type {
        at: at.to_string(),
        expected: "an array",
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| one(item, &format!("{at}[{i}]")))
        .collect()
}

fn payload(v: &Value, at: &str, cli: &mut Cli) -> Result<(), BodyError> {
    for (name, v) in object(v, at)? {
        let here = format!("{at}.{name}");
        if v.is_null() {
            continue;
        }
        match name.as_str() {
            "kernel" => cli.kernel = Some(PathBuf::from(string(v, &here)?)),
            "initramfs" => cli.initramfs = Some(PathBuf::from(string(v, &here)?)),
            "cmdline" => cli.cmdline = string(v, &here)?.to_string(),
            "firmware" | "igvm" | "host_data" => {
                if !Default::Absent.holds(v) {
                    return Err(BodyError::Unsupported {
                        at: here,
                        default: "null (cloister boots a kernel directly)",
                    });
                }
            }
            _ => return Err(BodyError::Unknown { at: here }),
        }
    }
    Ok(())
}

fn cpus(v: &Value, at: &str) -> Result<String, BodyError> {
    let o = object(v, at)?;
    let boot = match field(o, "boot_vcpus") {
        Some(v) => integer(v, &format!("{at}.boot_vcpus"))?,
        None => 1,
    };
    for (name, v) in o {
        let here = format!("{at}.{name}");
        let default = match name.as_str() {
            "boot_vcpus" => continue,
            "max_vcpus" => {
                if !v.is_null() && integer(v, &here)? != boot {
                    return Err(BodyError::Unsupported {
                        at: here,
                        default: "boot_vcpus (no vCPU hot-plug yet)",
                    });
                }
                continue;
            }
            "kvm_hyperv" => Default::False,
            "nested" => Default::True,
            "core_scheduling" => Default::Str("Vm"),
            // The host's own physical address width is what the guest gets.
            "max_phys_bits" => continue,
            "topology" | "affinity" => Default::Absent,
            "features" => {
                let amx = object(v, &here)?.get("amx").cloned().unwrap_or(Value::Null);
                if !Default::False.holds(&amx) {
                    return Err(BodyError::Unsupported {
                        at: format!("{here}.amx"),
                        default: "false",
                    });
                }
                continue;
            }
            _ => return Err(BodyError::Unknown { at: here }),
        };
        if !default.holds(v) {
            return Err(BodyError::Unsupported {
                at: here,
                default: default.describe(),
            });
        }
    }
    Ok(format!("boot={boot}"))
}

fn memory(v: &Value, at: &str) -> Result<String, BodyError> {
    let o = object(v, at)?;
    let size = field(o, "size")
        .ok_or_else(|| BodyError::Missing {
            at: format!("{at}.size"),
        })
        .and_then(|v| integer(v, &format!("{at}.size")))?;
    for (name, v) in o {
        let here = format!("{at}.{name}");
        let default = match name.as_str() {
            "size" => continue,
            // Guest RAM is always shared memory (vhost-user backends map it): either value.
            "shared" => {
                boolean(v, &here)?;
                continue;
            }
            "mergeable" | "hugepages" | "prefault" | "reserve" => Default::False,
            "thp" => Default::True,
            "hotplug_method" => Default::Str("Acpi"),
            "hotplug_size" | "hotplugged_size" => Default::Zero,
            "hugepage_size" | "zones" => Default::Absent,
            _ => return Err(BodyError::Unknown { at: here }),
        };
        if !default.holds(v) {
            return Err(BodyError::Unsupported {
                at: here,
                default: default.describe(),
            });
        }
    }
    Ok(format!("size={size}"))
}

/// The guest's serial port: Tty, Off or Null, or File with `file`.
fn serial(v: &Value, at: &str) -> Result<String, BodyError> {
    let o = object(v, at)?;
    let mode = field(o, "mode")
        .ok_or_else(|| BodyError::Missing {
            at: format!("{at}.mode"),
        })
        .and_then(|v| string(v, &format!("{at}.mode")))?;
    for name in o.keys() {
        if ![
            "mode",
            "file",
            "socket",
            "iommu",
            "id",
            "pci_segment",
            "pci_device_id",
        ]
        .contains(&name.as_str())
        {
            return Err(BodyError::Unknown {
                at: format!("{at}.{name}"),
            });
        }
    }
    match mode {
        "Tty" => Ok("tty".into()),
        "Off" | "Null" => Ok("off".into()),
        "File" => {
            let here = format!("{at}.file");
            let file = field(o, "file")
                .ok_or(BodyError::Missing { at: here.clone() })
                .and_then(|v| string(v, &here))?;
            Ok(format!("file={file}"))
        }
        _ => Err(BodyError::Unsupported {
            at: format!("{at}.mode"),
            default: "Tty, Off, Null or File",
        }),
    }
}

/// Cloister has no virtio-console: Cloud Hypervisor's default (`Tty`) and the modes that
/// ask for nothing are accepted and mean no console device.
fn console(v: &Value, at: &str) -> Result<(), BodyError> {
    let o = object(v, at)?;
    match o.get("mode").and_then(Value::as_str) {
        None | Some("Tty" | "Off" | "Null") => Ok(()),
        Some(_) => Err(BodyError::Unsupported {
            at: format!("{at}.mode"),
            default: "Tty, Off or Null (no virtio-console: the guest's console is its serial port)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn process() -> ProcessOptions {
        ProcessOptions {
            seccomp: cloister_seccomp::SeccompMode::True,
            backend_restarts: 100,
        }
    }

    #[test]
    fn a_vm_config_as_kata_sends_it() {
        let body = json!({
            "payload": {"kernel": "/k", "cmdline": "console=ttyS0 quiet", "initramfs": null,
                        "firmware": null},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "kvm_hyperv": false, "max_phys_bits": 46,
                     "topology": null, "affinity": null, "features": {"amx": false}},
            "memory": {"size": 1073741824u64, "shared": true, "hugepages": false,
                       "mergeable": false, "hotplug_method": "Acpi", "thp": true,
                       "prefault": false, "zones": null},
            "disks": [{"path": "/d.img", "readonly": true}],
            "net": [{"tap": "tap0", "mac": "52:54:00:00:00:01", "num_queues": 2}],
            "rng": {"src": "/dev/urandom", "iommu": false},
            "serial": {"mode": "File", "file": "/tmp/console.log"},
            "console": {"mode": "Tty", "iommu": false},
            "iommu": false, "watchdog": false, "pvpanic": false, "numa": null, "platform": null
        });
        let cli = vm_config(body.to_string().as_bytes(), &process()).unwrap();
        assert_eq!(cli.kernel, Some(PathBuf::from("/k")));
        assert_eq!(cli.cmdline, "console=ttyS0 quiet");
        assert_eq!(cli.cpus, "boot=2");
        assert_eq!(cli.memory, "size=1073741824");
        assert_eq!(cli.disk, ["path=/d.img,readonly=on"]);
        assert_eq!(cli.net, ["tap=tap0,mac=52:54:00:00:00:01,num_queues=2"]);
        assert_eq!(cli.rng.as_deref(), Some("src=/dev/urandom"));
        assert_eq!(cli.serial, "file=/tmp/console.log");
    }

    #[test]
    fn vm_config_errors_name_the_field() {
        let e = |v: Value| {
            vm_config(v.to_string().as_bytes(), &process())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(e(json!({})), "VmConfig.payload.kernel: required");
        assert_eq!(
            e(json!({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 4}})),
            "VmConfig.cpus.max_vcpus: not supported by cloister (accepted only as boot_vcpus \
             (no vCPU hot-plug yet))"
        );
        assert_eq!(
            e(json!({"payload": {"kernel": "/k"}, "memory": {"size": 1, "hugepages": true}})),
            "VmConfig.memory.hugepages: not supported by cloister (accepted only as false)"
        );
        assert_eq!(
            e(json!({"payload": {"kernel": "/k"}, "balloon": {"size": 1}})),
            "VmConfig.balloon: not supported by cloister (accepted only as null)"
        );
        assert_eq!(
            e(json!({"payload": {"kernel": "/k"}, "x": 1})),
            "VmConfig.x: unknown field"
        );
        assert!(vm_config(b"{", &process())
            .unwrap_err()
            .to_string()
            .starts_with("the body is not JSON"));
    }

    /// Random JSON values in every field position: an error or a command line, never a panic.
    #[test]
    fn fuzzed_configs_never_panic() {
        let values = [
            json!(null),
            json!(true),
            json!(-1),
            json!(u64::MAX),
            json!(1.5),
            json!("x,y"),
            json!(""),
            json!([]),
            json!([1, "a", null]),
            json!({}),
            json!({"a": {"b": []}}),
        ];
        let fields = [
            "payload",
            "cpus",
            "memory",
            "disks",
            "net",
            "fs",
            "rng",
            "vsock",
            "serial",
            "console",
            "generic_vhost_user",
            "iommu",
            "balloon",
            "pvpanic",
            "debug_console",
        ];
        for field in fields {
            for v in &values {
                let mut body = json!({"payload": {"kernel": "/k"}});
                body[field] = v.clone();
                let _ = vm_config(body.to_string().as_bytes(), &process());
                // The same value one level down, in a device.
                let device = json!([{ "path": v, "num_queues": v, "vhost_socket": v, "id": v }]);
                body[field] = device;
                let _ = vm_config(body.to_string().as_bytes(), &process());
            }
        }
        for v in &values {
            for one in [disk, net, fs, vsock, rng, generic_vhost_user] {
                let _ = one(v, "x");
                let _ = one(
                    &json!({"socket": v, "queue_sizes": v, "device_type": v}),
                    "x",
                );
            }
        }
    }
}

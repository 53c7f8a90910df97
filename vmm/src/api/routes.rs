//! Which request does what: the endpoint table (also what `docs/api.yaml` is checked
//! against) and each endpoint's handler.

use serde_json::{json, Map, Value};

use super::body::{self, BodyError};
use super::http::{Request, Response};
use super::vm_config::ProcessOptions;
use crate::config::device::TransportKind;
use crate::device_manager::{DeviceManagerError, DeviceStatus};
use crate::kinds::{self, DeviceSpec};
use crate::lifecycle::{Command, Control, Refusal};
use crate::VmConfig;

pub const PREFIX: &str = "/api/v1/";

/// Every endpoint served, with its method.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("vmm.ping", "GET"),
    ("vmm.shutdown", "PUT"),
    ("vm.create", "PUT"),
    ("vm.boot", "PUT"),
    ("vm.shutdown", "PUT"),
    ("vm.delete", "PUT"),
    ("vm.info", "GET"),
    ("vm.counters", "GET"),
    ("vm.add-disk", "PUT"),
    ("vm.add-net", "PUT"),
    ("vm.add-fs", "PUT"),
    ("vm.add-vsock", "PUT"),
    ("vm.add-generic-vhost-user", "PUT"),
    ("vm.remove-device", "PUT"),
    ("vm.power-button", "PUT"),
    ("vm.pause", "PUT"),
    ("vm.resume", "PUT"),
];

/// Cloud Hypervisor's endpoints cloister does not serve (yet): answered 501, by name, rather
/// than 404, so that a client can tell a missing feature from a wrong path.
pub const NOT_SERVED: &[&str] = &[
    "vmm.info",
    "vm.reboot",
    "vm.resize",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.add-device",
    "vm.add-pmem",
    "vm.add-vdpa",
    "vm.add-user-device",
    "vm.snapshot",
    "vm.restore",
    "vm.coredump",
    "vm.nmi",
    "vm.balloon-stats",
    "vm.receive-migration",
    "vm.send-migration",
];

pub struct Routes {
    control: Control,
    process: ProcessOptions,
}

impl Routes {
    pub fn new(control: Control, process: ProcessOptions) -> Self {
        Routes { control, process }
    }

    /// The reply to `request`, and whether the VMM is now going (`vmm.shutdown` accepted).
    pub fn handle(&self, request: Request) -> (Response, bool) {
        let Some(endpoint) = request.path.strip_prefix(PREFIX) else {
            return (not_found(&request.path), false);
        };
        let Some(&(_, method)) = ENDPOINTS.iter().find(|(e, _)| *e == endpoint) else {
            if NOT_SERVED.contains(&endpoint) {
                return (
                    Response::error(501, format!("{endpoint} is not implemented by cloister")),
                    false,
                );
            }
            return (not_found(&request.path), false);
        };
        if request.method != method {
            return (
                Response::error(
                    405,
                    format!("{endpoint} takes {method}, not {}", request.method),
                ),
                false,
            );
        }
        let body = request.body;
        let result = match endpoint {
            "vmm.ping" => Ok(self.ping()),
            "vmm.shutdown" => {
                return match self.control.call(Command::ShutdownVmm) {
                    Ok(()) => (Response::empty(204), true),
                    Err(r) => (refused(r), false),
                }
            }
            "vm.create" => self.command(Command::Create(body)),
            "vm.boot" => self.command(Command::Boot),
            "vm.shutdown" => self.command(Command::Shutdown),
            "vm.pause" => self.command(Command::Pause),
            "vm.resume" => self.command(Command::Resume),
            "vm.delete" => self.command(Command::Delete),
            "vm.info" => self.info(),
            "vm.counters" => self.counters(),
            "vm.add-disk" => self.add(&body, kinds::blk::OPTION, body::disk, kinds::blk::parse),
            "vm.add-net" => self.add(&body, kinds::net::OPTION, body::net, kinds::net::parse),
            "vm.add-fs" => self.add(&body, kinds::fs::OPTION, body::fs, kinds::fs::parse),
            "vm.add-vsock" => self.add(
                &body,
                kinds::vsock::OPTION,
                body::vsock,
                kinds::vsock::parse,
            ),
            "vm.add-generic-vhost-user" => self.add(
                &body,
                kinds::generic::OPTION,
                body::generic_vhost_user,
                kinds::generic::parse,
            ),
            "vm.remove-device" => self.remove(&body),
            "vm.power-button" => self.running().map(|r| {
                r.acpi.power_button();
                crate::events::emit("vm", "power-button", None);
                Response::empty(204)
            }),
            _ => Err(Refusal::new(500, format!("{endpoint} has no handler"))),
        };
        (result.unwrap_or_else(refused), false)
    }

    fn command(&self, command: Command) -> Result<Response, Refusal> {
        self.control.call(command).map(|()| Response::empty(204))
    }

    fn ping(&self) -> Response {
        Response::json(
            200,
            &json!({
                "build_version": env!("CARGO_PKG_VERSION"),
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "features": [],
            }),
        )
    }

    fn info(&self) -> Result<Response, Refusal> {
        let (config, state, running) = {
            let shared = self.control.shared();
            (shared.config.clone(), shared.state, shared.running.clone())
        };
        let (Some(config), Some(state)) = (config, state) else {
            return Err(Refusal::new(404, "no VM is created"));
        };
        // A running VM's devices are what it has now (hot-plugged ones too, with their ids).
        let devices = running.map(|r| r.devices.lock().unwrap_or_else(|e| e.into_inner()).status());
        let mut info = json!({
            "config": config_json(&config, devices.as_deref()),
            "state": state.name(),
            "memory_actual_size": config.memory.size,
        });
        if let Some(devices) = &devices {
            let tree: Map<String, Value> = devices
                .iter()
                .map(|d| {
                    let mut node = json!({
                        "id": d.info.id, "resources": [], "children": [],
                    });
                    if d.info.address.starts_with("0000:") {
                        node["pci_bdf"] = json!(d.info.address);
                    }
                    (d.info.id.clone(), node)
                })
                .collect();
            info["device_tree"] = Value::Object(tree);
        }
        Ok(Response::json(200, &info))
    }

    /// What cloister knows per device: its backend's losses and recoveries. The requests,
    /// bytes and packets are the backends' to count and are not gathered yet: absent, not 0.
    fn counters(&self) -> Result<Response, Refusal> {
        let running = self.running()?;
        let devices = running
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status();
        let counters: Map<String, Value> = devices
            .iter()
            .map(|d| {
                (
                    d.info.id.clone(),
                    json!({"backend_losses": d.losses, "backend_recoveries": d.recoveries}),
                )
            })
            .collect();
        Ok(Response::json(200, &Value::Object(counters)))
    }

    fn running(&self) -> Result<crate::lifecycle::RunningVm, Refusal> {
        let shared = self.control.shared();
        match (&shared.running, shared.state) {
            (Some(r), _) => Ok(r.clone()),
            (None, None) => Err(Refusal::new(404, "no VM is created")),
            (None, Some(_)) => Err(Refusal::new(405, "the VM is not running")),
        }
    }

    /// A device added to the running VM: the body as the option's value, parsed as the
    /// command line's is, then plugged by the hot-plug thread.
    fn add(
        &self,
        body: &[u8],
        option: &'static str,
        translate: fn(&Value, &str) -> Result<String, BodyError>,
        parse: fn(
            &str,
            cloister_seccomp::SeccompMode,
        ) -> Result<DeviceSpec, crate::config::device::OptionError>,
    ) -> Result<Response, Refusal> {
        let running = self.running()?;
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| Refusal::new(400, BodyError::NotJson(e.to_string()).to_string()))?;
        let value = translate(&v, option.trim_start_matches('-'))
            .map_err(|e| Refusal::new(400, e.to_string()))?;
        let spec = parse(&value, self.process.seccomp).map_err(|e| {
            Refusal::new(400, format!("{option} {value}: {}", crate::error_chain(&e)))
        })?;
        if spec.transport != TransportKind::Pci {
            return Err(Refusal::new(400, "devices are hot-plugged on PCI only"));
        }
        let info = running.hotplug.add(spec).map_err(device_refusal)?;
        Ok(Response::json(
            200,
            &json!({"id": info.id, "bdf": info.address}),
        ))
    }

    fn remove(&self, body: &[u8]) -> Result<Response, Refusal> {
        let running = self.running()?;
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| Refusal::new(400, BodyError::NotJson(e.to_string()).to_string()))?;
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| Refusal::new(400, "VmRemoveDevice.id: required, a string"))?;
        running.hotplug.request_eject(id).map_err(device_refusal)?;
        Ok(Response::empty(204))
    }
}

fn device_refusal(e: DeviceManagerError) -> Refusal {
    let status = match &e {
        DeviceManagerError::NoSuchDevice(_) => 404,
        DeviceManagerError::MmioRemoval(_) => 405,
        DeviceManagerError::DuplicateId(_) | DeviceManagerError::DuplicateKey(_) => 409,
        _ => 500,
    };
    Refusal::new(status, crate::error_chain(&e))
}

fn refused(r: Refusal) -> Response {
    Response::error(r.status, r.message)
}

fn not_found(path: &str) -> Response {
    Response::error(404, format!("no endpoint at {path}"))
}

/// The configuration as Cloud Hypervisor's `VmConfig`: the payload, CPUs and memory, and each
/// device under its kind's field with its options as given (running, with its id).
fn config_json(config: &VmConfig, running: Option<&[DeviceStatus]>) -> Value {
    let mut out = json!({
        "payload": {
            "kernel": config.kernel,
            "cmdline": config.cmdline,
            "initramfs": config.initramfs,
        },
        "cpus": {"boot_vcpus": config.cpus.boot, "max_vcpus": config.cpus.boot},
        "memory": {"size": config.memory.size, "shared": true},
    });
    let devices: Vec<(&str, String, Option<&str>)> = match running {
        Some(devices) => devices
            .iter()
            .map(|d| (d.option, d.value.clone(), Some(d.info.id.as_str())))
            .collect(),
        None => config
            .devices
            .iter()
            .map(|d| (d.option, d.value.clone(), d.id.as_deref()))
            .collect(),
    };
    for (option, value, id) in devices {
        let (field, list) = match option {
            "--disk" => ("disks", true),
            "--net" => ("net", true),
            "--fs" => ("fs", true),
            "--generic-vhost-user" => ("generic_vhost_user", true),
            "--rng" => ("rng", false),
            "--vsock" => ("vsock", false),
            _ => continue,
        };
        let mut device = body::option_json(option, &value);
        if let Some(id) = id {
            device.insert("id".into(), json!(id));
        }
        if list {
            if !out[field].is_array() {
                out[field] = json!([]);
            }
            if let Some(items) = out[field].as_array_mut() {
                items.push(Value::Object(device));
            }
        } else {
            out[field] = Value::Object(device);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/api.yaml lists exactly the endpoints served, with their methods.
    #[test]
    fn the_spec_and_the_server_agree() {
        let spec = include_str!("../../../docs/api.yaml");
        let mut documented = Vec::new();
        let mut path = None;
        for line in spec.lines() {
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(p.to_string());
            } else if let Some(p) = &path {
                let method = line.trim().trim_end_matches(':');
                if line.starts_with("    ") && !line.starts_with("     ") {
                    documented.push((p.clone(), method.to_ascii_uppercase()));
                }
            }
            if !line.starts_with(' ') && !line.is_empty() {
                path = None;
            }
        }
        let served: Vec<(String, String)> = ENDPOINTS
            .iter()
            .map(|(e, m)| (e.to_string(), m.to_string()))
            .collect();
        assert_eq!(documented, served);
    }

    #[test]
    fn no_endpoint_is_both_served_and_not() {
        for (endpoint, _) in ENDPOINTS {
            assert!(!NOT_SERVED.contains(endpoint), "{endpoint}");
        }
    }
}

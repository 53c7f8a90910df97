//! The command line and the validated VM configuration built from it.
//!
//! Parsing is pure (the host's RAM size is passed in) so every rule is unit-tested; opening
//! files happens when the VM is built, but failures there are still reported as
//! [`ConfigError`]s naming the option.

pub mod cpus;
pub mod device;
pub mod kv;
pub mod memory;
pub mod serial;
pub mod size;

use std::io;
use std::path::PathBuf;

use clap::Parser;
pub use cloister_seccomp::SeccompMode;
use thiserror::Error;

pub use cpus::{CpusConfig, CpusError};
pub use device::{OptionError, TransportKind};
pub use memory::{MemoryConfig, MemoryOptionError};
pub use serial::{SerialConfig, SerialError};

use crate::boot::{InitramfsError, KernelError};
use crate::kinds::{self, Backend, DeviceSpec};

/// Default guest command line: the console on the first UART, which is all a guest needs to
/// talk to us. Anything else is the user's choice.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// Cloister: a minimal KVM virtual machine monitor.
///
/// Boots a Linux kernel (an ELF vmlinux through its PVH entry point, or a bzImage through the
/// 64-bit boot protocol) with the guest's first serial port on this terminal.
#[derive(Debug, Parser)]
#[command(name = "cloister", version, about, long_about)]
pub struct Cli {
    /// Guest kernel: an uncompressed ELF vmlinux with a PVH entry note (CONFIG_PVH=y), or a
    /// bzImage. The format is detected from the file's contents. Required unless
    /// --api-socket is given: then cloister waits for the API's vm.create and vm.boot.
    #[arg(long, value_name = "PATH", required_unless_present = "api_socket")]
    pub kernel: Option<PathBuf>,

    /// Initramfs (cpio archive, optionally compressed) handed to the kernel as its initrd.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line, passed to the guest unchanged.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// vCPUs: boot=N starts N vCPUs (1 to 254, and no more than KVM allows).
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    pub cpus: String,

    /// Guest RAM: size=SIZE with a K, M, G or T suffix (binary units). RAM above 3G is placed
    /// above the 4G boundary. Memory is reserved lazily, so large sizes cost nothing until the
    /// guest touches them, but the size may not exceed the host's total RAM.
    #[arg(long, value_name = "size=SIZE", default_value = "size=512M")]
    pub memory: String,

    /// Guest serial console (ttyS0): "tty" connects it to this process's stdout and stdin (the
    /// terminal is put in raw mode while the guest runs, so Ctrl-C goes to the guest; run in
    /// the background of its terminal, cloister leaves stdin alone), "off"
    /// discards its output, "file=PATH" writes its output to PATH.
    #[arg(long, value_name = "tty|off|file=PATH", default_value = "tty")]
    pub serial: String,

    /// A virtio-blk disk served by a vhost-user-blk process; repeat for more disks (the guest
    /// sees them in order: vda, vdb, ...). "path=FILE" makes cloister start vhost-user-blk for
    /// the raw image FILE (with readonly=on|off, direct=on|off for O_DIRECT, serial=S) and stop
    /// it with the VM; "socket=PATH" connects to a backend someone else started. Every device
    /// option also takes id=ID (default _disk0, _fs1, ...: one counter for every kind),
    /// num_queues=N, queue_size=N (power of two, 2-1024, default 256) and transport=pci|mmio
    /// (default pci).
    #[arg(long, value_name = "path=FILE|socket=PATH[,...]")]
    pub disk: Vec<String>,

    /// A virtio-net NIC served by a vhost-user-net process; repeat for more NICs.
    /// "tap=NAME[,ip=A.B.C.D,mask=M.M.M.M][,host_mac=MAC][,mtu=N]" makes cloister open (or
    /// create) the tap NAME, with one queue per queue pair, configure its host side and start
    /// vhost-user-net with it, handing over the tap's descriptors (the backend needs no
    /// privilege); no tap= lets the kernel pick a name (vmtapN). "socket=PATH" (or
    /// "vhost_user=true,socket=PATH") connects to a backend someone else started (ours,
    /// OVS-DPDK, DPDK's net_vhost...); with vhost_mode=server cloister listens on PATH and waits
    /// (60 s, at start-up only) for the backend to connect. mac=MAC is the guest's (default: a
    /// stable, locally administered one), num_queues=N counts receive and transmit queues
    /// (even, default 2), offload_tso|offload_ufo|offload_csum=off turn offloads off. The
    /// control queue is the backend's: a backend without one gets one queue pair.
    #[arg(long, value_name = "tap=NAME|socket=PATH[,...]")]
    pub net: Vec<String>,

    /// A virtio-fs share: "tag=TAG,socket=PATH" connects to a virtiofsd someone else started
    /// (any standard one); "tag=TAG,path=DIR[,readonly=on][,cache=auto|always|never]" makes
    /// cloister start the Rust virtiofsd for DIR and stop it with the VM. num_queues=N is the
    /// number of request queues (default 1), queue_size=N defaults to 1024. The guest mounts
    /// it with `mount -t virtiofs TAG /mnt`.
    #[arg(long, value_name = "tag=TAG,socket=PATH|path=DIR[,...]")]
    pub fs: Vec<String>,

    /// An entropy device: "src=FILE" (default /dev/urandom) makes cloister start
    /// vhost-device-rng reading FILE; "socket=PATH" connects to an rng backend someone else
    /// started.
    #[arg(long, value_name = "src=FILE|socket=PATH")]
    pub rng: Option<String>,

    /// A virtio-vsock device with guest CID N (3 or more), served by vhost-device-vsock, which
    /// cloister starts: host programs connect to the unix socket PATH and send
    /// "CONNECT <port>\n" to reach a guest port; guest connections to host port P go to
    /// "PATH_P" (the hybrid vsock of Cloud Hypervisor and Firecracker; unlike Cloud
    /// Hypervisor's, the answer is "OK <guest port>"). For a vsock backend you run yourself,
    /// use --generic-vhost-user device_type=vsock.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    pub vsock: Option<String>,

    /// Any vhost-user device someone else started: device_type=NAME|NUMBER (net, blk,
    /// console, rng, fs, vsock, sound, gpio, i2c, ... or the virtio device ID),
    /// socket=PATH, queue_sizes=[N,...] (one per queue). Its config space comes from the
    /// backend (GET_CONFIG) when it offers one.
    #[arg(long, value_name = "device_type=T,socket=PATH,queue_sizes=[N,...]")]
    pub generic_vhost_user: Vec<String>,

    /// Seccomp filtering of cloister's threads, and of the backends it starts: "true" names
    /// a system call outside a thread's policy and kills the process (SIGSYS), "log" names it
    /// and lets it run, "false" installs no filter (with a warning). Landlock and dropping
    /// privileges apply in every mode.
    #[arg(long, value_enum, value_name = "true|log|false", default_value_t = SeccompMode::True)]
    pub seccomp: SeccompMode,

    /// How many times in a row a disk's or a NIC's backend may be lost within 1 s of coming
    /// back (a crash loop) before cloister gives up on it and marks its device as needing a
    /// reset; 0: never. (Not in Cloud Hypervisor, which gives up on a lost backend at once.)
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub backend_restarts: u32,

    /// Cloud Hypervisor's REST API (HTTP/1.1 under /api/v1/) on a Unix socket: "path=PATH"
    /// (or a bare PATH) creates it, mode 0600; "fd=N" serves a socket already bound and
    /// listening that cloister inherited. See docs/api.yaml for the endpoints served.
    #[arg(long, value_name = "path=PATH|fd=N")]
    pub api_socket: Option<String>,

    /// Writes what happens to the VMM and the VM (booting, booted, paused, shutdown, devices
    /// added and removed, backends lost and back) as one JSON object per line, with Cloud
    /// Hypervisor's event names: "path=PATH" (or a bare PATH) appends to PATH, "fd=N" writes to
    /// an inherited descriptor.
    #[arg(long, value_name = "path=PATH|fd=N")]
    pub event_monitor: Option<String>,
}

/// A user error: names the option and the value, and says what is wrong.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--cpus {value}")]
    Cpus {
        value: String,
        #[source]
        source: CpusError,
    },
    #[error("--cpus {value}: {requested} vCPUs requested, but KVM allows at most {max}")]
    CpusAboveKvmMax {
        value: String,
        requested: usize,
        max: usize,
    },
    #[error("--memory {value}")]
    Memory {
        value: String,
        #[source]
        source: MemoryOptionError,
    },
    #[error("--serial {value}")]
    Serial {
        value: String,
        #[source]
        source: SerialError,
    },
    #[error("--serial file={}: cannot create", path.display())]
    SerialFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no kernel: --kernel PATH (or the API's payload.kernel) is required")]
    NoKernel,
    #[error("--api-socket {value}: {why}")]
    ApiSocket { value: String, why: String },
    #[error("--event-monitor {value}: {why}")]
    EventMonitor { value: String, why: String },
    #[error("--kernel {}", path.display())]
    Kernel {
        path: PathBuf,
        #[source]
        source: KernelError,
    },
    #[error("--initramfs {}", path.display())]
    Initramfs {
        path: PathBuf,
        #[source]
        source: InitramfsError,
    },
    #[error("--cmdline: {len} bytes is longer than the kernel's limit of {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("--cmdline: contains a NUL byte")]
    CmdlineNul,
    #[error("{option} {value}")]
    Device {
        option: &'static str,
        value: String,
        #[source]
        source: OptionError,
    },
    #[error("{option} {value}: more than {max} devices with transport={transport}")]
    TooManyDevices {
        option: &'static str,
        value: String,
        max: usize,
        transport: &'static str,
    },
    #[error("{option} {value}: id '{id}' is taken by another device")]
    DuplicateId {
        option: &'static str,
        value: String,
        id: String,
    },
    #[error("{option} {value}: {key} is taken by another device")]
    DuplicateKey {
        option: &'static str,
        value: String,
        key: String,
    },
}

/// Everything needed to build the VM, validated.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub serial: SerialConfig,
    /// Every virtio device, in the order given (disks first, then shares, rng, vsock and
    /// generic devices).
    pub devices: Vec<DeviceSpec>,
    pub seccomp: SeccompMode,
    /// `--backend-restarts`.
    pub backend_restarts: u32,
}

/// PCI bus 0 has 31 free slots (the host bridge is 00.0).
pub const MAX_PCI_DEVICES: usize = 31;
/// One IOAPIC pin each: [`crate::layout::VIRTIO_MMIO_SLOTS`].
pub const MAX_MMIO_DEVICES: usize = crate::layout::VIRTIO_MMIO_SLOTS as usize;

impl VmConfig {
    /// Validates the command line. `host_ram` is the host's total RAM in bytes.
    pub fn from_cli(cli: &Cli, host_ram: u64) -> Result<Self, ConfigError> {
        let cpus = CpusConfig::parse(&cli.cpus).map_err(|source| ConfigError::Cpus {
            value: cli.cpus.clone(),
            source,
        })?;
        let memory =
            MemoryConfig::parse(&cli.memory, host_ram).map_err(|source| ConfigError::Memory {
                value: cli.memory.clone(),
                source,
            })?;
        let serial = SerialConfig::parse(&cli.serial).map_err(|source| ConfigError::Serial {
            value: cli.serial.clone(),
            source,
        })?;
        if cli.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let devices = parse_devices(cli)?;
        let kernel = cli.kernel.clone().ok_or(ConfigError::NoKernel)?;
        Ok(VmConfig {
            kernel,
            initramfs: cli.initramfs.clone(),
            cmdline: cli.cmdline.clone(),
            cpus,
            memory,
            serial,
            devices,
            seccomp: cli.seccomp,
            backend_restarts: cli.backend_restarts,
        })
    }

    /// Checks what the user named on the host (disk images, shared directories), before
    /// anything is started.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for d in &self.devices {
            let Backend::Managed(profile) = &d.backend else {
                continue;
            };
            for path in &profile.paths {
                path.check().map_err(|source| ConfigError::Device {
                    option: d.option,
                    value: d.value.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

type KindParser = fn(&str, SeccompMode) -> Result<DeviceSpec, OptionError>;

/// Every device option, each by its kind's parser; then the limits that span options: ids
/// are unique, and each transport has room.
fn parse_devices(cli: &Cli) -> Result<Vec<DeviceSpec>, ConfigError> {
    let options: [(&'static str, &[String], KindParser); 6] = [
        (kinds::blk::OPTION, &cli.disk, kinds::blk::parse),
        (kinds::net::OPTION, &cli.net, kinds::net::parse),
        (kinds::fs::OPTION, &cli.fs, kinds::fs::parse),
        (kinds::rng::OPTION, cli.rng.as_slice(), kinds::rng::parse),
        (
            kinds::vsock::OPTION,
            cli.vsock.as_slice(),
            kinds::vsock::parse,
        ),
        (
            kinds::generic::OPTION,
            &cli.generic_vhost_user,
            kinds::generic::parse,
        ),
    ];
    let mut devices: Vec<DeviceSpec> = Vec::new();
    let (mut pci, mut mmio) = (0, 0);
    for (option, values, parse) in options {
        for value in values {
            let d = parse(value, cli.seccomp).map_err(|source| ConfigError::Device {
                option,
                value: value.clone(),
                source,
            })?;
            if let Some(id) = &d.id {
                if devices.iter().any(|o| o.id.as_ref() == Some(id)) {
                    return Err(ConfigError::DuplicateId {
                        option,
                        value: value.clone(),
                        id: id.clone(),
                    });
                }
            }
            if let Some(key) = d.kind.unique_key() {
                let taken = devices.iter().any(|o| {
                    o.kind.kind_name() == d.kind.kind_name()
                        && o.kind.unique_key().as_ref() == Some(&key)
                });
                if taken {
                    return Err(ConfigError::DuplicateKey {
                        option,
                        value: value.clone(),
                        key,
                    });
                }
            }
            let (count, max) = match d.transport {
                TransportKind::Pci => (&mut pci, MAX_PCI_DEVICES),
                TransportKind::Mmio => (&mut mmio, MAX_MMIO_DEVICES),
            };
            *count += 1;
            if *count > max {
                return Err(ConfigError::TooManyDevices {
                    option,
                    value: value.clone(),
                    max,
                    transport: d.transport.as_str(),
                });
            }
            devices.push(d);
        }
    }
    Ok(devices)
}

/// The host's total RAM in bytes, from sysinfo(2).
pub fn host_ram_bytes() -> io::Result<u64> {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a properly sized struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // totalram is u32 on 32-bit targets
    let total = u64::from(info.totalram);
    Ok(total.saturating_mul(u64::from(info.mem_unit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["cloister", "--kernel", "/k"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults() {
        let cfg = VmConfig::from_cli(&cli(&[]), 24 << 30).unwrap();
        assert_eq!(cfg.cpus.boot, 1);
        assert_eq!(cfg.memory.size, 512 << 20);
        assert_eq!(cfg.serial, SerialConfig::Tty);
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
        assert_eq!(cfg.initramfs, None);
        assert_eq!(cfg.seccomp, SeccompMode::True);
        let cfg = VmConfig::from_cli(&cli(&["--seccomp", "log"]), 24 << 30).unwrap();
        assert_eq!(cfg.seccomp, SeccompMode::Log);
        assert!(Cli::try_parse_from(["cloister", "--kernel", "/k", "--seccomp", "maybe"]).is_err());
    }

    #[test]
    fn errors_name_the_option() {
        let chain = |e: &dyn std::error::Error| {
            let mut s = e.to_string();
            let mut src = e.source();
            while let Some(e) = src {
                s.push_str(": ");
                s.push_str(&e.to_string());
                src = e.source();
            }
            s
        };
        let e = VmConfig::from_cli(&cli(&["--cpus", "boot=0"]), 1 << 30).unwrap_err();
        assert_eq!(chain(&e), "--cpus boot=0: boot must be at least 1");
        let e = VmConfig::from_cli(&cli(&["--memory", "size=0"]), 1 << 30).unwrap_err();
        assert_eq!(chain(&e), "--memory size=0: size must be greater than 0");
        let e = VmConfig::from_cli(&cli(&["--serial", "bogus"]), 1 << 30).unwrap_err();
        assert!(chain(&e).starts_with("--serial bogus: 'bogus' is not a serial mode"));
        let e = VmConfig::from_cli(&cli(&["--disk", "path=/a,num_queues=0"]), 1 << 30).unwrap_err();
        assert_eq!(
            chain(&e),
            "--disk path=/a,num_queues=0: num_queues: 0 is out of range (1 to 64)"
        );
    }

    #[test]
    fn devices_in_order_and_per_transport_limits() {
        let cfg = VmConfig::from_cli(
            &cli(&[
                "--disk",
                "path=/a",
                "--disk",
                "socket=/s,transport=mmio",
                "--fs",
                "tag=t,socket=/f",
            ]),
            1 << 30,
        )
        .unwrap();
        assert_eq!(cfg.devices.len(), 3);
        assert_eq!(cfg.devices[0].value, "path=/a");
        assert_eq!(cfg.devices[1].transport, TransportKind::Mmio);
        assert_eq!(cfg.devices[2].option, "--fs");
        let mut args = Vec::new();
        for _ in 0..9 {
            args.extend(["--disk", "socket=/s,transport=mmio"]);
        }
        let e = VmConfig::from_cli(&cli(&args), 1 << 30).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--disk socket=/s,transport=mmio: more than 8 devices with transport=mmio"
        );
        let e = VmConfig::from_cli(&cli(&["--disk", "path=/nonexistent/x"]), 1 << 30)
            .unwrap()
            .check_files()
            .unwrap_err();
        assert!(matches!(e, ConfigError::Device { .. }));
    }

    #[test]
    fn ids_are_unique_across_kinds() {
        let e = VmConfig::from_cli(
            &cli(&["--disk", "path=/a,id=x", "--fs", "tag=t,socket=/f,id=x"]),
            1 << 30,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--fs tag=t,socket=/f,id=x: id 'x' is taken by another device"
        );
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

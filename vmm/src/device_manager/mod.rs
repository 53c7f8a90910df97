//! The device manager: every virtio device of the VM, whatever its kind, goes through here.
//! It names devices (`id=`, or `_disk0`, `_fs1`, ... from one counter, as Cloud Hypervisor
//! does), starts managed backends, connects to every backend, places the device (PCI slot and
//! BAR, or a virtio-mmio slot: [`placement`]), watches backends while the guest runs, and takes
//! devices out again, giving back everything they held.
//!
//! Two phases at start-up, so managed backends start while the VM is being built:
//! [`DeviceManager::new`] starts them (right after the options are checked),
//! [`DeviceManager::attach`] connects and plugs every device once guest memory and the buses
//! exist. [`DeviceManager::add`] and [`DeviceManager::remove`] do the same for one device
//! while the VM runs.

mod device;
pub mod placement;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cloister_seccomp::landlock::Rules;
use thiserror::Error;

pub use self::device::Place;
use self::device::{Device, Plugged};
use self::placement::{Placement, PlacementError};
use crate::devices::{Bus, BusError};
use crate::kinds::{Backend, DeviceSpec};
use crate::layout::{VirtioMmioSlot, VIRTIO_MMIO_SIZE};
use crate::memory::GuestMemoryMmap;
use crate::supervisor::{self, ManagedProcess, ProcessError, RuntimeDir};
use crate::vhost_user::connection::{self, ConnectionError};
use crate::vhost_user::control::Failures;
use crate::vhost_user::{Connection, VhostUserDevice};
use crate::virtio::mmio_transport::{MmioTransportError, VirtioMmioDevice};
use crate::virtio::pci_transport::{self, PciTransportError, VirtioPciDevice};
use crate::virtio::VirtioTransport;
use crate::vm_ops::VmOps;

/// How long a backend's socket may take to appear and accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a hang-up, how long to wait for a managed backend's exit status, so the one line we
/// log says how it ended.
const EXIT_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum DeviceManagerError {
    #[error("cannot create a directory for backend sockets")]
    RuntimeDir(#[source] io::Error),
    #[error(transparent)]
    Program(ProcessError),
    #[error("{0}")]
    Spawn(String, #[source] ProcessError),
    #[error("{0}")]
    Connect(String, #[source] ConnectionError),
    #[error("{0}")]
    Place(String, #[source] PlacementError),
    #[error("{0}")]
    Pci(String, #[source] PciTransportError),
    #[error("{0}")]
    Mmio(String, #[source] MmioTransportError),
    #[error("{0}")]
    Bus(String, #[source] BusError),
    #[error("{0}: cannot watch its control thread")]
    Failures(String, #[source] io::Error),
    #[error("a device with id '{0}' exists already")]
    DuplicateId(String),
    #[error("no device with id '{0}'")]
    NoSuchDevice(String),
    #[error("{0}: virtio-mmio devices are described to the guest at boot; only PCI devices can be added to a running VM")]
    MmioAtRunTime(String),
}

/// What plugging devices in needs from the VM: its memory, KVM and the buses.
pub struct Buses {
    pub memory: GuestMemoryMmap,
    pub vm: Arc<dyn VmOps>,
    pub mmio_bus: Arc<Bus>,
    pub placement: Placement,
}

/// Something the main loop waits for, on the device with that serial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Its backend's socket hung up.
    Socket(u64),
    /// Its managed backend process exited.
    Process(u64),
    /// Its control thread reported a failure.
    Failure(u64),
}

/// A device as the rest of the VMM (and later the API) sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: String,
    pub kind: &'static str,
    /// "0000:00:05.0", or "mmio@0xf0000000".
    pub address: String,
}

pub struct DeviceManager {
    devices: Vec<Device>,
    /// Default ids count up across every kind, as Cloud Hypervisor's do.
    next_default: usize,
    next_serial: u64,
    buses: Option<Buses>,
    /// Dropped after `devices` (field order), so processes are stopped before their sockets'
    /// directory goes.
    runtime_dir: Option<RuntimeDir>,
}

impl DeviceManager {
    /// Names every device and starts the backend of every managed one. Ids were checked for
    /// duplicates with the options.
    pub fn new(specs: &[DeviceSpec]) -> Result<Self, DeviceManagerError> {
        let mut manager = DeviceManager {
            devices: Vec::with_capacity(specs.len()),
            next_default: 0,
            next_serial: 0,
            buses: None,
            runtime_dir: None,
        };
        for spec in specs {
            manager.launch(spec.clone())?;
        }
        Ok(manager)
    }

    /// An unused default id for a device of `kind`.
    fn default_id(&mut self, kind: &str) -> String {
        loop {
            let id = format!("_{kind}{}", self.next_default);
            self.next_default += 1;
            if !self.devices.iter().any(|d| d.id == id) {
                return id;
            }
        }
    }

    /// Records the device and starts its backend if it is managed; not connected yet.
    fn launch(&mut self, spec: DeviceSpec) -> Result<usize, DeviceManagerError> {
        let id = match &spec.id {
            Some(id) if self.devices.iter().any(|d| &d.id == id) => {
                return Err(DeviceManagerError::DuplicateId(id.clone()))
            }
            Some(id) => id.clone(),
            None => self.default_id(spec.kind.kind_name()),
        };
        let (socket_path, program) = match &spec.backend {
            Backend::Socket(p) => (p.clone(), None),
            Backend::Managed(profile) => {
                let dir = match &self.runtime_dir {
                    Some(d) => d,
                    None => self
                        .runtime_dir
                        .insert(RuntimeDir::create().map_err(DeviceManagerError::RuntimeDir)?),
                };
                let program = supervisor::find_program(&profile.program)
                    .map_err(DeviceManagerError::Program)?;
                (dir.path().join(format!("{id}.sock")), Some(program))
            }
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        let mut device = Device {
            serial,
            id,
            spec,
            socket_path,
            process: None,
            socket: None,
            process_watched: false,
            plugged: None,
            failed: false,
        };
        if let Some(program) = program {
            let args: Vec<OsString> = device.backend_args();
            let p = ManagedProcess::spawn(&program, &args)
                .map_err(|e| DeviceManagerError::Spawn(device.label(), e))?;
            device.process = Some(p);
            device.process_watched = true;
            // Where the backend really listens (some add a suffix to the path they are given).
            if let Backend::Managed(profile) = &device.spec.backend {
                let mut listening = device.socket_path.clone().into_os_string();
                listening.push(&profile.socket_suffix);
                device.socket_path = PathBuf::from(listening);
            }
        }
        self.devices.push(device);
        Ok(self.devices.len() - 1)
    }

    /// What the main thread may still reach once the VM runs: the backends' sockets (for the
    /// reconnection to come, enforced from Landlock ABI 9), and the runtime directory, to
    /// remove it at exit; in its parent, only removing the (by then empty) directory itself.
    /// Signals to processes outside the domain stay allowed: the backends must be stopped.
    pub fn landlock_rules(&self) -> Rules {
        let mut rules = Rules::new().allow_signals_outside();
        if let Some(dir) = &self.runtime_dir {
            rules = rules
                .read_dir(dir.path())
                .remove_entries(dir.path())
                .connect_unix(dir.path());
            if let Some(parent) = dir.path().parent() {
                rules = rules.remove_subdirectories(parent);
            }
        }
        for d in &self.devices {
            if matches!(d.spec.backend, Backend::Socket(_)) {
                // The directory: a restarted backend makes a new socket file (a new inode).
                let dir = d.socket_path.parent().filter(|p| !p.as_os_str().is_empty());
                rules = rules.connect_unix(dir.unwrap_or(&d.socket_path));
            }
        }
        rules
    }

    /// Connects to every backend and plugs its device in. Returns the virtio-mmio slots used,
    /// for the DSDT.
    pub fn attach(&mut self, buses: Buses) -> Result<Vec<VirtioMmioSlot>, DeviceManagerError> {
        self.buses = Some(buses);
        for n in 0..self.devices.len() {
            self.plug(n)?;
        }
        Ok(self
            .devices
            .iter()
            .filter_map(|d| match d.plugged.as_ref().map(|p| &p.place) {
                Some(Place::Mmio(slot)) => Some(*slot),
                _ => None,
            })
            .collect())
    }

    /// Adds a device to the running VM (PCI only); returns what it became.
    pub fn add(&mut self, spec: DeviceSpec) -> Result<DeviceInfo, DeviceManagerError> {
        if spec.transport == crate::config::device::TransportKind::Mmio {
            return Err(DeviceManagerError::MmioAtRunTime(spec.value.clone()));
        }
        let n = self.launch(spec)?;
        if let Err(e) = self.plug(n) {
            let mut d = self.devices.remove(n);
            d.stop_backend();
            self.remove_socket_file(&d);
            return Err(e);
        }
        Ok(self.info(&self.devices[n]))
    }

    /// Takes a device out of the VM: stops its queues, unplugs it, stops a managed backend,
    /// and gives back its slot, BAR, vectors and socket.
    pub fn remove(&mut self, id: &str) -> Result<(), DeviceManagerError> {
        let n = self
            .devices
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| DeviceManagerError::NoSuchDevice(id.to_string()))?;
        let mut d = self.devices.remove(n);
        if let Some(plugged) = d.plugged.take() {
            plugged.transport.unplug();
            if let Some(buses) = self.buses.as_mut() {
                match &plugged.place {
                    Place::Pci { slot, bar } => {
                        buses.placement.unplug_pci(*slot);
                        buses.placement.free_bar(bar);
                    }
                    Place::Mmio(slot) => {
                        let _ = buses.mmio_bus.remove(slot.base);
                        buses.placement.free_mmio(slot);
                    }
                }
            }
            // Dropping the last reference ends the control thread and the connection, and
            // gives the MSI-X GSIs back.
        }
        d.disconnect();
        d.stop_backend();
        self.remove_socket_file(&d);
        Ok(())
    }

    /// A managed backend's socket file, which a killed backend leaves behind.
    fn remove_socket_file(&self, d: &Device) {
        if matches!(d.spec.backend, Backend::Managed(_)) {
            let _ = std::fs::remove_file(&d.socket_path);
        }
    }

    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(|d| self.info(d)).collect()
    }

    fn info(&self, d: &Device) -> DeviceInfo {
        DeviceInfo {
            id: d.id.clone(),
            kind: d.spec.kind.kind_name(),
            address: match d.plugged.as_ref().map(|p| &p.place) {
                Some(Place::Pci { slot, .. }) => format!("0000:00:{slot:02x}.0"),
                Some(Place::Mmio(slot)) => format!("mmio@{:#x}", slot.base),
                None => String::new(),
            },
        }
    }

    /// Connects to device `n`'s backend and puts the device on PCI or MMIO.
    fn plug(&mut self, n: usize) -> Result<(), DeviceManagerError> {
        let Some(buses) = self.buses.as_mut() else {
            return Ok(());
        };
        let d = &mut self.devices[n];
        // An error here is reported by our caller, with the label: nothing more to say when
        // the process is stopped.
        d.failed = true;
        let label = d.label();
        let name = d.id.clone();
        let queues = u16::try_from(d.spec.queue_sizes.len()).unwrap_or(u16::MAX);
        let connect_error = |e| DeviceManagerError::Connect(label.clone(), e);
        let stream = {
            let process = &mut d.process;
            connection::connect(&d.socket_path, CONNECT_TIMEOUT, &mut || match process
                .as_mut()
                .and_then(ManagedProcess::try_wait)
            {
                Some(s) => Err(format!(
                    "the backend exited with {} before its socket appeared",
                    supervisor::describe(s)
                )),
                None => Ok(()),
            })
            .map_err(connect_error)?
        };
        let conn = Connection::new(stream, &name, queues).map_err(connect_error)?;
        let socket = conn
            .socket_dup()
            .map_err(|e| connect_error(ConnectionError::Setup(e)))?;
        let failures =
            Failures::new().map_err(|e| DeviceManagerError::Failures(label.clone(), e))?;
        let device = VhostUserDevice::new(
            &name,
            d.spec.kind.clone(),
            conn,
            buses.memory.clone(),
            d.spec.queue_sizes.clone(),
            failures.clone(),
        )
        .map_err(connect_error)?;
        let (transport, place): (Arc<dyn VirtioTransport>, Place) = match d.spec.transport {
            crate::config::device::TransportKind::Pci => {
                let bar = buses
                    .placement
                    .allocate_bar(pci_transport::BAR_SIZE)
                    .map_err(|e| DeviceManagerError::Place(label.clone(), e))?;
                let plugged = VirtioPciDevice::new(
                    &name,
                    Box::new(device),
                    bar.start(),
                    buses.vm.clone(),
                    buses.mmio_bus.clone(),
                )
                .map_err(|e| DeviceManagerError::Pci(label.clone(), e))
                .and_then(|dev| {
                    let slot = buses
                        .placement
                        .plug_pci(dev.clone())
                        .map_err(|e| DeviceManagerError::Place(label.clone(), e))?;
                    Ok((dev, slot))
                });
                match plugged {
                    Ok((dev, slot)) => (dev, Place::Pci { slot, bar }),
                    Err(e) => {
                        buses.placement.free_bar(&bar);
                        return Err(e);
                    }
                }
            }
            crate::config::device::TransportKind::Mmio => {
                let slot = buses
                    .placement
                    .allocate_mmio()
                    .map_err(|e| DeviceManagerError::Place(label.clone(), e))?;
                let plugged = VirtioMmioDevice::new(
                    &name,
                    Box::new(device),
                    slot.base,
                    slot.gsi,
                    buses.vm.clone(),
                )
                .map(Arc::new)
                .map_err(|e| DeviceManagerError::Mmio(label.clone(), e))
                .and_then(|dev| {
                    buses
                        .mmio_bus
                        .insert(dev.clone(), slot.base, VIRTIO_MMIO_SIZE)
                        .map_err(|e| DeviceManagerError::Bus(label.clone(), e))?;
                    Ok(dev)
                });
                match plugged {
                    Ok(dev) => (dev, Place::Mmio(slot)),
                    Err(e) => {
                        buses.placement.free_mmio(&slot);
                        return Err(e);
                    }
                }
            }
        };
        d.socket = Some(socket);
        d.plugged = Some(Plugged {
            transport,
            place,
            failures,
        });
        d.failed = false;
        Ok(())
    }

    /// Descriptors for the main loop to poll, with poll(2) event bits.
    pub fn watches(&self) -> Vec<(RawFd, libc::c_short, Watch)> {
        let mut v = Vec::new();
        for d in &self.devices {
            if let Some(s) = &d.socket {
                // Hang-up only: replies to requests are read by whoever made them.
                v.push((s.as_raw_fd(), libc::POLLRDHUP, Watch::Socket(d.serial)));
            }
            if let (true, Some(p)) = (d.process_watched, &d.process) {
                v.push((p.pidfd(), libc::POLLIN, Watch::Process(d.serial)));
            }
            if let Some(p) = &d.plugged {
                v.push((
                    p.failures.event.as_raw_fd(),
                    libc::POLLIN,
                    Watch::Failure(d.serial),
                ));
            }
        }
        v
    }

    pub fn on_event(&mut self, watch: Watch) {
        let serial = match watch {
            Watch::Socket(s) | Watch::Process(s) | Watch::Failure(s) => s,
        };
        let Some(d) = self.devices.iter_mut().find(|d| d.serial == serial) else {
            return;
        };
        match watch {
            Watch::Socket(_) => {
                // Poll reports a hang-up until the descriptor goes: stop watching it.
                d.socket = None;
                let exited = d.process.as_mut().and_then(|p| p.wait_timeout(EXIT_GRACE));
                match exited {
                    Some(s) => {
                        d.process_watched = false;
                        d.fail(&format!("backend exited with {}", supervisor::describe(s)));
                    }
                    None => d.fail("backend disconnected"),
                }
            }
            Watch::Process(_) => {
                d.process_watched = false;
                let status = d.process.as_mut().and_then(ManagedProcess::try_wait);
                let what = match status {
                    Some(s) => format!("backend exited with {}", supervisor::describe(s)),
                    None => "backend exited".to_string(),
                };
                if d.failed {
                    // Already reported as a disconnection; how it ended is still worth a line.
                    eprintln!("cloister: {}: {what}", d.label());
                } else {
                    d.fail(&what);
                }
            }
            Watch::Failure(_) => {
                let said = d
                    .plugged
                    .as_ref()
                    .map(|p| p.failures.take())
                    .unwrap_or_default();
                for what in said {
                    // The first failure marks the device; later ones are still news.
                    if d.failed {
                        eprintln!("cloister: {}: {what}", d.label());
                    } else {
                        d.fail(&what);
                    }
                }
            }
        }
    }

    /// Ends every backend connection (without closing descriptors the devices still own): a
    /// request to a backend that takes its time returns at once, so the VM can stop without
    /// waiting out its deadline.
    pub fn disconnect(&self) {
        for d in &self.devices {
            d.disconnect();
        }
    }

    /// Stops the managed backends (SIGTERM, then SIGKILL) and reaps them.
    pub fn shutdown(&mut self) {
        for d in &mut self.devices {
            d.stop_backend();
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

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
pub mod hotplug;
pub mod placement;
mod plug;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloister_seccomp::landlock::Rules;
use thiserror::Error;

pub use self::device::Place;
use self::device::{Device, Plugged, Recovery};
use self::placement::{Placement, PlacementError};
use crate::devices::{Bus, BusError};
use crate::kinds::{Backend, DeviceSpec};
use crate::layout::VirtioMmioSlot;
use crate::memory::GuestMemoryMmap;
use crate::supervisor::{self, ProcessError, RuntimeDir, SpawnedProcess, Spawner};
use crate::vhost_user::connection::{BackendListener, ConnectionError};
use crate::vhost_user::control::ControlHandle;
use crate::virtio::driver_log::DriverLog;
use crate::virtio::mmio_transport::MmioTransportError;
use crate::virtio::pci_transport::PciTransportError;
use crate::vm_ops::VmOps;
use vmm_sys_util::eventfd::EventFd;

/// How long a backend's socket may take to appear and accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a hang-up, how long to wait for a managed backend's exit status, so the one line we
/// log says how it ended.
const EXIT_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum DeviceManagerError {
    #[error("cannot create a directory for backend sockets")]
    RuntimeDir(#[source] io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
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
    #[error("{0} is taken by another device")]
    DuplicateKey(String),
    #[error("no device with id '{0}'")]
    NoSuchDevice(String),
    #[error("{0}: virtio-mmio devices are described to the guest at boot; only PCI devices can be added to a running VM")]
    MmioAtRunTime(String),
    #[error("{0}: a virtio-mmio device is described to the guest at boot and cannot be removed from a running VM")]
    MmioRemoval(String),
    #[error("{0}: cloister listens for a backend (vhost_mode=server) only at start-up: its sandbox has no rule for a socket directory named later")]
    ListenAtRunTime(String),
    #[error("the VM is stopping")]
    Closed,
}

/// What the devices of the VM hold (see [`DeviceManager::resources`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resources {
    pub devices: usize,
    /// PCI functions, the host bridge included.
    pub pci_devices: usize,
    /// GSIs allocated for MSI-X vectors.
    pub gsis: usize,
    /// Managed backend processes.
    pub backends: usize,
}

/// A device taken out of the list and off the bus; what remains to do without the lock.
struct Unplugged {
    device: Device,
    plugged: Option<Plugged>,
}

impl Unplugged {
    /// Stops its queues (a reset, as the guest's driver would), drops the transport (its
    /// control thread, connection and MSI-X vectors with it), stops a managed backend and
    /// removes its socket file. Returns where it was, for [`DeviceManager::release`].
    fn finish(mut self) -> Option<Place> {
        let place = self.plugged.take().map(|p| {
            p.transport.unplug();
            p.place
        });
        self.device.disconnect();
        self.device.stop_backend();
        if matches!(self.device.spec.backend, Backend::Managed(_)) {
            let _ = std::fs::remove_file(&self.device.socket_path);
        }
        place
    }
}

/// How the rest of the VMM sees a device.
fn info(d: &Device) -> DeviceInfo {
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
    /// A device came or went: what to watch has changed.
    Changed,
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

/// A device as the control plane reports it.
#[derive(Clone, Debug)]
pub struct DeviceStatus {
    pub info: DeviceInfo,
    /// The option that made it (`--disk`) and its value, as given.
    pub option: &'static str,
    pub value: String,
    /// Backends lost, and found again, since it was plugged.
    pub losses: u64,
    pub recoveries: u64,
}

pub struct DeviceManager {
    devices: Vec<Device>,
    /// `--backend-restarts`: quick losses in a row after which a backend is given up.
    crash_limit: u32,
    /// Starts managed backends (a process of its own: see [`supervisor::spawner`]); gone once
    /// the VM stops.
    spawner: Option<Arc<Spawner>>,
    /// Default ids count up across every kind, as Cloud Hypervisor's do.
    next_default: usize,
    next_serial: u64,
    buses: Option<Buses>,
    /// Set when the VM stops: nothing more is added.
    closed: bool,
    /// Signalled when a device comes or goes, so the main loop, asleep in poll(2) on the old
    /// list, looks again.
    changed: EventFd,
    /// Dropped after `devices` (field order), so processes are stopped before their sockets'
    /// directory goes.
    runtime_dir: Option<RuntimeDir>,
}

impl DeviceManager {
    /// Names every device and starts the backend of every managed one. Ids were checked for
    /// duplicates with the options. The runtime directory is made now, whatever the devices:
    /// once the sandbox is up, none can be made for a managed device added later.
    /// `crash_limit`: quick losses in a row after which a backend is given up (0: never).
    pub fn new(
        specs: &[DeviceSpec],
        spawner: Arc<Spawner>,
        crash_limit: u32,
    ) -> Result<Self, DeviceManagerError> {
        let mut manager = DeviceManager {
            crash_limit,
            devices: Vec::with_capacity(specs.len()),
            spawner: Some(spawner),
            next_default: 0,
            next_serial: 0,
            buses: None,
            closed: false,
            changed: EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?,
            runtime_dir: Some(RuntimeDir::create().map_err(DeviceManagerError::RuntimeDir)?),
        };
        for spec in specs {
            let device = manager.launch(spec.clone())?;
            manager.devices.push(device);
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

    /// Names the device and starts its backend if it is managed; not connected yet, nor in the
    /// list.
    fn launch(&mut self, spec: DeviceSpec) -> Result<Device, DeviceManagerError> {
        if self.closed {
            return Err(DeviceManagerError::Closed);
        }
        let id = match &spec.id {
            Some(id) if self.devices.iter().any(|d| &d.id == id) => {
                return Err(DeviceManagerError::DuplicateId(id.clone()))
            }
            Some(id) => id.clone(),
            None => self.default_id(spec.kind.kind_name()),
        };
        if let Some(key) = spec.kind.unique_key() {
            let taken = self.devices.iter().any(|d| {
                d.spec.kind.kind_name() == spec.kind.kind_name()
                    && d.spec.kind.unique_key().as_ref() == Some(&key)
            });
            if taken {
                return Err(DeviceManagerError::DuplicateKey(key));
            }
        }
        let socket_path = match &spec.backend {
            Backend::Socket(p) | Backend::Listen(p) => p.clone(),
            Backend::Managed(_) => self
                .runtime_dir
                .as_ref()
                .ok_or(DeviceManagerError::Closed)?
                .path()
                .join(format!("{id}.sock")),
        };
        let serial = self.next_serial;
        self.next_serial += 1;
        let id_for_log = id.clone();
        let mut device = Device {
            serial,
            id,
            spec,
            socket_path,
            process: None,
            spawn_args: Vec::new(),
            socket: None,
            process_watched: false,
            plugged: None,
            failed: false,
            recovery: None,
            losses: 0,
            recoveries: 0,
            last_recovered: None,
            crash_streak: 0,
            later_failures: DriverLog::new(&id_for_log),
        };
        if let Backend::Managed(profile) = &device.spec.backend {
            let args: Vec<OsString> = device.backend_args();
            let p = self
                .spawner
                .as_ref()
                .ok_or(DeviceManagerError::Closed)?
                .spawn(&profile.program, &args, profile.tap.as_ref())
                .map_err(|e| DeviceManagerError::Spawn(device.label(), e))?;
            // Where the backend really listens (some add a suffix to the path they are given).
            let mut listening = device.socket_path.clone().into_os_string();
            listening.push(&profile.socket_suffix);
            device.socket_path = PathBuf::from(listening);
            device.process = Some(p);
            device.process_watched = true;
            device.spawn_args = args;
        }
        Ok(device)
    }

    /// What the main thread may still reach once the VM runs: the backends' sockets (for the
    /// reconnection to come, enforced from Landlock ABI 9), and the runtime directory, to
    /// remove it at exit; in its parent, only removing the (by then empty) directory itself.
    /// No signals leave the domain: the spawner stops the backends.
    pub fn landlock_rules(&self) -> Rules {
        let mut rules = Rules::new();
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
            let dir = d.socket_path.parent().filter(|p| !p.as_os_str().is_empty());
            match &d.spec.backend {
                // The directory: a restarted backend makes a new socket file (a new inode).
                Backend::Socket(_) => rules = rules.connect_unix(dir.unwrap_or(&d.socket_path)),
                // Listened on again when the backend is lost.
                Backend::Listen(_) => {
                    rules = rules.listen_unix(dir.unwrap_or(std::path::Path::new(".")))
                }
                _ => {}
            }
        }
        rules
    }

    /// Connects to every backend and plugs its device in, in order. Returns the virtio-mmio
    /// slots used, for the DSDT.
    pub fn attach(&mut self, buses: Buses) -> Result<Vec<VirtioMmioSlot>, DeviceManagerError> {
        let memory = buses.memory.clone();
        self.buses = Some(buses);
        // A device that fails drops the rest (their backends are stopped).
        for d in std::mem::take(&mut self.devices) {
            let connected = plug::connect(d, &memory)?;
            self.place(connected)?;
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

    /// Puts a connected device on PCI or MMIO and into the list.
    fn place(&mut self, c: plug::Connected) -> Result<DeviceInfo, DeviceManagerError> {
        if self.closed {
            return Err(DeviceManagerError::Closed);
        }
        let buses = self.buses.as_mut().ok_or(DeviceManagerError::Closed)?;
        let device = plug::place(c, buses)?;
        let info = info(&device);
        self.devices.push(device);
        let _ = self.changed.write(1);
        Ok(info)
    }

    /// Takes device `id` out of the list and off the PCI bus (the guest no longer finds it);
    /// [`Unplugged::finish`] does the rest, without the manager's lock.
    fn take_out(&mut self, id: &str) -> Result<Unplugged, DeviceManagerError> {
        let n = self
            .devices
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| DeviceManagerError::NoSuchDevice(id.to_string()))?;
        let mut device = self.devices.remove(n);
        let plugged = device.plugged.take();
        if let (Some(p), Some(buses)) = (&plugged, self.buses.as_mut()) {
            match &p.place {
                Place::Pci { slot, .. } => buses.placement.unplug_pci(*slot),
                Place::Mmio(slot) => {
                    let _ = buses.mmio_bus.remove(slot.base);
                }
            }
        }
        let _ = self.changed.write(1);
        Ok(Unplugged { device, plugged })
    }

    /// Gives back what an unplugged device held in the VM's address space.
    fn release(&mut self, place: &Place) {
        if let Some(buses) = self.buses.as_mut() {
            match place {
                Place::Pci { bar, .. } => buses.placement.free_bar(bar),
                Place::Mmio(slot) => buses.placement.free_mmio(slot),
            }
        }
    }

    /// Guest memory, for connecting a device added later.
    fn memory(&self) -> Result<GuestMemoryMmap, DeviceManagerError> {
        self.buses
            .as_ref()
            .map(|b| b.memory.clone())
            .ok_or(DeviceManagerError::Closed)
    }

    /// The directory of managed backends' sockets, until the VM stops.
    pub fn runtime_dir(&self) -> Option<PathBuf> {
        self.runtime_dir.as_ref().map(|d| d.path().to_path_buf())
    }

    /// The spawner process, parent of every managed backend.
    pub fn spawner_pid(&self) -> Option<libc::pid_t> {
        self.spawner.as_ref().map(|s| s.pid())
    }

    /// What the VM's devices hold, for tests that add and remove them.
    pub fn resources(&self) -> Resources {
        let buses = self.buses.as_ref();
        Resources {
            devices: self.devices.len(),
            pci_devices: buses.map_or(0, |b| b.placement.pci().len()),
            gsis: buses.map_or(0, |b| b.vm.gsis_in_use()),
            backends: self.devices.iter().filter(|d| d.process.is_some()).count(),
        }
    }

    /// Descriptors for the main loop to poll, with poll(2) event bits.
    pub fn watches(&self) -> Vec<(RawFd, libc::c_short, Watch)> {
        let mut v = vec![(self.changed.as_raw_fd(), libc::POLLIN, Watch::Changed)];
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
            Watch::Changed => {
                let _ = self.changed.read();
                return;
            }
            Watch::Socket(s) | Watch::Process(s) | Watch::Failure(s) => s,
        };
        let Some(d) = self.devices.iter_mut().find(|d| d.serial == serial) else {
            return;
        };
        // What the device's control thread said comes first: a backend that refuses a request
        // often hangs up right after, and the refusal is the news.
        let said = d
            .plugged
            .as_ref()
            .map(|p| p.failures.take())
            .unwrap_or_default();
        for what in said {
            if d.failed {
                // The device may have been reset and started again since: it needs a reset
                // again, whether or not the message is shown.
                d.later_failures.say(format_args!("{what}"));
                d.mark_broken();
            } else {
                d.fail(&what);
            }
        }
        match watch {
            Watch::Changed | Watch::Failure(_) => {}
            Watch::Socket(_) => {
                // Poll reports a hang-up until the descriptor goes: stop watching it.
                d.socket = None;
                let exited = d.process.as_mut().and_then(|p| p.wait_timeout(EXIT_GRACE));
                let what = match exited {
                    Some(s) => {
                        d.process_watched = false;
                        format!("backend exited with {}", supervisor::describe(s))
                    }
                    None => "backend disconnected".to_string(),
                };
                if d.recoverable() {
                    d.lose(&what, self.crash_limit);
                } else {
                    d.report(&what);
                }
            }
            Watch::Process(_) => {
                d.process_watched = false;
                let status = d.process.as_mut().and_then(SpawnedProcess::try_wait);
                let what = match status {
                    Some(s) => format!("backend exited with {}", supervisor::describe(s)),
                    None => "backend exited".to_string(),
                };
                if d.recoverable() {
                    d.lose(&what, self.crash_limit);
                } else {
                    // Perhaps reported as a disconnection already; how it ended is still worth
                    // a line.
                    d.report(&what);
                }
            }
        }
    }

    /// The earliest time a lost backend is to be sought again, for the main loop's wait.
    pub fn next_recovery(&self) -> Option<Instant> {
        self.devices
            .iter()
            .filter_map(|d| d.recovery.as_ref()?.next)
            .min()
    }

    /// The devices whose backend is due to be sought again (each now under way: not due
    /// again until [`DeviceManager::recovery_failed`]).
    pub fn due_recoveries(&mut self, now: Instant) -> Vec<u64> {
        let mut due = Vec::new();
        for d in &mut self.devices {
            if let Some(r) = d
                .recovery
                .as_mut()
                .filter(|r| r.next.is_some_and(|t| t <= now))
            {
                r.next = None;
                r.attempts += 1;
                due.push(d.serial);
            }
        }
        due
    }

    /// Where device `serial`'s backend is sought: its socket, label and queue count, and its
    /// control thread; None if it is not being sought.
    pub fn recovery_target(&mut self, serial: u64) -> Option<RecoveryTarget> {
        let d = self.devices.iter_mut().find(|d| d.serial == serial)?;
        let control = d.plugged.as_ref()?.control.clone()?;
        let required = d.spec.kind.required_queues(d.spec.queue_sizes.len());
        let server_mode = matches!(d.spec.backend, Backend::Listen(_));
        let label = d.label();
        let recovery = d.recovery.as_mut()?;
        // Listening from the first attempt until the backend is back.
        let listener = match (&recovery.listener, server_mode) {
            (Some(l), _) => Some(Arc::clone(l)),
            (None, true) => match BackendListener::bind(&d.socket_path) {
                Ok(l) => {
                    let l = Arc::new(l);
                    recovery.listener = Some(Arc::clone(&l));
                    Some(l)
                }
                Err(e) => {
                    if recovery.attempts <= 1 {
                        eprintln!("cloister: {label}: {}", crate::error_chain(&e));
                    }
                    None
                }
            },
            (None, false) => None,
        };
        Some(RecoveryTarget {
            managed: matches!(d.spec.backend, Backend::Managed(_)),
            server_mode,
            listener,
            socket: d.socket_path.clone(),
            id: d.id.clone(),
            queues: u16::try_from(required).unwrap_or(u16::MAX),
            control,
        })
    }

    /// Starts device `serial`'s managed backend again, as before, if its process is gone (one
    /// still running, which only hung up, is connected to again). Nothing for an operator's.
    pub fn respawn_if_gone(&mut self, serial: u64) -> Result<(), String> {
        if self.closed {
            return Err("the VM is stopping".into());
        }
        let Some(d) = self.devices.iter_mut().find(|d| d.serial == serial) else {
            return Ok(());
        };
        let Backend::Managed(profile) = &d.spec.backend else {
            return Ok(());
        };
        if let Some(p) = d.process.as_mut() {
            if p.try_wait().is_none() {
                return Ok(());
            }
        }
        let spawner = self.spawner.as_ref().ok_or("the VM is stopping")?;
        let p = spawner
            .spawn(&profile.program, &d.spawn_args, profile.tap.as_ref())
            .map_err(|e| crate::error_chain(&e))?;
        d.process = Some(p);
        d.process_watched = true;
        let _ = self.changed.write(1);
        Ok(())
    }

    /// Whether device `serial`'s managed backend is still running (an operator's: assumed).
    pub fn backend_alive(&mut self, serial: u64) -> Result<(), String> {
        let Some(d) = self.devices.iter_mut().find(|d| d.serial == serial) else {
            return Err("the device is gone".into());
        };
        match d.process.as_mut().and_then(SpawnedProcess::try_wait) {
            Some(s) => Err(format!(
                "the backend exited with {} before its socket appeared",
                supervisor::describe(s)
            )),
            None => Ok(()),
        }
    }

    /// Device `serial` has its new backend, whose connection `socket` is.
    pub fn recovered(&mut self, serial: u64, socket: OwnedFd) {
        if let Some(d) = self.devices.iter_mut().find(|d| d.serial == serial) {
            if let Some(r) = d.recovery.take() {
                d.recoveries += 1;
                d.last_recovered = Some(Instant::now());
                let ms = r.since.elapsed().as_millis();
                eprintln!(
                    "cloister: {}: backend back after {ms} ms (recovery {} of {})",
                    d.label(),
                    d.recoveries,
                    d.losses
                );
                crate::events::device(
                    "backend-recovered",
                    &d.id,
                    Some(serde_json::json!({ "ms": ms as u64 })),
                );
            }
            d.socket = Some(socket);
            let _ = self.changed.write(1);
        }
    }

    /// An attempt to reach device `serial`'s backend failed: `refused` (the backend is there
    /// but will not do) fails the device; otherwise the next attempt is scheduled.
    pub fn recovery_failed(&mut self, serial: u64, why: &str, refused: bool) {
        let Some(d) = self.devices.iter_mut().find(|d| d.serial == serial) else {
            return;
        };
        if refused {
            d.fail(&format!("the backend came back but is refused: {why}"));
        } else {
            let label = d.label();
            if let Some(r) = d.recovery.as_mut() {
                // Said once, then every 30 attempts (about a minute), not at every try.
                if r.attempts == 1 || r.attempts % 30 == 0 {
                    eprintln!(
                        "cloister: {label}: backend still away after {} s: {why}",
                        r.since.elapsed().as_secs()
                    );
                }
                r.next = Some(Instant::now() + Recovery::backoff(r.attempts));
            }
        }
        let _ = self.changed.write(1);
    }

    /// Ends every backend connection (without closing descriptors the devices still own): a
    /// request to a backend that takes its time returns at once, so the VM can stop without
    /// waiting out its deadline.
    pub fn disconnect(&self) {
        for d in &self.devices {
            d.disconnect();
        }
    }

    /// The PCI slot of device `id` (an error for an unknown id, `None` on virtio-mmio).
    pub fn pci_slot(&self, id: &str) -> Result<Option<u8>, DeviceManagerError> {
        let d = self
            .devices
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| DeviceManagerError::NoSuchDevice(id.to_string()))?;
        Ok(match d.plugged.as_ref().map(|p| &p.place) {
            Some(Place::Pci { slot, .. }) => Some(*slot),
            _ => None,
        })
    }

    /// The id of the device in PCI slot `slot`, if any.
    pub fn in_pci_slot(&self, slot: u8) -> Option<String> {
        self.devices
            .iter()
            .find(|d| {
                matches!(d.plugged.as_ref().map(|p| &p.place), Some(Place::Pci { slot: s, .. }) if *s == slot)
            })
            .map(|d| d.id.clone())
    }

    /// Every plugged device's control thread (to stop and restart its rings around a pause).
    pub fn controls(&self) -> Vec<ControlHandle> {
        self.devices
            .iter()
            .filter_map(|d| d.plugged.as_ref()?.control.clone())
            .collect()
    }

    /// Every device, in the order they were added.
    pub fn status(&self) -> Vec<DeviceStatus> {
        self.devices
            .iter()
            .map(|d| DeviceStatus {
                info: info(d),
                option: d.spec.option,
                value: d.spec.value.clone(),
                losses: d.losses,
                recoveries: d.recoveries,
            })
            .collect()
    }

    /// Stops the managed backends (SIGTERM, then SIGKILL) and the spawner, drops every device
    /// and removes the runtime directory; no device can be added after this. (The hot-plug
    /// thread may outlive it, holding the manager.)
    pub fn shutdown(&mut self) {
        self.closed = true;
        for d in &mut self.devices {
            d.stop_backend();
        }
        self.devices.clear();
        self.spawner = None;
        self.runtime_dir = None;
    }
}

/// What the hot-plug thread needs to seek a device's backend again.
pub struct RecoveryTarget {
    /// Started by us: started again if its process is gone.
    pub managed: bool,
    /// Server mode: we listen and the backend connects.
    pub server_mode: bool,
    /// In server mode: where the backend connects (None: it could not be made; tried again).
    pub listener: Option<Arc<BackendListener>>,
    pub socket: PathBuf,
    pub id: String,
    pub queues: u16,
    pub control: ControlHandle,
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

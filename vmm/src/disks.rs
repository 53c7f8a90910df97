//! Disks: from `--disk` options to virtio-blk devices served by vhost-user-blk processes, and
//! what happens when a backend goes away while the guest runs.
//!
//! Two phases, so managed backends start while the VM is being built: [`Disks::launch`]
//! starts them (right after the options are checked), [`Disks::attach`] connects to every
//! backend and puts its device on PCI or MMIO. While the guest runs, the main loop watches
//! each backend's socket (hang-up) and process (pidfd) and calls [`Disks::on_event`].
//!
//! Reconnection is a later step; its place is [`Disk::fail`]: today the device is marked
//! DEVICE_NEEDS_RESET and stays broken.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cloister_seccomp::landlock::Rules;
use cloister_seccomp::SeccompMode;
use thiserror::Error;

use crate::config::{DiskConfig, DiskSource, TransportKind};
use crate::devices::{Bus, BusError};
use crate::layout::{VirtioMmioSlot, VIRTIO_MMIO_SIZE};
use crate::memory::GuestMemoryMmap;
use crate::pci::{BarAllocError, BarAllocator, PciRoot, PciRootError};
use crate::supervisor::{self, ManagedProcess, ProcessError, RuntimeDir};
use crate::vhost_user::blk::Blk;
use crate::vhost_user::connection::{self, ConnectionError};
use crate::vhost_user::{Connection, DeviceKind, VhostUserDevice};
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
pub enum DisksError {
    #[error("cannot create a directory for backend sockets")]
    RuntimeDir(#[source] io::Error),
    #[error(transparent)]
    Program(ProcessError),
    #[error("{0}")]
    Spawn(String, #[source] ProcessError),
    #[error("{0}")]
    Connect(String, #[source] ConnectionError),
    #[error("{0}: no free address for its BAR")]
    Bar(String, #[source] BarAllocError),
    #[error("{0}")]
    Pci(String, #[source] PciTransportError),
    #[error("{0}")]
    PciSlot(String, #[source] PciRootError),
    #[error("{0}")]
    Mmio(String, #[source] MmioTransportError),
    #[error("{0}: no free virtio-mmio slot")]
    MmioSlot(String),
    #[error("{0}")]
    Bus(String, #[source] BusError),
}

/// What attaching needs from the VM being built.
pub struct AttachContext<'a> {
    pub memory: &'a GuestMemoryMmap,
    pub vm: Arc<dyn VmOps>,
    pub mmio_bus: &'a Arc<Bus>,
    pub pci: &'a mut PciRoot,
    /// BARs go above 4 GiB; the 32-bit window is the fallback if that one is full.
    pub bar64: &'a mut BarAllocator,
    pub bar32: &'a mut BarAllocator,
}

/// Something the main loop waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Disk `n`'s socket hung up.
    Socket(usize),
    /// Disk `n`'s managed process exited.
    Process(usize),
}

struct Disk {
    name: String,
    cfg: DiskConfig,
    kind: &'static dyn DeviceKind,
    socket_path: PathBuf,
    process: Option<ManagedProcess>,
    /// Our own descriptor of the connection's socket, watched for a hang-up.
    socket: Option<OwnedFd>,
    process_watched: bool,
    transport: Option<Arc<dyn VirtioTransport>>,
    failed: bool,
}

impl Disk {
    /// "disk0 (vhost-user-blk, pid 123)" or "disk1 (vhost-user-blk, socket /run/x.sock)".
    fn label(&self) -> String {
        match &self.process {
            Some(p) => format!(
                "{} ({}, pid {})",
                self.name,
                self.kind.backend_name(),
                p.pid()
            ),
            None => format!(
                "{} ({}, socket {})",
                self.name,
                self.kind.backend_name(),
                self.socket_path.display()
            ),
        }
    }

    /// The backend is gone: say so once and tell the device. Reconnection would start here.
    fn fail(&mut self, why: &str) {
        if self.failed {
            return;
        }
        self.failed = true;
        eprintln!("cloister: {}: {why}", self.label());
        if let Some(t) = &self.transport {
            t.backend_lost();
        }
    }

    /// Arguments for a managed vhost-user-blk; it gets our `--seccomp` mode.
    fn backend_args(&self, seccomp: SeccompMode) -> Vec<OsString> {
        let DiskSource::Managed {
            path,
            readonly,
            direct,
            serial,
        } = &self.cfg.source
        else {
            return Vec::new();
        };
        let mut image = OsString::from("--image=");
        image.push(path);
        let mut socket = OsString::from("--socket=");
        socket.push(&self.socket_path);
        let mut args = vec![
            socket,
            image,
            format!("--queues={}", self.cfg.num_queues).into(),
            format!("--queue-size={}", self.cfg.queue_size).into(),
            // Its start-up and connection chatter is not the VM's business; warnings are.
            "--log-level=warn".into(),
            format!("--seccomp={}", seccomp.as_arg()).into(),
        ];
        if *readonly {
            args.push("--readonly".into());
        }
        if *direct {
            args.push("--direct".into());
        }
        if let Some(s) = serial {
            args.push(format!("--serial={s}").into());
        }
        args
    }
}

pub struct Disks {
    disks: Vec<Disk>,
    /// Dropped after `disks` (field order), so processes are stopped before their sockets'
    /// directory goes.
    runtime_dir: Option<RuntimeDir>,
}

impl Disks {
    /// Starts the backend of every managed disk, with our `--seccomp` mode. Disks are named
    /// disk0, disk1, ... in order.
    pub fn launch(cfgs: &[DiskConfig], seccomp: SeccompMode) -> Result<Self, DisksError> {
        let mut runtime_dir: Option<RuntimeDir> = None;
        let mut program: Option<PathBuf> = None;
        let mut disks = Vec::with_capacity(cfgs.len());
        for (n, cfg) in cfgs.iter().enumerate() {
            let kind: &'static dyn DeviceKind = &Blk;
            let name = format!("disk{n}");
            let socket_path = match &cfg.source {
                DiskSource::Socket(p) => p.clone(),
                DiskSource::Managed { .. } => {
                    let dir = match &runtime_dir {
                        Some(d) => d,
                        None => runtime_dir
                            .insert(RuntimeDir::create().map_err(DisksError::RuntimeDir)?),
                    };
                    dir.path().join(format!("{name}.sock"))
                }
            };
            let mut disk = Disk {
                name,
                cfg: cfg.clone(),
                kind,
                socket_path,
                process: None,
                socket: None,
                process_watched: false,
                transport: None,
                failed: false,
            };
            if matches!(cfg.source, DiskSource::Managed { .. }) {
                let path = match &program {
                    Some(p) => p,
                    None => program.insert(
                        supervisor::find_program(kind.backend_name())
                            .map_err(DisksError::Program)?,
                    ),
                };
                let p = ManagedProcess::spawn(path, &disk.backend_args(seccomp))
                    .map_err(|e| DisksError::Spawn(disk.name.clone(), e))?;
                disk.process = Some(p);
                disk.process_watched = true;
            }
            disks.push(disk);
        }
        Ok(Disks { disks, runtime_dir })
    }

    /// What the main thread may still reach once the VM runs: the backends' sockets (for the
    /// reconnection to come, enforced from Landlock ABI 9; its seccomp policy has no socket or
    /// connect yet), and the runtime directory, to remove it at
    /// exit; in its parent, only removing the (by then empty) directory itself. Signals to
    /// processes outside the domain stay allowed: the backends must be stopped.
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
        for disk in &self.disks {
            if matches!(disk.cfg.source, DiskSource::Socket(_)) {
                // The directory: a restarted backend makes a new socket file (a new inode).
                let dir = disk
                    .socket_path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty());
                rules = rules.connect_unix(dir.unwrap_or(&disk.socket_path));
            }
        }
        rules
    }

    /// Connects to every backend and plugs its device in. Returns the virtio-mmio slots used,
    /// for the DSDT.
    pub fn attach(&mut self, ctx: &mut AttachContext) -> Result<Vec<VirtioMmioSlot>, DisksError> {
        let mut slots = Vec::new();
        for disk in &mut self.disks {
            // An error here is reported by our caller, with the label: nothing more to say
            // when the process is stopped.
            disk.failed = true;
            let label = disk.label();
            let name = disk.name.clone();
            let stream = {
                let process = &mut disk.process;
                connection::connect(&disk.socket_path, CONNECT_TIMEOUT, &mut || match process
                    .as_mut()
                    .and_then(ManagedProcess::try_wait)
                {
                    Some(s) => Err(format!(
                        "the backend exited with {} before its socket appeared",
                        supervisor::describe(s)
                    )),
                    None => Ok(()),
                })
                .map_err(|e| DisksError::Connect(label.clone(), e))?
            };
            let conn = Connection::new(stream, &name, disk.cfg.num_queues)
                .map_err(|e| DisksError::Connect(label.clone(), e))?;
            disk.socket = Some(
                conn.socket_dup()
                    .map_err(|e| DisksError::Connect(label.clone(), ConnectionError::Setup(e)))?,
            );
            let device = VhostUserDevice::new(
                &name,
                Box::new(Blk),
                conn,
                ctx.memory.clone(),
                disk.cfg.num_queues,
                disk.cfg.queue_size,
            )
            .map_err(|e| DisksError::Connect(label.clone(), e))?;
            let transport: Arc<dyn VirtioTransport> = match disk.cfg.transport {
                TransportKind::Pci => {
                    let size = pci_transport::BAR_SIZE;
                    let bar = ctx
                        .bar64
                        .allocate(size)
                        .or_else(|_| ctx.bar32.allocate(size))
                        .map_err(|e| DisksError::Bar(label.clone(), e))?;
                    let dev = VirtioPciDevice::new(
                        &name,
                        Box::new(device),
                        bar,
                        ctx.vm.clone(),
                        ctx.mmio_bus.clone(),
                    )
                    .map_err(|e| DisksError::Pci(label.clone(), e))?;
                    ctx.pci
                        .add(dev.clone())
                        .map_err(|e| DisksError::PciSlot(label.clone(), e))?;
                    dev
                }
                TransportKind::Mmio => {
                    let slot = VirtioMmioSlot::new(slots.len() as u32)
                        .ok_or_else(|| DisksError::MmioSlot(label.clone()))?;
                    let dev = Arc::new(
                        VirtioMmioDevice::new(
                            &name,
                            Box::new(device),
                            slot.base,
                            slot.gsi,
                            ctx.vm.clone(),
                        )
                        .map_err(|e| DisksError::Mmio(label.clone(), e))?,
                    );
                    ctx.mmio_bus
                        .insert(dev.clone(), slot.base, VIRTIO_MMIO_SIZE)
                        .map_err(|e| DisksError::Bus(label.clone(), e))?;
                    slots.push(slot);
                    dev
                }
            };
            disk.transport = Some(transport);
            disk.failed = false;
        }
        Ok(slots)
    }

    /// Descriptors for the main loop to poll, with poll(2) event bits.
    pub fn watches(&self) -> Vec<(RawFd, libc::c_short, Watch)> {
        let mut v = Vec::new();
        for (n, d) in self.disks.iter().enumerate() {
            if let Some(s) = &d.socket {
                // Hang-up only: replies to requests are read by whoever made them.
                v.push((s.as_raw_fd(), libc::POLLRDHUP, Watch::Socket(n)));
            }
            if let (true, Some(p)) = (d.process_watched, &d.process) {
                v.push((p.pidfd(), libc::POLLIN, Watch::Process(n)));
            }
        }
        v
    }

    pub fn on_event(&mut self, watch: Watch) {
        match watch {
            Watch::Socket(n) => {
                let Some(d) = self.disks.get_mut(n) else {
                    return;
                };
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
            Watch::Process(n) => {
                let Some(d) = self.disks.get_mut(n) else {
                    return;
                };
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
        }
    }

    /// Ends every backend connection (without closing descriptors the devices still own): a
    /// vCPU blocked in a request to a backend that takes its time returns at once, so the VM
    /// can stop without waiting out the request's deadline.
    pub fn disconnect(&self) {
        for socket in self.disks.iter().filter_map(|d| d.socket.as_ref()) {
            // SAFETY: shutdown(2) on a socket descriptor we own; no memory involved.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// Stops the managed backends (SIGTERM, then SIGKILL) and reaps them.
    pub fn shutdown(&mut self) {
        for d in &mut self.disks {
            let label = d.label();
            let Some(p) = d.process.as_mut() else {
                continue;
            };
            let (status, killed) = p.stop(supervisor::process::STOP_GRACE);
            if killed {
                eprintln!("cloister: {label}: backend ignored SIGTERM and was killed");
            } else if let Some(s) = status.filter(|s| !s.success() && !d.failed) {
                if std::os::unix::process::ExitStatusExt::signal(&s) != Some(libc::SIGTERM) {
                    eprintln!(
                        "cloister: {label}: backend exited with {}",
                        supervisor::describe(s)
                    );
                }
            }
        }
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn disconnect_ends_every_connection_at_once() {
        let mut peers = Vec::new();
        let mut disks = Vec::new();
        for n in 0..2 {
            let (ours, theirs) = UnixStream::pair().unwrap();
            peers.push(theirs);
            disks.push(Disk {
                name: format!("disk{n}"),
                cfg: DiskConfig::parse("socket=/nonexistent.sock").unwrap(),
                kind: &Blk,
                socket_path: PathBuf::from("/nonexistent.sock"),
                process: None,
                socket: Some(OwnedFd::from(ours)),
                process_watched: false,
                transport: None,
                failed: false,
            });
        }
        let disks = Disks {
            disks,
            runtime_dir: None,
        };
        disks.disconnect();
        // Each backend sees the end of its connection (a blocked reader on our side would see
        // it too), while our descriptors stay open for the devices that own them.
        for mut peer in peers {
            peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut byte = [0u8; 1];
            assert_eq!(peer.read(&mut byte).expect("end of file, not a timeout"), 0);
        }
        assert!(disks.disks.iter().all(|d| d.socket.is_some()));
    }
}

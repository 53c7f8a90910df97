//! A vhost-user connection as a virtio device: features and config space come from the
//! backend (read once, at connection time), queues are handed over at DRIVER_OK and taken back
//! at reset. Config reads are served from our copy, so they never wait on the backend.

use std::io::Write;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::connection::{Connection, ConnectionError};
use super::control::{Control, Failures, Ring};
use super::kind::{ConfigSpace, DeviceKind};
use crate::memory::GuestMemoryMmap;
use crate::virtio::{
    ActiveQueue, DeviceError, VirtioDevice, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// Transport-level features a vhost-user backend implements itself, passed when offered.
/// Everything else (ACCESS_PLATFORM, packed rings, notification data...) needs the VMM's
/// cooperation, which we do not give.
const TRANSPORT_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << VIRTIO_F_RING_INDIRECT_DESC);

pub struct VhostUserDevice {
    name: String,
    kind: Arc<dyn DeviceKind>,
    memory: GuestMemoryMmap,
    features: u64,
    /// What of `features` the backend offered (the rest is ours: `DeviceKind::local_features`).
    backend_features: u64,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    /// Owns the connection; makes the requests that start and stop the queues.
    control: Control,
    config_write_logged: bool,
}

impl VhostUserDevice {
    /// A device with queues of up to `queue_sizes` entries, over a negotiated connection.
    /// The config space is read now (or made locally), so guest reads never wait on the
    /// backend. The connection moves to the device's control thread; what fails there later is
    /// reported through `failures`.
    pub fn new(
        name: &str,
        kind: Arc<dyn DeviceKind>,
        mut conn: Connection,
        memory: GuestMemoryMmap,
        queue_sizes: Vec<u16>,
        failures: Arc<Failures>,
    ) -> Result<Self, ConnectionError> {
        let offers_config = conn
            .negotiated()
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIG);
        let (mut config, local_config) = match kind.config_space() {
            ConfigSpace::Local(bytes) => (bytes, true),
            ConfigSpace::BackendOr(len, _) | ConfigSpace::Backend(len) if offers_config => {
                (conn.get_config(len)?, false)
            }
            ConfigSpace::BackendOr(_, bytes) => (bytes, true),
            ConfigSpace::Backend(_) => {
                return Err(ConnectionError::MissingProtocolFeature("CONFIG"))
            }
        };
        if !local_config {
            kind.check_backend_config(&config)
                .map_err(ConnectionError::ConfigMismatch)?;
        }
        let offered = conn.negotiated().features;
        let backend_features = offered & (kind.device_features() | TRANSPORT_FEATURES);
        let mut queue_sizes = queue_sizes;
        let usable = kind.usable_queues(
            queue_sizes.len(),
            backend_features,
            conn.negotiated().queues,
        );
        queue_sizes.truncate(usable.max(kind.required_queues(queue_sizes.len())));
        let backend_features = kind.adjust_features(backend_features, queue_sizes.len());
        let queues = u16::try_from(queue_sizes.len()).unwrap_or(u16::MAX);
        kind.adjust_config(&mut config, queues);
        let features = backend_features | kind.local_features(local_config);
        let control = Control::start(
            name,
            conn,
            memory.clone(),
            failures,
            kind.completes_in_order(),
        )
        .map_err(ConnectionError::Setup)?;
        Ok(VhostUserDevice {
            name: name.to_string(),
            kind,
            memory,
            features,
            backend_features,
            queue_sizes,
            config,
            control,
            config_write_logged: false,
        })
    }

    /// This process's address of a ring part the guest placed at `addr`, if all `len` bytes
    /// are in one RAM region.
    fn host_address(&self, addr: GuestAddress, len: usize) -> Option<u64> {
        self.memory.get_slice(addr, len).ok()?;
        self.memory.get_host_address(addr).ok().map(|p| p as u64)
    }

    fn ring(&self, q: ActiveQueue) -> Result<Ring, DeviceError> {
        let n = usize::from(q.size);
        let err = |what| DeviceError(ConnectionError::Ring(q.index, what).to_string());
        // Split ring sizes: 16-byte descriptors; flags, idx, n entries and used_event (avail);
        // flags, idx, n 8-byte elements and avail_event (used).
        let desc = self
            .host_address(q.desc, 16 * n)
            .ok_or_else(|| err("the descriptor table"))?;
        let avail = self
            .host_address(q.avail, 6 + 2 * n)
            .ok_or_else(|| err("the available ring"))?;
        let used = self
            .host_address(q.used, 6 + 8 * n)
            .ok_or_else(|| err("the used ring"))?;
        Ok(Ring {
            index: q.index,
            size: q.size,
            desc,
            avail,
            used,
            kick: q.kick,
            call: q.call,
        })
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .saturating_add(i);
            *b = self.config.get(at).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Nothing we pass through has a writable field (CONFIG_WCE is filtered out), so a
        // write is a confused driver; refused, and said once.
        if !self.config_write_logged {
            self.config_write_logged = true;
            // On the vCPU thread: a closed stderr must not make this panic.
            let _ = writeln!(
                std::io::stderr(),
                "cloister: {}: ignoring a write to read-only config space at {offset:#x}",
                self.name
            );
        }
    }

    /// Checks the rings here (a ring outside RAM fails the activation at once), then leaves
    /// the backend requests to the control thread: the vCPU goes back to the guest.
    fn activate(&mut self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), DeviceError> {
        let rings = queues
            .into_iter()
            .map(|q| self.ring(q))
            .collect::<Result<Vec<_>, _>>()?;
        // The transport made sure the driver's features are a subset of ours; the backend
        // hears of those it offered.
        self.control
            .start_rings(features & self.backend_features, rings);
        Ok(())
    }

    fn reset(&mut self) {
        self.control.stop_rings();
    }

    fn backend_lost(&mut self) {
        self.control.lost();
    }
}

impl VhostUserDevice {
    /// A new connection in place of a lost backend's: the running device is started on it
    /// where the last backend stopped ([`Control::reconnect`]).
    pub fn reconnect(&self, conn: Connection) -> Result<(), String> {
        self.control.reconnect(conn)
    }

    /// For the device manager, to hand the device a new backend later.
    pub fn control_handle(&self) -> Option<super::control::ControlHandle> {
        self.control.handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::RamLayout;
    use crate::memory::GuestRam;
    use crate::vhost_user::connection;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// The workspace's own backend, if it has been built (`cargo build --workspace`).
    fn backend_binary() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/vhost-user-blk");
        p.is_file().then_some(p)
    }

    struct Backend {
        child: Child,
        dir: PathBuf,
    }

    impl Drop for Backend {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn start_backend(bin: &Path, tag: &str) -> (Backend, PathBuf) {
        start_backend_with(bin, tag, &[])
    }

    fn start_backend_with(bin: &Path, tag: &str, extra: &[&str]) -> (Backend, PathBuf) {
        let dir = std::env::temp_dir().join(format!("cloister-vu-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let socket = dir.join("blk.sock");
        let child = Command::new(bin)
            .args(["--queues", "2", "--log-level", "warn", "--socket"])
            .arg(&socket)
            .arg("--image")
            .arg(&image)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        (Backend { child, dir }, socket)
    }

    fn queue(index: usize, base: u64) -> ActiveQueue {
        ActiveQueue {
            index,
            size: 16,
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x1000),
            used: GuestAddress(base + 0x2000),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    #[test]
    fn against_the_real_backend() {
        let Some(bin) = backend_binary() else {
            eprintln!("vhost-user-blk not built: skipped");
            return;
        };
        let (mut backend, socket) = start_backend(&bin, "real");
        let ram = GuestRam::new(RamLayout::new(16 << 20)).unwrap();
        let stream = connection::connect(&socket, Duration::from_secs(10), &mut || Ok(())).unwrap();
        let conn = Connection::new(stream, "test", 1).unwrap();
        assert_eq!(conn.negotiated().queues, 2);
        let kind = crate::kinds::blk::parse("socket=/x", cloister_seccomp::SeccompMode::True)
            .unwrap()
            .kind;
        let failures = Failures::new().unwrap();
        let mut dev = VhostUserDevice::new(
            "disk0",
            kind,
            conn,
            ram.memory.clone(),
            vec![64],
            failures.clone(),
        )
        .unwrap();
        assert_ne!(dev.features() & (1 << VIRTIO_F_VERSION_1), 0);
        assert_eq!(
            dev.features() & (1 << 30),
            0,
            "no vhost-user bit for the guest"
        );
        assert_eq!(dev.queue_max_sizes(), &[64]);
        let mut capacity = [0u8; 8];
        dev.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), (8 << 20) / 512);
        let mut queues = [0u8; 2];
        dev.read_config(34, &mut queues);
        assert_eq!(
            u16::from_le_bytes(queues),
            1,
            "num_queues is what we expose"
        );

        // Start, stop, and start again (a guest reset). The start is the control thread's;
        // the stop waits for it.
        dev.activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x10_0000)])
            .unwrap();
        dev.reset();
        dev.activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x20_0000)])
            .unwrap();
        dev.reset();
        assert_eq!(failures.take(), Vec::<String>::new());

        // Rings outside RAM are refused before the backend hears of them.
        let e = dev
            .activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x100_0000)])
            .unwrap_err();
        assert!(e.0.contains("outside guest memory"), "{e}");

        // The backend dies: the start fails on the control thread, which says so.
        let _ = backend.child.kill();
        let _ = backend.child.wait();
        dev.activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x10_0000)])
            .unwrap();
        dev.reset();
        let said = failures.take();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].starts_with("cannot start the device"), "{said:?}");
        // And every later start says the backend is not connected.
        dev.activate(1 << VIRTIO_F_VERSION_1, Vec::new()).unwrap();
        dev.reset();
        let said = failures.take();
        assert!(said[0].contains("not connected"), "{said:?}");
    }

    /// Puts a one-sector read of `sector` in split ring `base` (the layout of `queue`) as its
    /// `n`-th request, using descriptors 3n..3n+2 and buffers of its own.
    fn post_read(ram: &GuestRam, base: u64, n: u16, sector: u64) -> GuestAddress {
        use vm_memory::Bytes;
        let mem = &ram.memory;
        let buffers = base + 0x4000 + u64::from(n) * 0x1000;
        let (header, data, status) = (buffers, buffers + 0x100, buffers + 0x400);
        let mut request = [0u8; 16];
        request[8..].copy_from_slice(&sector.to_le_bytes()); // VIRTIO_BLK_T_IN is 0
        mem.write_slice(&request, GuestAddress(header)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let first = 3 * n;
        let descriptors = [
            (header, 16u32, 1u16, first + 1), // NEXT
            (data, 512, 1 | 2, first + 2),    // NEXT | WRITE
            (status, 1, 2, 0),                // WRITE
        ];
        for (i, (addr, len, flags, next)) in descriptors.into_iter().enumerate() {
            let at = GuestAddress(base + 16 * (u64::from(first) + i as u64));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }
        let avail = base + 0x1000;
        mem.write_obj(first, GuestAddress(avail + 4 + 2 * u64::from(n % 16)))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(n + 1, GuestAddress(avail + 2)).unwrap();
        GuestAddress(status)
    }

    /// Waits (at most 10 s) for the used ring at `base` to reach `idx`.
    fn wait_used(ram: &GuestRam, base: u64, idx: u16) -> bool {
        use vm_memory::Bytes;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let used: u16 = ram.memory.read_obj(GuestAddress(base + 0x2002)).unwrap();
            if used == idx {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_new_backend_takes_over_the_running_rings() {
        use vm_memory::Bytes;
        let Some(bin) = backend_binary() else {
            eprintln!("vhost-user-blk not built: skipped");
            return;
        };
        let connect = |socket: &Path| {
            let stream =
                connection::connect(socket, Duration::from_secs(10), &mut || Ok(())).unwrap();
            Connection::new(stream, "test", 1).unwrap()
        };
        let (mut first, socket) = start_backend(&bin, "takeover-1");
        let ram = GuestRam::new(RamLayout::new(16 << 20)).unwrap();
        let kind = crate::kinds::blk::parse("socket=/x", cloister_seccomp::SeccompMode::True)
            .unwrap()
            .kind;
        let failures = Failures::new().unwrap();
        let mut dev = VhostUserDevice::new(
            "disk0",
            kind,
            connect(&socket),
            ram.memory.clone(),
            vec![16],
            failures.clone(),
        )
        .unwrap();
        let base = 0x10_0000;
        let ring = queue(0, base);
        let kick = ring.kick.try_clone().unwrap();
        dev.activate(1 << VIRTIO_F_VERSION_1, vec![ring]).unwrap();

        let status = post_read(&ram, base, 0, 1);
        kick.write(1).unwrap();
        assert!(wait_used(&ram, base, 1), "the first backend never answered");
        assert_eq!(ram.memory.read_obj::<u8>(status).unwrap(), 0);

        // The backend dies; the driver goes on and queues a request that nobody takes.
        let _ = first.child.kill();
        let _ = first.child.wait();
        let status = post_read(&ram, base, 1, 2);
        kick.write(1).unwrap();

        // A new backend: the ring goes on from where the used ring says the last one was.
        let (_second, socket) = start_backend(&bin, "takeover-2");
        dev.reconnect(connect(&socket)).unwrap();
        assert!(
            wait_used(&ram, base, 2),
            "the new backend never took the queued request"
        );
        assert_eq!(ram.memory.read_obj::<u8>(status).unwrap(), 0);
        // And only it: the request the first backend finished is not done again.
        std::thread::sleep(Duration::from_millis(200));
        let used: u16 = ram.memory.read_obj(GuestAddress(base + 0x2002)).unwrap();
        assert_eq!(used, 2, "a finished request was taken again");
        assert_eq!(failures.take(), Vec::<String>::new());

        // A stop and a start work on the new backend as on the first.
        dev.reset();
        dev.activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x20_0000)])
            .unwrap();
        dev.reset();
        assert_eq!(failures.take(), Vec::<String>::new());
    }

    #[test]
    fn a_new_backend_without_the_features_in_use_is_refused() {
        let Some(bin) = backend_binary() else {
            eprintln!("vhost-user-blk not built: skipped");
            return;
        };
        let (_first, socket) = start_backend_with(&bin, "refuse-1", &["--readonly"]);
        let ram = GuestRam::new(RamLayout::new(16 << 20)).unwrap();
        let kind = crate::kinds::blk::parse("socket=/x", cloister_seccomp::SeccompMode::True)
            .unwrap()
            .kind;
        let stream = connection::connect(&socket, Duration::from_secs(10), &mut || Ok(())).unwrap();
        let failures = Failures::new().unwrap();
        let mut dev = VhostUserDevice::new(
            "disk0",
            kind,
            Connection::new(stream, "test", 1).unwrap(),
            ram.memory.clone(),
            vec![16],
            failures.clone(),
        )
        .unwrap();
        // The driver took a feature the next backend does not offer (a read-only disk).
        let read_only = 1u64 << 5;
        dev.activate(
            (1 << VIRTIO_F_VERSION_1) | read_only,
            vec![queue(0, 0x10_0000)],
        )
        .unwrap();
        let (_second, socket) = start_backend(&bin, "refuse-2");
        let stream = connection::connect(&socket, Duration::from_secs(10), &mut || Ok(())).unwrap();
        let e = dev
            .reconnect(Connection::new(stream, "test", 1).unwrap())
            .unwrap_err();
        assert!(e.contains("lacks features"), "{e}");
    }
}

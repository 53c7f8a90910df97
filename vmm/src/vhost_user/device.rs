//! A vhost-user connection as a virtio device: features and config space come from the
//! backend (read once, at connection time), queues are handed over at DRIVER_OK and taken back
//! at reset. Config reads are served from our copy, so they never wait on the backend.

use std::io::Write;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::connection::{Connection, ConnectionError, VringSetup};
use super::DeviceKind;
use crate::memory::GuestMemoryMmap;
use crate::virtio::{
    ActiveQueue, DeviceError, VirtioDevice, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
};

/// Transport-level features a vhost-user backend implements itself, passed when offered.
/// Everything else (ACCESS_PLATFORM, packed rings, notification data...) needs the VMM's
/// cooperation, which we do not give.
const TRANSPORT_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << VIRTIO_F_RING_INDIRECT_DESC);

pub struct VhostUserDevice {
    name: String,
    kind: Box<dyn DeviceKind>,
    /// `None` once the backend is gone (or the connection is out of step with it).
    conn: Option<Connection>,
    memory: GuestMemoryMmap,
    features: u64,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    /// Queues the backend is serving.
    started: Vec<usize>,
    config_write_logged: bool,
}

impl VhostUserDevice {
    /// `queues` queues of up to `queue_size` entries, over a negotiated connection.
    pub fn new(
        name: &str,
        kind: Box<dyn DeviceKind>,
        mut conn: Connection,
        memory: GuestMemoryMmap,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, ConnectionError> {
        let mut config = conn.get_config(kind.config_len())?;
        kind.adjust_config(&mut config, queues);
        let offered = conn.negotiated().features;
        let features = offered & (kind.device_features() | TRANSPORT_FEATURES);
        Ok(VhostUserDevice {
            name: name.to_string(),
            kind,
            conn: Some(conn),
            memory,
            features,
            queue_sizes: vec![queue_size; usize::from(queues)],
            config,
            started: Vec::new(),
            config_write_logged: false,
        })
    }

    /// This process's address of a ring part the guest placed at `addr`, if all `len` bytes
    /// are in one RAM region.
    fn host_address(&self, addr: GuestAddress, len: usize) -> Option<u64> {
        self.memory.get_slice(addr, len).ok()?;
        self.memory.get_host_address(addr).ok().map(|p| p as u64)
    }

    fn vring_addresses(&self, q: &ActiveQueue) -> Result<(u64, u64, u64), DeviceError> {
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
        Ok((desc, avail, used))
    }

    /// The connection is unusable from here on (dead, or out of step after a failed request).
    fn drop_connection(&mut self) {
        self.conn = None;
        self.started.clear();
    }

    fn start(&mut self, features: u64, queues: &[ActiveQueue]) -> Result<(), DeviceError> {
        let mut addrs = Vec::with_capacity(queues.len());
        for q in queues {
            addrs.push(self.vring_addresses(q)?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(DeviceError(format!(
                "the {} backend is not connected",
                self.kind.backend_name()
            )));
        };
        let started = &mut self.started;
        let memory = &self.memory;
        let r = conn.operation("the device start", |conn| {
            conn.set_features(features)?;
            conn.set_mem_table(memory)?;
            for (q, &(desc, avail, used)) in queues.iter().zip(&addrs) {
                conn.start_vring(&VringSetup {
                    index: q.index,
                    size: q.size,
                    desc,
                    avail,
                    used,
                    kick: &q.kick,
                    call: &q.call,
                })?;
                started.push(q.index);
            }
            Ok(())
        });
        r.map_err(|e| {
            let msg = crate::error_chain(&e);
            self.drop_connection();
            DeviceError(msg)
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

    fn activate(&mut self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), DeviceError> {
        // The transport made sure the driver's features are a subset of ours.
        self.start(features & self.features, &queues)
    }

    fn reset(&mut self) {
        let started = std::mem::take(&mut self.started);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut stopping = 0;
        let r = conn.operation("the device reset", |conn| {
            for &q in &started {
                stopping = q;
                conn.stop_vring(q)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            let _ = writeln!(
                std::io::stderr(),
                "cloister: {}: cannot stop queue {stopping}: {}",
                self.name,
                crate::error_chain(&e)
            );
            self.drop_connection();
        }
    }

    fn backend_lost(&mut self) {
        self.drop_connection();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::RamLayout;
    use crate::memory::GuestRam;
    use crate::vhost_user::blk::Blk;
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
        let mut dev =
            VhostUserDevice::new("disk0", Box::new(Blk), conn, ram.memory.clone(), 1, 64).unwrap();
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

        // Start, stop, and start again (a guest reset).
        dev.activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x10_0000)])
            .unwrap();
        dev.reset();
        dev.activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x20_0000)])
            .unwrap();
        dev.reset();

        // Rings outside RAM are refused before the backend hears of them.
        let e = dev
            .activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x100_0000)])
            .unwrap_err();
        assert!(e.0.contains("outside guest memory"), "{e}");

        // The backend dies: activation fails cleanly, and so does everything after.
        let _ = backend.child.kill();
        let _ = backend.child.wait();
        let e = dev
            .activate(1 << VIRTIO_F_VERSION_1, vec![queue(0, 0x10_0000)])
            .unwrap_err();
        assert!(!e.0.is_empty());
        dev.reset();
        assert!(dev.activate(1 << VIRTIO_F_VERSION_1, Vec::new()).is_err());
    }
}

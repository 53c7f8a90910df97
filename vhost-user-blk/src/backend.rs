//! The device (lives as long as the daemon) and the per-connection `VhostUserBackend`.

use std::io;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cloister_backends::guest_memory::ConnectionMemory;
use cloister_backends::relay::RelayHooks;
use cloister_backends::server::GuestMemory;
use cloister_backends::{Device, WorkerExits};
use cloister_seccomp::ThreadRole;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::config::{Config, EngineKind};
use crate::disk::{Disk, SECTOR_SIZE};
use crate::engine::Engine;
use crate::error::Error;
use crate::inflight::RegionSlot;
use crate::io_uring_engine::UringEngine;
use crate::queue::{early_return, QueueWorker, Vring};
use crate::request::Limits;
use crate::sync_engine::SyncEngine;
use crate::threads::ThreadMap;
use crate::virtio::{self, Geometry};

/// Everything opened at start-up: shared by all connections.
struct Shared {
    geometry: Geometry,
    features: u64,
    config_space: Vec<u8>,
    /// One per queue, each driven by the worker thread `threads` assigns it.
    workers: Vec<WorkerSlot>,
    threads: ThreadMap,
    /// The in-flight region of the current connection, once the frontend asked for or handed
    /// over one (through the relay).
    inflight: RegionSlot,
}

struct WorkerSlot {
    worker: Mutex<QueueWorker>,
    /// Non-zero while the control thread waits for the worker's lock: a polling worker lets
    /// go of it instead of spinning on.
    control: AtomicUsize,
}

impl Shared {
    /// The worker of `queue`, for its own thread. The control thread goes first: a worker
    /// that keeps finding work would otherwise take the lock back before it gets a turn.
    fn worker(&self, queue: usize) -> Option<(MutexGuard<'_, QueueWorker>, &AtomicUsize)> {
        let slot = self.workers.get(queue)?;
        while slot.control.load(Ordering::Acquire) != 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
        Some((lock(&slot.worker), &slot.control))
    }

    /// Runs `f` on the worker of `queue` from the control thread.
    fn control(&self, queue: usize, f: impl FnOnce(&mut QueueWorker)) {
        if let Some(slot) = self.workers.get(queue) {
            let _waiting = ControlWaiting::new(&slot.control);
            f(&mut lock(&slot.worker));
        }
    }
}

/// The control thread's place in `WorkerSlot::control`, given back even if what it runs
/// panics: a count left up would keep the queue's worker waiting for good.
struct ControlWaiting<'a>(&'a AtomicUsize);

impl<'a> ControlWaiting<'a> {
    fn new(control: &'a AtomicUsize) -> Self {
        control.fetch_add(1, Ordering::AcqRel);
        Self(control)
    }
}

impl Drop for ControlWaiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock(worker: &Mutex<QueueWorker>) -> MutexGuard<'_, QueueWorker> {
    // A worker that panicked mid-request leaves consistent enough state to keep serving
    // other requests; better than taking the daemon down.
    worker.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The virtio-blk device.
pub struct BlkDevice {
    shared: Arc<Shared>,
}

impl BlkDevice {
    /// Opens the image and creates every queue's engine.
    pub fn new(config: &Config) -> Result<Self, Error> {
        let disk = Arc::new(Disk::open(&config.image, config.readonly, config.direct)?);
        // With O_DIRECT, tell the guest the block size the host needs, so it rarely sends
        // requests that must take the buffered path.
        let block_size =
            disk.direct_alignment()
                .map_or(SECTOR_SIZE, |a| a.offset.clamp(SECTOR_SIZE, 4096)) as u32;
        let geometry = Geometry {
            capacity_bytes: disk.capacity(),
            block_size,
            queues: config.queues,
            queue_size: config.queue_size,
            readonly: config.readonly,
        };
        let limits = Arc::new(Limits {
            capacity: disk.capacity(),
            readonly: config.readonly,
            max_descriptors: geometry.seg_max() as usize + 2,
            serial: config.serial,
        });
        let inflight = RegionSlot::default();
        let mut workers = Vec::with_capacity(config.queues.into());
        for queue in 0..usize::from(config.queues) {
            let engine = match config.engine {
                EngineKind::IoUring => Engine::Uring(
                    UringEngine::new(Arc::clone(&disk), config.queue_size.into())
                        .map_err(|source| Error::IoUring { queue, source })?,
                ),
                EngineKind::Sync => Engine::Sync(SyncEngine::new(Arc::clone(&disk))),
            };
            let worker = QueueWorker::new(
                queue,
                engine,
                Arc::clone(&limits),
                config.poll_max,
                early_return(config.threads, config.cpus),
                Arc::clone(&inflight),
            )
            .map_err(|source| Error::Worker { queue, source })?;
            workers.push(WorkerSlot {
                worker: Mutex::new(worker),
                control: AtomicUsize::new(0),
            });
        }
        log::info!(
            "image {}: {} bytes{}{}, block size {block_size}, {} queue(s) with up to {} requests in flight each on {} thread(s), {:?} engine, polling up to {} µs",
            config.image.display(),
            disk.capacity(),
            if config.readonly { ", read-only" } else { "" },
            if config.direct { ", O_DIRECT" } else { "" },
            config.queues,
            config.queue_size,
            config.threads,
            config.engine,
            config.poll_max.as_micros(),
        );
        Ok(Self {
            shared: Arc::new(Shared {
                features: virtio::features(&geometry),
                config_space: virtio::config_space(&geometry),
                geometry,
                workers,
                threads: ThreadMap::new(config.queues, config.threads),
                inflight,
            }),
        })
    }
}

impl Device for BlkDevice {
    type Backend = Arc<Connection>;

    fn connect(
        &self,
        exits: Arc<WorkerExits>,
    ) -> Result<Self::Backend, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Arc::new(Connection {
            shared: Arc::clone(&self.shared),
            mem: ConnectionMemory::default(),
            exits,
        }))
    }

    fn attach(
        &self,
        _backend: &Self::Backend,
        handlers: &[Arc<VringEpollHandler<Self::Backend>>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let map = &self.shared.threads;
        for (thread, handler) in handlers.iter().enumerate() {
            let queues = map.queues_of(thread);
            for (position, &queue) in queues.iter().enumerate() {
                let Some(slot) = self.shared.workers.get(queue) else {
                    continue;
                };
                let mut worker = lock(&slot.worker);
                if let Some(fd) = worker.engine().event_fd() {
                    handler.register_listener(fd, EventSet::IN, map.completion_event(position))?;
                }
                handler.register_listener(
                    worker.resume_fd(),
                    EventSet::IN,
                    map.resume_event(position),
                )?;
                // A worker that shares its thread must not poll while the others' events wait.
                worker.share_thread((queues.len() > 1).then(|| handler.as_raw_fd()));
            }
        }
        Ok(())
    }

    fn disconnect(&self, backend: &Self::Backend) {
        for queue in 0..self.shared.workers.len() {
            self.shared.control(queue, QueueWorker::disconnect);
        }
        backend.mem.clear();
        // The next frontend brings its own, or none.
        *self
            .shared
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Through the relay, which serves the in-flight requests the crate does not.
    fn relay_frontend(&self) -> bool {
        true
    }

    fn relay_hooks(&self) -> RelayHooks {
        let shared = Arc::clone(&self.shared);
        RelayHooks {
            on_enable: None,
            inflight: Some(Arc::new(move |region| {
                *shared
                    .inflight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(region);
            })),
        }
    }
}

/// The backend of one frontend connection.
pub struct Connection {
    shared: Arc<Shared>,
    mem: ConnectionMemory,
    exits: Arc<WorkerExits>,
}

impl Connection {
    fn memory(&self) -> Option<Arc<GuestMemory>> {
        self.mem.get()
    }
}

/// The virtio specification's largest split ring.
const VIRTQUEUE_MAX_SIZE: usize = 32768;

impl VhostUserBackend for Connection {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.shared.geometry.queues.into()
    }

    /// Every ring a frontend may legally set up: nothing here is sized by the ring (the
    /// io_uring depth is `--queue-size`; requests beyond it wait in the ring).
    fn max_queue_size(&self) -> usize {
        VIRTQUEUE_MAX_SIZE
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn acked_features(&self, features: u64) {
        log::debug!("features acknowledged: {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        virtio::protocol_features()
    }

    fn reset_device(&self) {
        for queue in 0..self.shared.workers.len() {
            self.shared.control(queue, QueueWorker::reset);
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        // The vrings apply it themselves (vhost-user-backend sets it on every queue).
        log::debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        virtio::config_slice(&self.shared.config_space, offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in our config space is writable (no VIRTIO_BLK_F_CONFIG_WCE).
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-blk config space is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        self.mem.update(mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.shared.threads.masks()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exits.event()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.shared.control(queue_index as usize, QueueWorker::stop);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Before the first guest request this thread handles: narrow the sandbox it inherited
        // from the main thread to a queue worker's.
        cloister_backends::sandbox::enter_worker(ThreadRole::BlkWorker);
        // Errors are logged, never returned: an error ends the worker thread for good, and a
        // guest must not be able to stop its own queue's service that way. For the same
        // reason a panic (a bug) is caught here rather than silently ending the thread.
        let handled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let Some(event) = self.shared.threads.event(thread_id, device_event) else {
                log::debug!("thread {thread_id}: ignoring event {device_event}");
                return;
            };
            let (Some((mut worker, control)), Some(vring)) =
                (self.shared.worker(event.queue), vrings.get(event.position))
            else {
                return;
            };
            // A kick, an I/O completion or a resume: all mean "serve". Without a memory table
            // (a kick before SET_MEM_TABLE) it only reaps.
            worker.serve(vring, self.memory().as_ref(), control);
        }));
        if handled.is_err() {
            log::error!(
                "thread {thread_id}: internal error while handling event {device_event}; its queue may stall until the device is reset"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_count_comes_back_down_after_a_panic() {
        let control = AtomicUsize::new(0);
        let panicked = std::panic::catch_unwind(|| {
            let _waiting = ControlWaiting::new(&control);
            assert_eq!(control.load(Ordering::Acquire), 1);
            panic!("a bug in a control step");
        });
        assert!(panicked.is_err());
        assert_eq!(control.load(Ordering::Acquire), 0);
    }
}

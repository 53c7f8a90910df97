//! The device (lives as long as the daemon: the tap and the queue-pair workers) and the
//! per-connection `VhostUserBackend`.

use std::io;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cloister_backends::guest_memory::ConnectionMemory;
use cloister_backends::server::GuestMemory;
use cloister_backends::{Device, WorkerExits};
use cloister_seccomp::ThreadRole;
use cloister_tap::{Offloads, TapQueue};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::ctrl::ControlQueue;
use crate::pair::{PairWorker, Vring};
use crate::state::DeviceState;
use crate::threads::{Event, ThreadMap};
use crate::virtio::{self, Identity};

/// Offloads asked of the tap: all it has.
const ALL_OFFLOADS: Offloads = Offloads(
    Offloads::CSUM
        | Offloads::TSO4
        | Offloads::TSO6
        | Offloads::TSO_ECN
        | Offloads::UFO
        | Offloads::USO4
        | Offloads::USO6,
);

/// Everything opened at start-up: shared by all connections.
struct Shared {
    device: DeviceState,
    features: u64,
    workers: Vec<Mutex<PairWorker>>,
    control: Mutex<ControlQueue>,
    threads: ThreadMap,
}

impl Shared {
    fn worker(&self, pair: usize) -> Option<MutexGuard<'_, PairWorker>> {
        Some(lock(self.workers.get(pair)?))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked mid-frame leaves consistent enough state to keep serving.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The virtio-net device.
pub struct NetDevice {
    shared: Arc<Shared>,
}

impl NetDevice {
    /// `taps`: one queue per pair. `mac`: the guest's; `mtu`: what the guest is told.
    pub fn new(
        taps: Vec<TapQueue>,
        mac: cloister_tap::MacAddr,
        mtu: u16,
        threads: u16,
        poll_max: Duration,
    ) -> Self {
        let tap_offloads = taps
            .first()
            .map_or(Offloads(0), |t| t.probe_offloads(ALL_OFFLOADS));
        let identity = Identity {
            mac,
            mtu,
            queue_pairs: taps.len() as u16,
            tap_offloads,
        };
        let taps: Vec<Arc<TapQueue>> = taps.into_iter().map(Arc::new).collect();
        let workers = taps
            .iter()
            .enumerate()
            .map(|(i, tap)| Mutex::new(PairWorker::new(i, Arc::clone(tap), poll_max)))
            .collect();
        let threads = ThreadMap::new(identity.queue_pairs, threads);
        log::info!(
            "tap {}: {} queue pair(s) on {} thread(s), guest MAC {mac}, MTU {mtu}, tap offloads {:#x}",
            taps.first().map_or("?", |t| t.name()),
            identity.queue_pairs,
            threads.masks().len(),
            tap_offloads.0,
        );
        Self {
            shared: Arc::new(Shared {
                features: virtio::features(&identity),
                device: DeviceState::new(identity, taps),
                workers,
                control: Mutex::new(ControlQueue::default()),
                threads,
            }),
        }
    }

    fn reset(&self) {
        for worker in &self.shared.workers {
            lock(worker).reset();
        }
        self.shared.device.reset();
    }
}

impl Device for NetDevice {
    type Backend = Arc<Connection>;

    fn connect(
        &self,
        exits: Arc<WorkerExits>,
    ) -> Result<Self::Backend, Box<dyn std::error::Error + Send + Sync>> {
        self.reset();
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
            for (position, &pair) in map.pairs_of(thread).iter().enumerate() {
                let Some(mut worker) = self.shared.worker(pair) else {
                    continue;
                };
                // A polling worker hands its thread back as soon as anything else is waiting.
                worker.share_thread(handler.as_raw_fd());
                handler.register_listener(
                    worker.tap().as_raw_fd(),
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    u64::from(map.tap_event(position)),
                )?;
            }
        }
        Ok(())
    }

    /// QEMU enables a NIC's rings before it acknowledges features.
    fn relay_frontend(&self) -> bool {
        true
    }

    /// A frontend that keeps the control queue to itself (QEMU) picks the queue pairs in use
    /// by enabling their rings: the tap steers frames to those pairs' queues.
    fn relay_hooks(&self) -> cloister_backends::relay::RelayHooks {
        let shared = Arc::clone(&self.shared);
        cloister_backends::relay::RelayHooks {
            on_enable: Some(Arc::new(move |index, enabled| {
                shared.device.ring_enabled(index as usize, enabled)
            })),
            inflight: None,
        }
    }

    fn disconnect(&self, backend: &Self::Backend) {
        for (i, worker) in self.shared.workers.iter().enumerate() {
            let c = lock(worker).take_counters();
            if c.rx_frames + c.tx_frames + c.rx_dropped + c.tx_dropped == 0 {
                // Also a connection that never started (a client waiting for its frontend).
                continue;
            }
            log::info!(
                "pair {i}: {} frames received, {} sent, {} and {} dropped",
                c.rx_frames,
                c.tx_frames,
                c.rx_dropped,
                c.tx_dropped
            );
        }
        self.reset();
        backend.mem.clear();
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

/// The virtio specification's largest split ring: nothing here is sized by the ring.
const VIRTQUEUE_MAX_SIZE: usize = 32768;

impl VhostUserBackend for Connection {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.shared.threads.queues()
    }

    fn max_queue_size(&self) -> usize {
        VIRTQUEUE_MAX_SIZE
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn acked_features(&self, features: u64) {
        log::debug!("features acknowledged: {features:#x}");
        self.shared.device.set_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        virtio::protocol_features()
    }

    fn reset_device(&self) {
        for worker in &self.shared.workers {
            lock(worker).reset();
        }
        self.shared.device.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        log::debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        virtio::config_slice(&self.shared.device.config_space(), offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // The MAC is changed through the control queue (CTRL_MAC_ADDR), not here.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-net config space is read-only",
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
        // Frames are handled whole within one event: holding the lock once is enough to know
        // the worker is done with the ring.
        let pair = queue_index as usize / 2;
        if let Some(worker) = self.shared.worker(pair) {
            drop(worker);
        } else {
            drop(lock(&self.shared.control));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        cloister_backends::sandbox::enter_worker(ThreadRole::NetWorker);
        // Errors are logged, never returned (an error ends the worker thread for good), and a
        // panic (a bug) is caught rather than silently ending the thread.
        let handled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let Some(mem) = self.memory() else { return };
            let shared = &self.shared;
            match shared.threads.event(thread_id, device_event) {
                Some(Event::RxKick { pair, rx }) => {
                    if let (Some(mut w), Some(vring)) = (shared.worker(pair), vrings.get(rx)) {
                        w.serve_rx(vring, &mem, &shared.device);
                    }
                }
                Some(Event::Tap { pair, rx }) => {
                    if let (Some(mut w), Some(vring)) = (shared.worker(pair), vrings.get(rx)) {
                        w.tap_ready();
                        w.serve_rx(vring, &mem, &shared.device);
                    }
                }
                Some(Event::TxKick { pair, tx }) => {
                    if let (Some(mut w), Some(vring)) = (shared.worker(pair), vrings.get(tx)) {
                        w.serve_tx(vring, &mem);
                    }
                }
                Some(Event::Control { vring }) => {
                    if let Some(vring) = vrings.get(vring) {
                        lock(&shared.control).serve(vring, &mem, &shared.device);
                    }
                }
                None => log::debug!("thread {thread_id}: ignoring event {device_event}"),
            }
        }));
        if handled.is_err() {
            log::error!(
                "thread {thread_id}: internal error while handling event {device_event}; its queue may stall until the device is reset"
            );
        }
        Ok(())
    }
}

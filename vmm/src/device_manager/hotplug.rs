//! Adding and removing devices while the VM runs. One thread does it, started with the VM
//! before anything is confined, with a seccomp role of its own (`vmm-hotplug`): it may connect
//! to backend sockets and start the device's threads (its control thread and its request
//! watchdog), and it asks the spawner process for managed backends. The main thread, which
//! watches the backends, can neither connect nor start threads, and no VMM thread can start a
//! process. Requests come through a [`Hotplug`] handle (the control plane's, and the tests');
//! they are served one at a time, and the slow parts (starting and connecting to a backend,
//! stopping its queues) run without the device manager's lock, so the main loop never waits
//! on a backend.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use cloister_seccomp::landlock::Rules;
use cloister_seccomp::ThreadRole;

use super::{plug, DeviceInfo, DeviceManager, DeviceManagerError};
use crate::config::device::TransportKind;
use crate::devices::acpi_hotplug::AcpiHotplug;
use crate::kinds::DeviceSpec;
use crate::vhost_user::{connection, Connection, ConnectionError};

enum Request {
    Add(
        Box<DeviceSpec>,
        Sender<Result<DeviceInfo, DeviceManagerError>>,
    ),
    Remove(String, Sender<Result<(), DeviceManagerError>>),
    /// Ask the guest to let go of device `id` (ACPI eject request); it goes when the guest
    /// ejects it.
    AskEject(String, Sender<Result<(), DeviceManagerError>>),
    /// The guest has ejected the device in this PCI slot.
    Ejected(u8),
    /// Seek device `serial`'s lost backend again (one attempt).
    Recover(u64),
}

/// Asks the hot-plug thread to add or remove a device; cheap to clone.
#[derive(Clone)]
pub struct Hotplug {
    requests: Sender<Request>,
}

impl Hotplug {
    /// Adds a device (PCI only) to the running VM; returns its id and address.
    pub fn add(&self, spec: DeviceSpec) -> Result<DeviceInfo, DeviceManagerError> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(Request::Add(Box::new(spec), tx))
            .map_err(|_| DeviceManagerError::Closed)?;
        rx.recv().unwrap_or(Err(DeviceManagerError::Closed))
    }

    /// Asks for one attempt at reaching device `serial`'s lost backend; returns at once (the
    /// outcome goes to the device manager).
    pub fn recover(&self, serial: u64) {
        let _ = self.requests.send(Request::Recover(serial));
    }

    /// Asks the guest, through ACPI, to let go of device `id` and eject it; returns once the
    /// request is made. The device goes when the guest ejects it (Cloud Hypervisor's and
    /// QEMU's way: a guest still using a device is not pulled from under).
    pub fn request_eject(&self, id: &str) -> Result<(), DeviceManagerError> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(Request::AskEject(id.to_string(), tx))
            .map_err(|_| DeviceManagerError::Closed)?;
        rx.recv().unwrap_or(Err(DeviceManagerError::Closed))
    }

    /// The guest has ejected the device in `slot`: takes it out. Returns at once (a vCPU
    /// thread calls this).
    pub fn ejected(&self, slot: u8) {
        let _ = self.requests.send(Request::Ejected(slot));
    }

    /// Removes device `id` at once, stopping its queues and its managed backend, and giving
    /// back its slot, BAR, vectors and socket.
    pub fn remove(&self, id: &str) -> Result<(), DeviceManagerError> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(Request::Remove(id.to_string(), tx))
            .map_err(|_| DeviceManagerError::Closed)?;
        rx.recv().unwrap_or(Err(DeviceManagerError::Closed))
    }
}

fn lock(m: &Mutex<DeviceManager>) -> MutexGuard<'_, DeviceManager> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the hot-plug thread for `manager`; it confines itself with `rules` (the runtime
/// directory and the operator sockets' directories) and serves until every handle is gone.
/// `guest` tells the guest of devices added and devices to eject, and hands back the slots it
/// ejects.
pub fn start(
    manager: Arc<Mutex<DeviceManager>>,
    rules: Rules,
    guest: Arc<AcpiHotplug>,
) -> std::io::Result<Hotplug> {
    let (tx, rx) = mpsc::channel();
    let handle = Hotplug {
        requests: tx.clone(),
    };
    // The sink holds a handle, so it keeps this thread's channel open: the VM clears it when
    // it goes (`AcpiHotplug::clear_eject_sink`), and the thread ends.
    let sink = Mutex::new(handle.clone());
    guest.set_eject_sink(Box::new(move |slot| {
        sink.lock().unwrap_or_else(|e| e.into_inner()).ejected(slot)
    }));
    crate::signals::spawn_helper(
        std::thread::Builder::new().name("hotplug".into()),
        move || match cloister_seccomp::enter(ThreadRole::VmmHotplug, &rules) {
            Ok(_) => serve(&manager, &guest, rx),
            Err(e) => {
                eprintln!(
                    "cloister: warning: devices cannot be added or removed: the hot-plug \
                         thread cannot enter its sandbox: {}",
                    crate::error_chain(&e)
                );
            }
        },
    )?;
    drop(tx);
    Ok(handle)
}

fn serve(manager: &Mutex<DeviceManager>, guest: &AcpiHotplug, requests: Receiver<Request>) {
    while let Ok(r) = requests.recv() {
        match r {
            Request::Add(spec, reply) => {
                let added = add(manager, *spec);
                if let Ok(info) = &added {
                    crate::events::device(
                        "added",
                        &info.id,
                        Some(serde_json::json!({ "bdf": info.address })),
                    );
                    if let Ok(Some(slot)) = lock(manager).pci_slot(&info.id) {
                        guest.device_added(slot);
                    }
                }
                let _ = reply.send(added);
            }
            Request::Remove(id, reply) => {
                let _ = reply.send(remove(manager, &id));
            }
            Request::AskEject(id, reply) => {
                let slot = lock(manager).pci_slot(&id);
                let _ = reply.send(match slot {
                    Ok(Some(slot)) => {
                        crate::events::device("ejecting", &id, None);
                        guest.eject_requested(slot);
                        Ok(())
                    }
                    Ok(None) => Err(DeviceManagerError::MmioRemoval(id)),
                    Err(e) => Err(e),
                });
            }
            Request::Ejected(slot) => {
                let id = lock(manager).in_pci_slot(slot);
                if let Some(id) = id {
                    match remove(manager, &id) {
                        Ok(()) => eprintln!("cloister: {id}: ejected by the guest; removed"),
                        Err(e) => eprintln!(
                            "cloister: {id}: ejected by the guest, but cannot be removed: {}",
                            crate::error_chain(&e)
                        ),
                    }
                }
            }
            Request::Recover(serial) => recover(manager, serial),
        }
    }
}

fn add(manager: &Mutex<DeviceManager>, spec: DeviceSpec) -> Result<DeviceInfo, DeviceManagerError> {
    if spec.transport == TransportKind::Mmio {
        return Err(DeviceManagerError::MmioAtRunTime(format!(
            "{} {}",
            spec.option, spec.value
        )));
    }
    if matches!(spec.backend, crate::kinds::Backend::Listen(_)) {
        return Err(DeviceManagerError::ListenAtRunTime(format!(
            "{} {}",
            spec.option, spec.value
        )));
    }
    let (device, memory) = {
        let mut m = lock(manager);
        let memory = m.memory()?;
        (m.launch(spec)?, memory)
    };
    // A managed backend that is stopped because the add failed leaves its socket file.
    let leftover = matches!(device.spec.backend, crate::kinds::Backend::Managed(_))
        .then(|| device.socket_path.clone());
    let added = plug::connect(device, &memory).and_then(|c| lock(manager).place(c));
    if let (Err(_), Some(path)) = (&added, leftover) {
        let _ = std::fs::remove_file(path);
    }
    added
}

fn remove(manager: &Mutex<DeviceManager>, id: &str) -> Result<(), DeviceManagerError> {
    let unplugged = lock(manager).take_out(id)?;
    if let Some(place) = unplugged.finish() {
        lock(manager).release(&place);
    }
    crate::events::device("removed", id, None);
    Ok(())
}

/// How long one attempt waits for an operator's backend's socket to take a connection.
const RECOVERY_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// One attempt at device `serial`'s lost backend: connect, negotiate, and have the device's
/// control thread start the running rings on it. Without the manager's lock.
fn recover(manager: &Mutex<DeviceManager>, serial: u64) {
    let Some(target) = lock(manager).recovery_target(serial) else {
        return;
    };
    if target.managed {
        if let Err(why) = lock(manager).respawn_if_gone(serial) {
            lock(manager).recovery_failed(serial, &why, false);
            return;
        }
    }
    // A backend we start gets the time any managed backend gets to make its socket; one
    // that exits meanwhile ends the wait.
    let wait = if target.managed {
        super::CONNECT_TIMEOUT
    } else {
        RECOVERY_CONNECT_WAIT
    };
    let stream = if let Some(listener) = &target.listener {
        listener
            .accept_within(RECOVERY_CONNECT_WAIT)
            .map_err(|e| (crate::error_chain(&e), false))
            .and_then(|s| s.ok_or_else(|| ("no backend has connected yet".to_string(), false)))
    } else if target.server_mode {
        Err(("cannot listen for the backend".to_string(), false))
    } else {
        connection::connect(&target.socket, wait, &mut || {
            lock(manager).backend_alive(serial)
        })
        .map_err(|e| (crate::error_chain(&e), false))
    };
    let attempt = stream
        .and_then(|stream| {
            Connection::new(stream, &target.id, target.queues).map_err(|e| {
                // A backend that answers but is not what the device needs is refused; one
                // that does not answer (yet) is tried again.
                let refused = matches!(
                    e,
                    ConnectionError::NoVersion1
                        | ConnectionError::NoProtocolFeatures
                        | ConnectionError::MissingProtocolFeature(_)
                        | ConnectionError::BadQueueCount(_)
                        | ConnectionError::TooFewQueues { .. }
                );
                (crate::error_chain(&e), refused)
            })
        })
        .and_then(|conn| {
            let socket = conn.socket_dup().map_err(|e| (e.to_string(), false))?;
            target
                .control
                .reconnect(conn)
                .map(|()| socket)
                .map_err(|e| (e, true))
        });
    let mut m = lock(manager);
    match attempt {
        Ok(socket) => m.recovered(serial, socket),
        Err((why, refused)) => m.recovery_failed(serial, &why, refused),
    }
}

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
use crate::kinds::DeviceSpec;

enum Request {
    Add(
        Box<DeviceSpec>,
        Sender<Result<DeviceInfo, DeviceManagerError>>,
    ),
    Remove(String, Sender<Result<(), DeviceManagerError>>),
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

    /// Removes device `id`, stopping its queues and its managed backend, and giving back its
    /// slot, BAR, vectors and socket.
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
pub fn start(manager: Arc<Mutex<DeviceManager>>, rules: Rules) -> std::io::Result<Hotplug> {
    let (tx, rx) = mpsc::channel();
    crate::signals::spawn_helper(
        std::thread::Builder::new().name("hotplug".into()),
        move || match cloister_seccomp::enter(ThreadRole::VmmHotplug, &rules) {
            Ok(_) => serve(&manager, rx),
            Err(e) => {
                eprintln!(
                    "cloister: warning: devices cannot be added or removed: the hot-plug \
                         thread cannot enter its sandbox: {}",
                    crate::error_chain(&e)
                );
            }
        },
    )?;
    Ok(Hotplug { requests: tx })
}

fn serve(manager: &Mutex<DeviceManager>, requests: Receiver<Request>) {
    while let Ok(r) = requests.recv() {
        match r {
            Request::Add(spec, reply) => {
                let _ = reply.send(add(manager, *spec));
            }
            Request::Remove(id, reply) => {
                let _ = reply.send(remove(manager, &id));
            }
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
    Ok(())
}

//! Plugging one device in, in two steps: [`connect`] (its backend's socket, negotiation, the
//! config space: the slow part, which may wait on a backend, run without the manager's lock)
//! and [`place`] (a PCI slot and BAR or a virtio-mmio slot, and the transport: quick).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::device::{Device, Place, Plugged};
use super::{Buses, DeviceManagerError, CONNECT_TIMEOUT};
use crate::config::device::TransportKind;
use crate::kinds::Backend;
use crate::layout::VIRTIO_MMIO_SIZE;
use crate::memory::GuestMemoryMmap;
use crate::supervisor::{self, SpawnedProcess};
use crate::vhost_user::connection::{self, ConnectionError};
use crate::vhost_user::control::{ControlHandle, Failures};
use crate::vhost_user::{Connection, VhostUserDevice};
use crate::virtio::mmio_transport::VirtioMmioDevice;
use crate::virtio::pci_transport::{self, VirtioPciDevice};
use crate::virtio::VirtioTransport;

/// How long cloister waits for a backend to connect to it (`vhost_mode=server`): the operator
/// may start it after the VM.
pub const SERVER_MODE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A device whose backend is connected and negotiated, not in the VM yet.
pub struct Connected {
    device: Device,
    vhost: VhostUserDevice,
    /// Our duplicate of the connection's socket, for the main loop to watch.
    socket: OwnedFd,
    failures: Arc<Failures>,
    control: Option<ControlHandle>,
}

/// Connects to `d`'s backend (waiting for a managed one's socket to appear) and negotiates.
/// On failure the device is dropped, which stops a managed backend.
pub fn connect(mut d: Device, memory: &GuestMemoryMmap) -> Result<Connected, DeviceManagerError> {
    // Anything that fails from here is reported by our caller, with the label: nothing more
    // to say when the process is stopped.
    d.failed = true;
    let label = d.label();
    let connect_error = |e| DeviceManagerError::Connect(label.clone(), e);
    // The backend must serve the queues the kind cannot do without; the device then gets as
    // many of the rest as the backend has (`DeviceKind::usable_queues`).
    let required = d.spec.kind.required_queues(d.spec.queue_sizes.len());
    let queues = u16::try_from(required).unwrap_or(u16::MAX);
    let stream = if matches!(d.spec.backend, Backend::Listen(_)) {
        connection::accept(&d.socket_path, SERVER_MODE_WAIT).map_err(connect_error)?
    } else {
        let process = &mut d.process;
        connection::connect(&d.socket_path, CONNECT_TIMEOUT, &mut || match process
            .as_mut()
            .and_then(SpawnedProcess::try_wait)
        {
            Some(s) => Err(format!(
                "the backend exited with {} before its socket appeared",
                supervisor::describe(s)
            )),
            None => Ok(()),
        })
        .map_err(connect_error)?
    };
    let conn = Connection::new(stream, &d.id, queues).map_err(connect_error)?;
    let socket = conn
        .socket_dup()
        .map_err(|e| connect_error(ConnectionError::Setup(e)))?;
    let failures = Failures::new().map_err(|e| DeviceManagerError::Failures(label.clone(), e))?;
    let vhost = VhostUserDevice::new(
        &d.id,
        d.spec.kind.clone(),
        conn,
        memory.clone(),
        d.spec.queue_sizes.clone(),
        failures.clone(),
    )
    .map_err(connect_error)?;
    d.failed = false;
    let control = vhost.control_handle();
    Ok(Connected {
        device: d,
        vhost,
        socket,
        failures,
        control,
    })
}

/// Places a connected device on PCI or MMIO; everything it took is given back if that fails.
pub fn place(c: Connected, buses: &mut Buses) -> Result<Device, DeviceManagerError> {
    let Connected {
        mut device,
        vhost,
        socket,
        failures,
        control,
    } = c;
    let label = device.label();
    let name = device.id.clone();
    let place_error = |e| DeviceManagerError::Place(label.clone(), e);
    let (transport, place): (Arc<dyn VirtioTransport>, Place) = match device.spec.transport {
        TransportKind::Pci => {
            let bar = buses
                .placement
                .allocate_bar(pci_transport::BAR_SIZE)
                .map_err(place_error)?;
            let plugged = VirtioPciDevice::new(
                &name,
                Box::new(vhost),
                bar.start(),
                buses.vm.clone(),
                buses.mmio_bus.clone(),
            )
            .map_err(|e| DeviceManagerError::Pci(label.clone(), e))
            .and_then(|dev| {
                let slot = buses.placement.plug_pci(dev.clone()).map_err(place_error)?;
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
        TransportKind::Mmio => {
            let slot = buses.placement.allocate_mmio().map_err(place_error)?;
            let plugged = VirtioMmioDevice::new(
                &name,
                Box::new(vhost),
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
    device.socket = Some(socket);
    device.plugged = Some(Plugged {
        transport,
        place,
        failures,
        control,
    });
    Ok(device)
}

//! The boundary between a transport (PCI or MMIO) and a device. A device knows its type, its
//! features, its config space and how to start and stop its queues; it knows nothing of BARs,
//! registers or interrupt controllers. In Cloister the device is a vhost-user connection.

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// A queue the driver set up, handed to the device at DRIVER_OK.
#[derive(Debug)]
pub struct ActiveQueue {
    pub index: usize,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    /// Signalled (by KVM, through an ioeventfd) when the driver notifies the queue.
    pub kick: EventFd,
    /// Signalling it interrupts the guest (an irqfd), for used buffers.
    pub call: EventFd,
}

/// Why a device could not start or stop; the transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

pub trait VirtioDevice: Send {
    /// Virtio device ID (2 = block).
    fn device_type(&self) -> u32;

    /// Largest size of each queue the device has; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features offered to the driver; must include VIRTIO_F_VERSION_1.
    fn features(&self) -> u64;

    /// Reads the device-specific config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver write to the device-specific config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// DRIVER_OK: start processing `queues` (the enabled ones) with the negotiated `features`.
    fn activate(&mut self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), DeviceError>;

    /// Device reset: stop every queue started by [`VirtioDevice::activate`]. The device can be
    /// activated again afterwards.
    fn reset(&mut self);

    /// Called when the device has been marked as needing a reset because its backend went
    /// away; later activations fail until something reconnects it.
    fn backend_lost(&mut self) {}
}

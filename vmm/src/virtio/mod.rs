//! Virtio 1.x transports. [`pci_transport`] and [`mmio_transport`] decode registers;
//! [`core::VirtioCore`] holds what they share; [`device::VirtioDevice`] is the device behind
//! them (in Cloister always a vhost-user backend).

pub mod core;
pub mod device;
pub mod driver_log;
pub mod mmio_transport;
pub mod pci_transport;

pub use device::{ActiveQueue, DeviceError, VirtioDevice};

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// "No MSI-X vector" in msix_config and queue_msix_vector.
pub const NO_VECTOR: u16 = 0xffff;

/// Interrupt status bits (the PCI ISR byte and the MMIO InterruptStatus register).
pub const INTERRUPT_VRING: u32 = 1;
pub const INTERRUPT_CONFIG: u32 = 2;

/// What the VMM's main thread can do to a device after start-up, whatever its transport.
pub trait VirtioTransport: Send + Sync {
    /// The device is leaving the VM: stop its queues and take it off the buses and out of
    /// KVM (its notification ioeventfds). Its interrupts go when it is dropped.
    fn unplug(&self);

    /// The backend is gone: set DEVICE_NEEDS_RESET, tell the device, and raise a configuration
    /// change interrupt so the driver looks.
    fn backend_lost(&self);
}

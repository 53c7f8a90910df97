//! PCI: one PCIe root bus (bus 0) behind a host bridge, reached through ECAM and the legacy
//! 0xCF8/0xCFC ports; BARs assigned from the 32-bit and 64-bit windows of [`crate::layout`];
//! MSI-X delivered by KVM irqfds.

pub mod bus;
pub mod config_space;
pub mod host_bridge;
pub mod msix;

pub use bus::{PciConfigIo, PciConfigMmio, PciRoot, PciRootError};
pub use config_space::{ConfigSpace, Header};

/// Red Hat, Inc.: the vendor of QEMU's (and our) host bridge.
pub const VENDOR_REDHAT: u16 = 0x1b36;

/// A function on the root bus. Config accesses come from any vCPU thread, so devices lock
/// internally. Offsets are within the function's 4 KiB of ECAM space.
pub trait PciDevice: Send + Sync {
    fn config_read(&self, offset: usize, data: &mut [u8]);
    fn config_write(&self, offset: usize, data: &[u8]);
}

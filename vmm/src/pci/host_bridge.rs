//! Device 00.0: the host bridge. It only has to exist and say what it is; guests find the
//! bridge's windows in the DSDT (`\_SB_.PCI0._CRS`), not here.

use std::sync::Mutex;

use super::config_space::{ConfigSpace, Header};
use super::{PciDevice, VENDOR_REDHAT};

/// QEMU's "PCIe host bridge" ID, which guests already know.
const DEVICE_ID: u16 = 0x0008;
/// Bridge device, host bridge.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

pub struct HostBridge {
    config: Mutex<ConfigSpace>,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: Mutex::new(ConfigSpace::new(&Header {
                vendor_id: VENDOR_REDHAT,
                device_id: DEVICE_ID,
                revision_id: 0,
                class_code: CLASS_HOST_BRIDGE,
                subsystem_vendor_id: VENDOR_REDHAT,
                subsystem_id: DEVICE_ID,
            })),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data);
    }

    fn config_write(&self, offset: usize, data: &[u8]) {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
    }
}

//! The root bus and its two config-space access methods: ECAM (memory-mapped, 4 KiB per
//! function) and the legacy configuration mechanism #1 (address at 0xCF8, data at 0xCFC).
//!
//! Only function 0 of each device on bus 0 exists; every other address reads all ones, which is
//! how a guest learns nothing is there.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use super::config_space::ECAM_FUNCTION_SIZE;
use super::host_bridge::HostBridge;
use super::PciDevice;
use crate::devices::BusDevice;

pub const DEVICES_PER_BUS: usize = 32;
/// The legacy mechanism's ports.
pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciRootError {
    #[error("no free slot on PCI bus 0 (all {DEVICES_PER_BUS} are used)")]
    Full,
}

type Slots = [Option<Arc<dyn PciDevice>>; DEVICES_PER_BUS];

/// Devices come and go while the VM runs (hot-plug), so the slots are behind a lock; an
/// access takes the device out of it and runs without it.
pub struct PciRoot {
    devices: Mutex<Slots>,
}

impl PciRoot {
    /// A root bus with the host bridge at 00.0.
    pub fn new() -> Self {
        let mut devices: Slots = Default::default();
        devices[0] = Some(Arc::new(HostBridge::new()));
        PciRoot {
            devices: Mutex::new(devices),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plugs `device` into the lowest free slot; returns the device number.
    pub fn add(&self, device: Arc<dyn PciDevice>) -> Result<u8, PciRootError> {
        let mut slots = self.slots();
        let slot = slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciRootError::Full)?;
        slots[slot] = Some(device);
        Ok(slot as u8)
    }

    /// How many slots are taken, the host bridge's included.
    pub fn len(&self) -> usize {
        self.slots().iter().filter(|d| d.is_some()).count()
    }

    /// Whether the bus has nothing on it (never: the host bridge is always there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unplugs the device in `slot` (never the host bridge); returns it.
    pub fn remove(&self, slot: u8) -> Option<Arc<dyn PciDevice>> {
        if slot == 0 {
            return None;
        }
        self.slots().get_mut(usize::from(slot))?.take()
    }

    fn device(&self, bus: u32, device: u32, function: u32) -> Option<Arc<dyn PciDevice>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots().get(device as usize)?.clone()
    }

    pub fn config_read(&self, bus: u32, dev: u32, func: u32, offset: usize, data: &mut [u8]) {
        match self.device(bus, dev, func) {
            Some(d) if offset + data.len() <= ECAM_FUNCTION_SIZE => d.config_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    pub fn config_write(&self, bus: u32, dev: u32, func: u32, offset: usize, data: &[u8]) {
        if let Some(d) = self.device(bus, dev, func) {
            if offset + data.len() <= ECAM_FUNCTION_SIZE {
                d.config_write(offset, data);
            }
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// ECAM: offset = bus << 20 | device << 15 | function << 12 | register.
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigMmio { root }
    }
}

fn ecam_decode(offset: u64) -> (u32, u32, u32, usize) {
    (
        (offset >> 20) as u32 & 0xff,
        (offset >> 15) as u32 & 0x1f,
        (offset >> 12) as u32 & 0x7,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for PciConfigMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        self.root.config_read(bus, dev, func, reg, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        self.root.config_write(bus, dev, func, reg, data);
    }
}

/// Mechanism #1: a dword write to 0xCF8 selects bus/device/function/register, then 0xCFC-0xCFF
/// access that dword of config space.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: Mutex<u32>,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo {
            root,
            address: Mutex::new(0),
        }
    }

    fn target(&self, port_offset: u64, len: usize) -> Option<(u32, u32, u32, usize)> {
        let a = *self.address.lock().unwrap_or_else(|e| e.into_inner());
        let within = (port_offset - 4) as usize;
        if a & CONFIG_ADDRESS_ENABLE == 0 || within + len > 4 {
            return None;
        }
        Some((
            (a >> 16) & 0xff,
            (a >> 11) & 0x1f,
            (a >> 8) & 0x7,
            (a & 0xfc) as usize + within,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            let a = *self.address.lock().unwrap_or_else(|e| e.into_inner());
            data.copy_from_slice(&a.to_le_bytes());
            return;
        }
        match (offset >= 4)
            .then(|| self.target(offset, data.len()))
            .flatten()
        {
            Some((bus, dev, func, reg)) => self.root.config_read(bus, dev, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let a = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            *self.address.lock().unwrap_or_else(|e| e.into_inner()) = a;
            return;
        }
        // Narrower writes to 0xCF8-0xCFB are other chipset registers (0xCF9 is a reset
        // control on PCs); we have none of them.
        if offset >= 4 {
            if let Some((bus, dev, func, reg)) = self.target(offset, data.len()) {
                self.root.config_write(bus, dev, func, reg, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Echo(Mutex<Vec<(usize, Vec<u8>)>>);

    impl PciDevice for Echo {
        fn config_read(&self, offset: usize, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset + i) as u8;
            }
        }
        fn config_write(&self, offset: usize, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    fn root_with_echo() -> (Arc<PciRoot>, Arc<Echo>) {
        let root = PciRoot::new();
        let echo = Arc::new(Echo::default());
        assert_eq!(root.add(echo.clone()), Ok(1));
        (Arc::new(root), echo)
    }

    #[test]
    fn ecam_reaches_functions() {
        let (root, echo) = root_with_echo();
        let ecam = PciConfigMmio::new(root);
        let mut b = [0u8; 4];
        // 00.0: the host bridge (Red Hat, 0x0008).
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        ecam.read((1 << 15) | 0x10, &mut b);
        assert_eq!(b, [0x10, 0x11, 0x12, 0x13]);
        // Absent device, other function, other bus.
        for off in [2 << 15, (1 << 15) | (1 << 12), 1 << 20] {
            ecam.read(off, &mut b);
            assert_eq!(b, [0xff; 4]);
        }
        ecam.write((1 << 15) | 0x104, &[7]);
        assert_eq!(echo.0.lock().unwrap().as_slice(), &[(0x104, vec![7])]);
    }

    #[test]
    fn legacy_ports() {
        let (root, echo) = root_with_echo();
        let io = PciConfigIo::new(root);
        let mut b = [0u8; 4];
        // Disabled address: all ones.
        io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        io.write(0, &(0x8000_0000u32 | (1 << 11) | 0x3c).to_le_bytes());
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_083c);
        io.read(4, &mut b);
        assert_eq!(b, [0x3c, 0x3d, 0x3e, 0x3f]);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(w, [0x3e, 0x3f]);
        io.write(5, &[9]);
        assert_eq!(echo.0.lock().unwrap().as_slice(), &[(0x3d, vec![9])]);
        // An access running past 0xCFF is refused rather than spilling into the next dword.
        io.read(6, &mut b);
        assert_eq!(b, [0xff; 4]);
        // A byte write to 0xCF8 is not the address register.
        io.write(0, &[0]);
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_083c);
    }

    #[test]
    fn bus_fills_up() {
        let root = PciRoot::new();
        for slot in 1..32 {
            assert_eq!(root.add(Arc::new(Echo::default())), Ok(slot));
        }
        assert_eq!(root.add(Arc::new(Echo::default())), Err(PciRootError::Full));
    }
}

//! Address-range buses for port I/O and MMIO exits: a range maps to a device, the device gets
//! the offset into its range.
//!
//! Ranges can be added and removed while vCPUs run (PCI BARs move), so the map sits behind an
//! `RwLock`; vCPUs only take the read side, which is uncontended in steady state.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use thiserror::Error;

/// A device on a bus. Methods take `&self` so a device can be shared by all vCPU threads and
/// the main thread; devices with state lock internally.
pub trait BusDevice: Send + Sync {
    /// `offset` is relative to the start of the range the device was inserted at.
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

struct Entry {
    len: u64,
    device: Arc<dyn BusDevice>,
}

#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, device: Arc<dyn BusDevice>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let overlaps_prev = map
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        map.insert(base, Entry { len, device });
        Ok(())
    }

    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Finds the device at `addr` and returns a reference of its own, so the lock is released
    /// before the device runs. Calling the device under the read guard would save the Arc
    /// clone, but handlers re-enter the bus: a guest write to a BAR in config space (through
    /// ECAM, itself on the MMIO bus) makes the device move its BAR with `remove` and `insert`
    /// on the same bus, which would deadlock against our own read guard. A slow handler under
    /// the guard would also hold up every writer and, once one waits, every other vCPU.
    fn resolve(&self, addr: u64) -> Option<(Arc<dyn BusDevice>, u64)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then(|| (entry.device.clone(), offset))
    }

    /// Returns false if nothing is mapped at `addr` (the caller decides what the guest reads).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_with_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.write(0x400, &[0]));
        assert_eq!(dev.0.lock().unwrap().as_slice(), &[(0, vec![b'x'])]);
    }

    /// A device whose write handler moves itself on the bus it is on, like a BAR write.
    struct Mover {
        bus: Arc<Bus>,
        me: Mutex<std::sync::Weak<Mover>>,
    }

    impl BusDevice for Mover {
        fn read(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&self, _offset: u64, data: &[u8]) {
            // Moves from 0x1000 to data[0] << 8.
            let me = self.me.lock().unwrap().upgrade().unwrap();
            self.bus.remove(0x1000).unwrap();
            self.bus.insert(me, u64::from(data[0]) << 8, 0x100).unwrap();
        }
    }

    #[test]
    fn handlers_can_reenter_the_bus() {
        let bus = Arc::new(Bus::new());
        let dev = Arc::new(Mover {
            bus: bus.clone(),
            me: Mutex::new(std::sync::Weak::new()),
        });
        *dev.me.lock().unwrap() = Arc::downgrade(&dev);
        bus.insert(dev, 0x1000, 0x100).unwrap();
        // Returns instead of deadlocking; the device is now at 0x2000.
        assert!(bus.write(0x1004, &[0x20]));
        assert!(!bus.read(0x1000, &mut [0]));
        assert!(bus.read(0x2000, &mut [0]));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let bus = Bus::new();
        let dev: Arc<dyn BusDevice> = Arc::new(Recorder::default());
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf8, 0x9),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(dev.clone(), 0xf0, 0x10).unwrap();
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        bus.remove(0x100).unwrap();
        assert!(bus.remove(0x100).is_err());
        bus.insert(dev, 0x100, 0x10).unwrap();
    }
}

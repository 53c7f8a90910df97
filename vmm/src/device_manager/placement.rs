//! Where devices go in the VM, decided in one place: PCI slots, BAR addresses (the 64-bit
//! window above RAM first, the 32-bit one below 4 GiB if that is full) and virtio-mmio slots
//! (each with its IOAPIC pin). Everything handed out is given back when a device leaves, so a
//! device added and removed over and over uses nothing up. (MSI-X GSIs are the transport's,
//! through [`crate::vm_ops::VmOps`].)

use std::sync::Arc;

use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::layout::{VirtioMmioSlot, VIRTIO_MMIO_SLOTS};
use crate::pci::{PciDevice, PciRoot, PciRootError};

#[derive(Debug, Error)]
pub enum PlacementError {
    #[error("no room for a {size:#x}-byte BAR in either PCI window")]
    NoBarSpace { size: u64 },
    #[error(transparent)]
    PciFull(#[from] PciRootError),
    #[error("no free virtio-mmio slot (there are {VIRTIO_MMIO_SLOTS})")]
    MmioFull,
    #[error("a PCI window at {start:#x} of {size:#x} bytes is not valid")]
    Window { start: u64, size: u64 },
}

/// A BAR's range and the window it came from.
#[derive(Clone, Debug)]
pub struct Bar {
    range: RangeInclusive,
    high: bool,
}

impl Bar {
    pub fn start(&self) -> u64 {
        self.range.start()
    }
}

pub struct Placement {
    pci: Arc<PciRoot>,
    bar64: AddressAllocator,
    bar32: AddressAllocator,
    mmio: [bool; VIRTIO_MMIO_SLOTS as usize],
}

impl Placement {
    /// `window64` and `window32` are (start, size).
    pub fn new(
        pci: Arc<PciRoot>,
        window64: (u64, u64),
        window32: (u64, u64),
    ) -> Result<Self, PlacementError> {
        let window = |(start, size)| {
            AddressAllocator::new(start, size).map_err(|_| PlacementError::Window { start, size })
        };
        Ok(Placement {
            pci,
            bar64: window(window64)?,
            bar32: window(window32)?,
            mmio: [false; VIRTIO_MMIO_SLOTS as usize],
        })
    }

    pub fn pci(&self) -> &Arc<PciRoot> {
        &self.pci
    }

    /// A naturally aligned BAR of `size` bytes (a power of two).
    pub fn allocate_bar(&mut self, size: u64) -> Result<Bar, PlacementError> {
        let take = |a: &mut AddressAllocator| a.allocate(size, size, AllocPolicy::FirstMatch);
        if let Ok(range) = take(&mut self.bar64) {
            return Ok(Bar { range, high: true });
        }
        take(&mut self.bar32)
            .map(|range| Bar { range, high: false })
            .map_err(|_| PlacementError::NoBarSpace { size })
    }

    pub fn free_bar(&mut self, bar: &Bar) {
        let window = if bar.high {
            &mut self.bar64
        } else {
            &mut self.bar32
        };
        let _ = window.free(&bar.range);
    }

    /// Plugs `device` into the lowest free PCI slot.
    pub fn plug_pci(&mut self, device: Arc<dyn PciDevice>) -> Result<u8, PlacementError> {
        Ok(self.pci.add(device)?)
    }

    pub fn unplug_pci(&mut self, slot: u8) {
        self.pci.remove(slot);
    }

    pub fn allocate_mmio(&mut self) -> Result<VirtioMmioSlot, PlacementError> {
        let n = self
            .mmio
            .iter()
            .position(|used| !used)
            .ok_or(PlacementError::MmioFull)?;
        self.mmio[n] = true;
        VirtioMmioSlot::new(n as u32).ok_or(PlacementError::MmioFull)
    }

    pub fn free_mmio(&mut self, slot: &VirtioMmioSlot) {
        if let Some(used) = self.mmio.get_mut(slot.index() as usize) {
            *used = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        Placement::new(
            Arc::new(PciRoot::new()),
            (1 << 32, 0x4_0000),
            (0xc000_0000, 0x1_0000),
        )
        .unwrap()
    }

    #[test]
    fn bars_are_aligned_spill_to_32_bit_and_come_back() {
        let mut p = placement();
        let a = p.allocate_bar(0x2_0000).unwrap();
        let b = p.allocate_bar(0x2_0000).unwrap();
        assert_eq!((a.start(), b.start()), (1 << 32, (1 << 32) + 0x2_0000));
        // The 64-bit window is full: the 32-bit one.
        let c = p.allocate_bar(0x8000).unwrap();
        assert_eq!(c.start(), 0xc000_0000);
        assert!(matches!(
            p.allocate_bar(0x2_0000),
            Err(PlacementError::NoBarSpace { .. })
        ));
        p.free_bar(&a);
        assert_eq!(p.allocate_bar(0x2_0000).unwrap().start(), 1 << 32);
        p.free_bar(&c);
        assert_eq!(p.allocate_bar(0x8000).unwrap().start(), 0xc000_0000);
    }

    #[test]
    fn mmio_slots_are_reused() {
        let mut p = placement();
        let slots: Vec<_> = (0..VIRTIO_MMIO_SLOTS)
            .map(|_| p.allocate_mmio().unwrap())
            .collect();
        assert!(matches!(p.allocate_mmio(), Err(PlacementError::MmioFull)));
        p.free_mmio(&slots[3]);
        assert_eq!(p.allocate_mmio().unwrap(), slots[3]);
    }
}

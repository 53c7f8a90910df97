//! The registers behind ACPI hot-plug and the power button: a 16-byte MMIO block the DSDT's
//! methods read and write (see [`crate::acpi::hotplug`]), and the interrupt of the Generic
//! Event Device (GED, ACPI0013) that tells the guest to look.
//!
//! | offset | register | |
//! | --- | --- | --- |
//! | 0x0 | `EVTS` | events since the last read (PCI slots changed, power button); read clears |
//! | 0x4 | `PCIU` | slots with a new device since the last read; read clears |
//! | 0x8 | `PCID` | slots whose device the VMM wants ejected since the last read; read clears |
//! | 0xC | `B0EJ` | written by the guest's `_EJ0`: the slots it has let go of |
//!
//! Cloud Hypervisor's guests see the same scheme (its `PHPR` and GED devices); Linux's
//! `acpiphp` and GED drivers, built into distribution kernels, need nothing more.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

pub const EVTS: u64 = 0x0;
pub const PCIU: u64 = 0x4;
pub const PCID: u64 = 0x8;
pub const B0EJ: u64 = 0xc;
pub const LEN: u64 = 0x10;

/// `EVTS` bits.
pub const EVENT_PCI: u32 = 1 << 1;
pub const EVENT_POWER_BUTTON: u32 = 1 << 2;

/// Called, on a vCPU thread, with each slot the guest has ejected: must not block.
pub type EjectSink = Box<dyn Fn(u8) + Send>;

pub struct AcpiHotplug {
    events: AtomicU32,
    up: AtomicU32,
    down: AtomicU32,
    /// The GED's interrupt (an irqfd).
    irq: EventFd,
    eject: Mutex<Option<EjectSink>>,
}

impl AcpiHotplug {
    pub fn new(irq: EventFd) -> Self {
        AcpiHotplug {
            events: AtomicU32::new(0),
            up: AtomicU32::new(0),
            down: AtomicU32::new(0),
            irq,
            eject: Mutex::new(None),
        }
    }

    /// Where ejected slots go (the hot-plug thread, which takes the device out).
    pub fn set_eject_sink(&self, sink: EjectSink) {
        *self.eject.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    /// No more ejects are passed on (the VM is going).
    pub fn clear_eject_sink(&self) {
        *self.eject.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A device is now in `slot`: the guest should scan it.
    pub fn device_added(&self, slot: u8) {
        self.up.fetch_or(slot_bit(slot), Ordering::SeqCst);
        self.raise(EVENT_PCI);
    }

    /// The device in `slot` should go: the guest should let go of it and eject it.
    pub fn eject_requested(&self, slot: u8) {
        self.down.fetch_or(slot_bit(slot), Ordering::SeqCst);
        self.raise(EVENT_PCI);
    }

    /// The power button is pressed.
    pub fn power_button(&self) {
        self.raise(EVENT_POWER_BUTTON);
    }

    fn raise(&self, event: u32) {
        // The bits before the interrupt: the guest's handler reads them.
        self.events.fetch_or(event, Ordering::SeqCst);
        let _ = self.irq.write(1);
    }
}

fn slot_bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

impl BusDevice for AcpiHotplug {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // The DSDT reads whole dwords; anything else reads as zero and clears nothing.
        let value = match (offset, data.len()) {
            (EVTS, 4) => self.events.swap(0, Ordering::SeqCst),
            (PCIU, 4) => self.up.swap(0, Ordering::SeqCst),
            (PCID, 4) => self.down.swap(0, Ordering::SeqCst),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset != B0EJ || data.len() != 4 {
            return;
        }
        let slots = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let sink = self.eject.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sink) = sink.as_ref() else {
            return;
        };
        for slot in 0..32u8 {
            if slots & slot_bit(slot) != 0 {
                sink(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn read(d: &AcpiHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_plug_and_an_eject_request_reach_the_guest_once() {
        let d = AcpiHotplug::new(EventFd::new(EFD_NONBLOCK).unwrap());
        d.device_added(5);
        d.eject_requested(3);
        assert_eq!(d.irq.read().unwrap(), 2, "one interrupt each");
        assert_eq!(read(&d, EVTS), EVENT_PCI);
        assert_eq!(read(&d, EVTS), 0, "read clears");
        assert_eq!(read(&d, PCIU), 1 << 5);
        assert_eq!(read(&d, PCIU), 0);
        assert_eq!(read(&d, PCID), 1 << 3);
        d.power_button();
        assert_eq!(read(&d, EVTS), EVENT_POWER_BUTTON);
        let mut short = [0xffu8; 2];
        d.device_added(7);
        d.read(PCIU, &mut short);
        assert_eq!(short, [0, 0], "a narrow read neither sees nor clears");
        assert_eq!(read(&d, PCIU), 1 << 7);
    }

    #[test]
    fn the_guests_eject_names_its_slots() {
        let d = AcpiHotplug::new(EventFd::new(EFD_NONBLOCK).unwrap());
        d.write(B0EJ, &(1u32 << 4).to_le_bytes()); // no sink yet: ignored
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        d.set_eject_sink(Box::new(move |slot| {
            let _ = tx.lock().unwrap().send(slot);
        }));
        d.write(B0EJ, &((1u32 << 4) | (1 << 31)).to_le_bytes());
        d.write(PCIU, &[1, 0, 0, 0]);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [4, 31]);
    }
}

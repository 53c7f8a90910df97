//! pvpanic at I/O port 0x505 (QEMU's ISA device, ACPI HID QEMU0001): the guest writes bit 0
//! when it panics.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::exit::{ExitLatch, ExitReason};

pub const PVPANIC_PORT: u16 = 0x505;
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest loaded a crash kernel and will kexec into it; it keeps running.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    exit: Arc<ExitLatch>,
}

impl PvPanic {
    pub fn new(exit: Arc<ExitLatch>) -> Self {
        PvPanic { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // The driver reads the events we support and only reports those.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            self.exit.request(ExitReason::GuestPanic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panicked_bit_stops_the_vm() {
        let exit = Arc::new(ExitLatch::new().unwrap());
        let dev = PvPanic::new(exit.clone());
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], 3);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(exit.reason(), None);
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestPanic));
    }

    #[test]
    fn odd_sizes() {
        let exit = Arc::new(ExitLatch::new().unwrap());
        let dev = PvPanic::new(exit.clone());
        let mut wide = [0xaau8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [3, 0, 0, 0]);
        dev.read(0, &mut []);
        dev.write(0, &[]);
        dev.write(0, &[0, PVPANIC_PANICKED]);
        assert_eq!(exit.reason(), None, "only the first byte is the register");
        dev.write(0, &[PVPANIC_PANICKED, 0]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestPanic));
    }
}

//! The hardware-reduced ACPI registers the FADT points at: sleep control, sleep status and
//! reset, one byte each in a small I/O block.
//!
//! Guests (and our test payloads) power off by writing [`S5_SLEEP_CONTROL_VALUE`] to
//! [`SLEEP_CONTROL_PORT`] and reboot by writing [`RESET_VALUE`] to [`RESET_PORT`].

use std::sync::Arc;

use super::bus::BusDevice;
use crate::exit::{ExitLatch, ExitReason};

pub const ACPI_PM_PORT: u16 = 0x600;
pub const ACPI_PM_PORT_LEN: u64 = 4;
pub const SLEEP_CONTROL_PORT: u16 = ACPI_PM_PORT;
pub const SLEEP_STATUS_PORT: u16 = ACPI_PM_PORT + 1;
pub const RESET_PORT: u16 = ACPI_PM_PORT + 2;
pub const RESET_VALUE: u8 = 0x01;

/// SLP_TYP for S5 as declared by the DSDT's `\_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register fields (ACPI 6.5, 4.8.3.7): SLP_TYP in bits 4:2, SLP_EN bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u8 = 1 << 5;
/// What a guest writes to the sleep control register to enter S5 (0x34).
pub const S5_SLEEP_CONTROL_VALUE: u8 = (S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN;

pub struct AcpiPm {
    exit: Arc<ExitLatch>,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitLatch>) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads 0: WAK_STS clear, so a guest waiting to wake keeps waiting while
        // we stop it. The other registers are write-only.
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLEEP_TYPE => {
                self.exit.request(ExitReason::PowerOff)
            }
            2 if v == RESET_VALUE => self.exit.request(ExitReason::Reboot),
            // Clearing WAK_STS in the status register, and sleep states we do not declare.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        assert_eq!(S5_SLEEP_CONTROL_VALUE, 0x34);
        let exit = Arc::new(ExitLatch::new().unwrap());
        let pm = AcpiPm::new(exit.clone());
        // Linux first writes WAK_STS to the status register, then SLP_TYP|SLP_EN.
        pm.write(1, &[0x80]);
        pm.write(0, &[S5_SLEEP_TYPE << 2]);
        assert_eq!(exit.reason(), None, "SLP_EN clear");
        pm.write(0, &[S5_SLEEP_CONTROL_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_reboots() {
        let exit = Arc::new(ExitLatch::new().unwrap());
        let pm = AcpiPm::new(exit.clone());
        pm.write(2, &[0x02]);
        assert_eq!(exit.reason(), None);
        pm.write(2, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }
}

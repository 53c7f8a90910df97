//! FADT: hardware-reduced ACPI 6.5 with sleep and reset registers in our I/O block.

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use super::{to_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::devices::acpi_pm::{RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};

/// IA-PC boot architecture flags (FADT offset 109).
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// No CMOS RTC: the guest takes wall-clock time from kvmclock and must not probe ports
/// 0x70/0x71, which nothing emulates.
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// The SCI is on ISA IRQ 9, as on PCs, matching the MADT's level-triggered IRQ9 override.
/// Hardware-reduced ACPI has no SCI, but Linux compares every MADT override's source IRQ with
/// this field: left at 0, the IRQ0 -> GSI2 timer override would be taken for the SCI's and
/// made level-triggered, active-low.
const SCI_IRQ: u16 = 9;
/// Hypervisor vendor identity (FADT offset 268).
const HYPERVISOR_ID: u64 = u64::from_le_bytes(*b"CLOISTER");

fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

pub fn build(dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    // Deliberately no 8042 flag: the i8042 exists only so guests can reset through it, and
    // without the flag Linux does not probe for a keyboard controller.
    fadt.sci_int = SCI_IRQ.into();
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.reset_reg = io_byte_register(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_byte_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte_register(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = HYPERVISOR_ID.into();
    to_bytes(&fadt.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_acpi_spec() {
        let t = build(0xe0040);
        assert_eq!(&t[..4], b"FACP");
        assert_eq!(t.len(), 276);
        assert_eq!(t[8], 6, "FADT major revision");
        assert_eq!(u16::from_le_bytes([t[46], t[47]]), 9, "SCI_INT");
        let flags = u32::from_le_bytes(t[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: system I/O, 8 bits, at our port; RESET_VALUE right after.
        assert_eq!(t[116], 1);
        assert_eq!(t[117], 8);
        assert_eq!(
            u64::from_le_bytes(t[120..128].try_into().unwrap()),
            u64::from(RESET_PORT)
        );
        assert_eq!(t[128], RESET_VALUE);
        assert_eq!(u64::from_le_bytes(t[140..148].try_into().unwrap()), 0xe0040);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(t[244], 1);
        assert_eq!(
            u64::from_le_bytes(t[248..256].try_into().unwrap()),
            u64::from(SLEEP_CONTROL_PORT)
        );
        assert_eq!(
            u64::from_le_bytes(t[260..268].try_into().unwrap()),
            u64::from(SLEEP_STATUS_PORT)
        );
        assert_eq!(&t[268..276], b"CLOISTER");
    }
}

//! DSDT: the sleep states we support and the legacy devices the guest cannot discover
//! otherwise.

use acpi_tables::aml::{Device, EISAName, Interrupt, Name, Package, Path, ResourceTemplate, IO};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::devices::acpi_pm::S5_SLEEP_TYPE;
use crate::devices::pvpanic::PVPANIC_PORT;
use crate::devices::serial::{COM1_IRQ, COM1_PORT};

const DSDT_REVISION: u8 = 6;

pub fn build() -> Vec<u8> {
    let mut aml = Vec::new();

    // \_S5_: the SLP_TYP value the guest writes to the sleep control register to power off.
    Name::new(Path::new("_S5_"), &Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut aml);

    let com1_io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    let com1_hid = Name::new(Path::new("_HID"), &com1_hid);
    let com1_uid = Name::new(Path::new("_UID"), &0u8);
    let com1_crs = Name::new(Path::new("_CRS"), &com1_crs);
    let com1 = Device::new(
        Path::new("_SB_.COM1"),
        vec![&com1_hid, &com1_uid, &com1_crs],
    );
    com1.to_aml_bytes(&mut aml);

    // QEMU's pvpanic ISA device; Linux's pvpanic-mmio driver binds to this HID and accepts an
    // I/O-port resource.
    let pvpanic_io = IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvpanic_crs = ResourceTemplate::new(vec![&pvpanic_io]);
    let pvpanic_hid = Name::new(Path::new("_HID"), &"QEMU0001");
    let pvpanic_uid = Name::new(Path::new("_UID"), &0u8);
    let pvpanic_crs = Name::new(Path::new("_CRS"), &pvpanic_crs);
    let pvpanic = Device::new(
        Path::new("_SB_.PEVT"),
        vec![&pvpanic_hid, &pvpanic_uid, &pvpanic_crs],
    );
    pvpanic.to_aml_bytes(&mut aml);

    // PCI: the host bridge \_SB_.PCI0 (PNP0A08, _CRS with the bus range, the I/O window and the
    // MMIO windows from crate::layout) goes here.

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn has_s5_com1_and_pvpanic() {
        let t = build();
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert!(contains(&t, b"_S5_"));
        assert!(contains(&t, b"COM1"));
        assert!(contains(&t, b"QEMU0001\0"));
        // IO descriptor for 0x505: tag 0x47, decode16, min, max, align 1, length 1.
        assert!(contains(&t, &[0x47, 1, 0x05, 0x05, 0x05, 0x05, 1, 1]));
        // IO descriptor for COM1 0x3f8-0x3ff.
        assert!(contains(&t, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
    }
}

//! DSDT: the sleep states we support, the devices the guest cannot discover otherwise (legacy
//! ports, virtio-mmio) and the PCI host bridge.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{pci, Platform, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::devices::acpi_pm::S5_SLEEP_TYPE;
use crate::devices::pvpanic::PVPANIC_PORT;
use crate::devices::serial::{COM1_IRQ, COM1_PORT};
use crate::layout::{VirtioMmioSlot, VIRTIO_MMIO_SIZE};

const DSDT_REVISION: u8 = 6;

pub fn build(platform: &Platform) -> Vec<u8> {
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

    pci::append_host_bridge(&mut aml, platform.pci_mmio64);
    super::hotplug::append_devices(&mut aml);
    for (n, slot) in platform.virtio_mmio.iter().enumerate() {
        append_virtio_mmio(&mut aml, n, slot);
    }

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

/// `\_SB_.VRnn`: Linux's virtio_mmio driver binds to LNRO0005 and takes the register window
/// and the interrupt from `_CRS`. Edge-triggered: the interrupt is an irqfd, which KVM
/// delivers as a pulse.
fn append_virtio_mmio(aml: &mut Vec<u8>, n: usize, slot: &VirtioMmioSlot) {
    let regs = Memory32Fixed::new(true, slot.base as u32, VIRTIO_MMIO_SIZE as u32);
    let irq = Interrupt::new(true, true, false, false, slot.gsi);
    let crs = ResourceTemplate::new(vec![&regs, &irq]);
    let hid = Name::new(Path::new("_HID"), &"LNRO0005");
    let uid = Name::new(Path::new("_UID"), &(n as u8));
    let crs = Name::new(Path::new("_CRS"), &crs);
    Device::new(Path::new(&format!("_SB_.VR{n:02}")), vec![&hid, &uid, &crs]).to_aml_bytes(aml);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn has_s5_com1_and_pvpanic() {
        let t = build(&Platform::new(1));
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert!(contains(&t, b"_S5_"));
        assert!(contains(&t, b"COM1"));
        assert!(contains(&t, b"QEMU0001\0"));
        // IO descriptor for 0x505: tag 0x47, decode16, min, max, align 1, length 1.
        assert!(contains(&t, &[0x47, 1, 0x05, 0x05, 0x05, 0x05, 1, 1]));
        // IO descriptor for COM1 0x3f8-0x3ff.
        assert!(contains(&t, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
        // The PCI host bridge is always there; virtio-mmio devices only when asked for.
        assert!(contains(&t, b"PCI0"));
        assert!(!contains(&t, b"LNRO0005"));
    }

    #[test]
    fn virtio_mmio_devices() {
        let mut p = Platform::new(1);
        p.virtio_mmio = vec![
            VirtioMmioSlot::new(0).unwrap(),
            VirtioMmioSlot::new(1).unwrap(),
        ];
        let t = build(&p);
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert!(contains(&t, b"VR00"));
        assert!(contains(&t, b"VR01"));
        assert!(contains(&t, b"LNRO0005\0"));
        // Memory32Fixed 0xf0001000, 0x200 bytes, then an edge, active-high interrupt on GSI 17.
        let mut crs = vec![0x86, 9, 0, 1];
        crs.extend_from_slice(&0xf000_1000u32.to_le_bytes());
        crs.extend_from_slice(&0x200u32.to_le_bytes());
        crs.extend_from_slice(&[0x89, 6, 0, 0b0011, 1]);
        crs.extend_from_slice(&17u32.to_le_bytes());
        assert!(contains(&t, &crs));
    }
}

//! The PCI host bridge in the DSDT, and the MCFG table that points at its ECAM window.
//!
//! `\_SB_.PCI0` (PNP0A08, compatible with PNP0A03) decodes bus 0, the 0xCF8-0xCFF
//! configuration ports and both MMIO windows; `\_SB_.MRES` (PNP0C02) reserves the ECAM area as
//! a motherboard resource, which Linux requires before it uses MCFG (it also accepts an e820
//! reservation: see [`crate::boot::e820`]). No `_OSC`: the guest keeps its defaults, so it
//! does not take PCIe native hot-plug (there is none) and uses ACPI's, through the slot
//! objects of [`super::hotplug`]. No `_PRT`: devices use MSI-X only.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name, Path,
    ResourceTemplate, IO,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::Aml;

use super::{to_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout::{PCI_ECAM_BUS_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START};
use crate::pci::bus::{CONFIG_IO_LEN, CONFIG_IO_PORT};

/// One ECAM entry: segment 0, bus 0 only.
pub fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    to_bytes(&mcfg)
}

/// Appends `\_SB_.PCI0` and `\_SB_.MRES`; `mmio64` is the 64-bit window (start, size).
pub fn append_host_bridge(aml: &mut Vec<u8>, mmio64: (u64, u64)) {
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = IO::new(CONFIG_IO_PORT, CONFIG_IO_PORT, 1, CONFIG_IO_LEN as u8);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    // Not prefetchable: Linux will not place a non-prefetchable BAR (ours) in a prefetchable
    // window.
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64.0,
        mmio64.0 + mmio64.1 - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &config_ports, &mmio32, &mmio64]);
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let children: Vec<(&str, &dyn Aml)> = vec![
        ("_HID", &hid),
        ("_CID", &cid),
        ("_ADR", &0u8),
        ("_SEG", &0u8),
        ("_UID", &0u8),
        ("_BBN", &0u8),
        ("_CRS", &crs),
    ];
    let names: Vec<Name> = children
        .iter()
        .map(|(n, v)| Name::new(Path::new(n), *v))
        .collect();
    let mut refs: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    refs.push(&super::hotplug::SlotObjects);
    Device::new(Path::new("_SB_.PCI0"), refs).to_aml_bytes(aml);

    let ecam = Memory32Fixed::new(true, PCI_ECAM_START as u32, PCI_ECAM_BUS_SIZE as u32);
    let ecam_crs = ResourceTemplate::new(vec![&ecam]);
    let mres_hid = EISAName::new("PNP0C02");
    let mres_hid = Name::new(Path::new("_HID"), &mres_hid);
    let mres_uid = Name::new(Path::new("_UID"), &1u8);
    let mres_crs = Name::new(Path::new("_CRS"), &ecam_crs);
    Device::new(
        Path::new("_SB_.MRES"),
        vec![&mres_hid, &mres_uid, &mres_crs],
    )
    .to_aml_bytes(aml);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn mcfg_has_one_bus0_entry() {
        let t = mcfg();
        assert_eq!(&t[..4], b"MCFG");
        assert_eq!(t.len(), 36 + 8 + 16);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 60);
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let e = &t[44..60];
        assert_eq!(u64::from_le_bytes(e[0..8].try_into().unwrap()), 0xe000_0000);
        assert_eq!(&e[8..12], &[0, 0, 0, 0], "segment 0, buses 0-0");
    }

    #[test]
    fn host_bridge_resources() {
        let mut aml = Vec::new();
        append_host_bridge(&mut aml, (0x1_0000_0000, 16 << 30));
        assert!(contains(&aml, b"PCI0"));
        assert!(contains(&aml, b"MRES"));
        // EISA IDs: PNP0A08 = 41 d0 0a 08, PNP0A03 = 41 d0 0a 03, PNP0C02 = 41 d0 0c 02.
        assert!(contains(&aml, &[0x41, 0xd0, 0x0a, 0x08]));
        assert!(contains(&aml, &[0x41, 0xd0, 0x0a, 0x03]));
        assert!(contains(&aml, &[0x41, 0xd0, 0x0c, 0x02]));
        // WordBusNumber 0-0, length 1.
        assert!(contains(
            &aml,
            &[0x88, 13, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
        ));
        // IO 0xcf8, 8 ports.
        assert!(contains(&aml, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        // DWordMemory 0xc0000000-0xdfffffff.
        let mut dword = vec![0x87, 23, 0, 0, 0x0c, 1];
        for v in [0u32, 0xc000_0000, 0xdfff_ffff, 0, 0x2000_0000] {
            dword.extend_from_slice(&v.to_le_bytes());
        }
        assert!(contains(&aml, &dword));
        // QWordMemory 4G-20G.
        let mut qword = vec![0x8a, 43, 0, 0, 0x0c, 1];
        for v in [0u64, 0x1_0000_0000, 0x5_0000_0000 - 1, 0, 16 << 30] {
            qword.extend_from_slice(&v.to_le_bytes());
        }
        assert!(contains(&aml, &qword));
        // Memory32Fixed over the ECAM bus 0 area.
        let mut fixed = vec![0x86, 9, 0, 1];
        fixed.extend_from_slice(&0xe000_0000u32.to_le_bytes());
        fixed.extend_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(contains(&aml, &fixed));
    }
}

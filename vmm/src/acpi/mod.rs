//! ACPI tables: RSDP -> XSDT -> {FADT -> DSDT, MADT, MCFG}.
//!
//! The platform is "hardware-reduced" ACPI: no PM1 blocks or SCI, just a sleep control/status
//! register pair and a reset register in our own I/O block ([`crate::devices::acpi_pm`]).
//! PCI's host bridge is in the DSDT and its ECAM window in the MCFG ([`pci`]).

pub mod dsdt;
pub mod fadt;
pub mod hotplug;
pub mod madt;
pub mod pci;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout::{VirtioMmioSlot, ACPI_START, HIMEM_START, RSDP_START};
use crate::memory::GuestMemoryMmap;

pub const OEM_ID: [u8; 6] = *b"CLOIST";
pub const OEM_TABLE_ID: [u8; 8] = *b"CLOISTER";
pub const OEM_REVISION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(u64),
    #[error("cannot write ACPI tables to guest memory")]
    Memory(#[source] GuestMemoryError),
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub vcpus: usize,
    /// The 64-bit PCI MMIO window (start, size).
    pub pci_mmio64: (u64, u64),
    pub virtio_mmio: Vec<VirtioMmioSlot>,
}

impl Platform {
    /// `vcpus` processors, the 64-bit window of a guest without RAM above 4 GiB, no
    /// virtio-mmio devices.
    pub fn new(vcpus: usize) -> Self {
        Platform {
            vcpus,
            pci_mmio64: crate::layout::RamLayout::new(0).pci_mmio64_window(),
            virtio_mmio: Vec::new(),
        }
    }
}

/// Serialises any table.
pub fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// Places tables one after another from `start`, each 16-byte aligned.
struct Placer {
    next: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, bytes: Vec<u8>) -> u64 {
        let addr = self.next;
        self.next = (addr + bytes.len() as u64).next_multiple_of(16);
        self.tables.push((addr, bytes));
        addr
    }
}

/// Builds all tables; returns `(address, bytes)` for each, RSDP first.
pub fn build_tables(platform: &Platform) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let mut placer = Placer {
        // The RSDP is 36 bytes at the start of the area.
        next: (RSDP_START + Rsdp::len() as u64).next_multiple_of(16),
        tables: Vec::with_capacity(5),
    };
    let dsdt = placer.place(dsdt::build(platform));
    let fadt = placer.place(fadt::build(dsdt));
    let madt = placer.place(madt::build(platform.vcpus));
    let mcfg = placer.place(pci::mcfg());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    xsdt.add_entry(mcfg);
    let xsdt = placer.place(to_bytes(&xsdt));
    if placer.next > HIMEM_START {
        return Err(AcpiError::TooLarge(placer.next - ACPI_START));
    }
    let mut tables = placer.tables;
    tables.insert(0, (RSDP_START, to_bytes(&Rsdp::new(OEM_ID, xsdt))));
    Ok(tables)
}

/// Writes the tables into guest memory; returns the RSDP address.
pub fn create_tables(mem: &GuestMemoryMmap, platform: &Platform) -> Result<u64, AcpiError> {
    for (addr, bytes) in build_tables(platform)? {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::Memory)?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn all_checksums_and_lengths_are_valid() {
        for vcpus in [1, 2, 254] {
            let tables = build_tables(&Platform::new(vcpus)).unwrap();
            let (rsdp_addr, rsdp) = &tables[0];
            assert_eq!(*rsdp_addr, 0xe0000);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
            assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
            for (addr, t) in &tables[1..] {
                assert_eq!(addr % 16, 0);
                assert_eq!(u32_at(t, 4) as usize, t.len(), "{:?} length", &t[..4]);
                assert_eq!(sum(t), 0, "{:?} checksum", std::str::from_utf8(&t[..4]));
            }
            // Tables do not overlap and stay in the BIOS area.
            for w in tables.windows(2) {
                assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
            }
            let (last, t) = tables.last().unwrap();
            assert!(last + t.len() as u64 <= 0x10_0000);
        }
    }

    #[test]
    fn pointers_link_up() {
        let tables = build_tables(&Platform::new(2)).unwrap();
        let find = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, t)| t);
        let rsdp = &tables[0].1;
        let xsdt = find(u64_at(rsdp, 24)).expect("XSDT at RSDP.xsdt_addr");
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|a| &find(*a).unwrap()[..4]).collect();
        assert_eq!(sigs, vec![&b"FACP"[..], &b"APIC"[..], &b"MCFG"[..]]);
        let fadt = find(entries[0]).unwrap();
        let dsdt = find(u64_at(fadt, 140)).expect("DSDT at FADT.X_DSDT");
        assert_eq!(&dsdt[..4], b"DSDT");
    }

    /// Not a test: writes the tables for 2 vCPUs as SIG.dat files to `$CLOISTER_ACPI_DIR`, for
    /// checking with `iasl -d` (acpica-tools).
    #[test]
    #[ignore]
    fn dump_tables() {
        let dir = std::path::PathBuf::from(std::env::var_os("CLOISTER_ACPI_DIR").unwrap());
        let mut platform = Platform::new(2);
        platform.virtio_mmio = vec![crate::layout::VirtioMmioSlot::new(0).unwrap()];
        for (_, t) in build_tables(&platform).unwrap() {
            let sig = if &t[..8] == b"RSD PTR " {
                "RSDP".to_string()
            } else {
                String::from_utf8_lossy(&t[..4]).into_owned()
            };
            std::fs::write(dir.join(format!("{sig}.dat")), &t).unwrap();
        }
    }
}

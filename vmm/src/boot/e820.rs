//! The guest's memory map, shared by both boot protocols (bzImage's e820 table and PVH's
//! memmap use the same entry types).

use crate::layout::{
    RamLayout, EBDA_START, HIMEM_START, KVM_IDENTITY_MAP_START, KVM_TSS_START, MMIO_HOLE_END,
    PCI_ECAM_BUS_SIZE, PCI_ECAM_START,
};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// KVM's private pages, which the VM is told about with KVM_SET_IDENTITY_MAP_ADDR (one page)
/// and KVM_SET_TSS_ADDR (three pages, right after it). On Intel hosts KVM uses them to run the
/// guest's real-mode code; the guest must not put anything there.
pub const KVM_PRIVATE_START: u64 = KVM_IDENTITY_MAP_START;
pub const KVM_PRIVATE_SIZE: u64 = KVM_TSS_START + 3 * 0x1000 - KVM_IDENTITY_MAP_START;
const _: () = assert!(KVM_PRIVATE_SIZE == 16 << 10);

/// RAM below the legacy area, the legacy VGA/BIOS area (where the ACPI tables are) as
/// reserved, RAM from 1 MiB to the MMIO hole, the PCIe ECAM window and KVM's private pages as
/// reserved, and RAM above 4 GiB.
///
/// The rest of the 32-bit MMIO hole is left out rather than reserved: PCI BARs and
/// virtio-mmio devices live there. Linux only trusts an MCFG table whose ECAM area is reserved
/// (here or as an ACPI motherboard resource; we do both).
pub fn e820_map(layout: &RamLayout) -> Vec<E820Entry> {
    let low_end = layout.low_end();
    let mut map = Vec::with_capacity(6);
    map.push(E820Entry {
        addr: 0,
        size: low_end.min(EBDA_START),
        kind: E820_RAM,
    });
    if low_end > EBDA_START {
        map.push(E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        });
    }
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_BUS_SIZE,
        kind: E820_RESERVED,
    });
    map.push(E820Entry {
        addr: KVM_PRIVATE_START,
        size: KVM_PRIVATE_SIZE,
        kind: E820_RESERVED,
    });
    if layout.high_size > 0 {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: layout.high_size,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest() {
        let map = e820_map(&RamLayout::new(512 << 20));
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0xa0000,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0xa0000,
                    size: 0x60000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: (512 << 20) - 0x100000,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0xe000_0000,
                    size: 0x10_0000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0xfffb_c000,
                    size: 0x4000,
                    kind: E820_RESERVED
                },
            ]
        );
        // The reserved legacy area is RAM we do not report, so the guest sees 384 KiB less.
        assert_eq!(ram_total(&map), (512 << 20) - 0x60000);
    }

    #[test]
    fn large_guest_resumes_above_4g() {
        let map = e820_map(&RamLayout::new(16 << 30));
        assert_eq!(map.len(), 6);
        assert_eq!(map[2].addr + map[2].size, 3 << 30);
        assert_eq!(map[3].kind, E820_RESERVED);
        assert_eq!(map[4].kind, E820_RESERVED);
        assert_eq!(
            map[5],
            E820Entry {
                addr: 4 << 30,
                size: 13 << 30,
                kind: E820_RAM
            }
        );
        // No RAM in the MMIO hole.
        assert!(map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .all(|e| e.addr + e.size <= 3 << 30 || e.addr >= 4 << 30));
    }

    #[test]
    fn kvm_private_pages_are_reserved() {
        for size in [2u64 << 20, 512 << 20, 16 << 30] {
            let map = e820_map(&RamLayout::new(size));
            let reserved = |addr: u64| {
                map.iter()
                    .any(|e| e.kind == E820_RESERVED && e.addr <= addr && addr < e.addr + e.size)
            };
            // The identity-map page and all three TSS pages.
            for page in [
                KVM_IDENTITY_MAP_START,
                KVM_TSS_START,
                KVM_TSS_START + 0x2000,
            ] {
                assert!(reserved(page), "{page:#x} in {map:?}");
            }
            assert!(!reserved(KVM_TSS_START + 0x3000));
        }
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for size in [2u64 << 20, 512 << 20, 3 << 30, (3 << 30) + 4096, 64 << 30] {
            let map = e820_map(&RamLayout::new(size));
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{map:?}");
            }
        }
    }
}

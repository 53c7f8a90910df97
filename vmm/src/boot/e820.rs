//! The guest's memory map, shared by both boot protocols (bzImage's e820 table and PVH's
//! memmap use the same entry types).

use crate::layout::{RamLayout, EBDA_START, HIMEM_START, MMIO_HOLE_END};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// RAM below the legacy area, the legacy VGA/BIOS area (where the ACPI tables are) as
/// reserved, RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB.
///
/// The 32-bit MMIO hole itself is left out rather than reserved: it is where PCI BARs will be
/// placed, and the ECAM window gets its own reserved entry once PCI exists.
pub fn e820_map(layout: &RamLayout) -> Vec<E820Entry> {
    let low_end = layout.low_end();
    let mut map = Vec::with_capacity(4);
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
            ]
        );
        // The reserved legacy area is RAM we do not report, so the guest sees 384 KiB less.
        assert_eq!(ram_total(&map), (512 << 20) - 0x60000);
    }

    #[test]
    fn large_guest_resumes_above_4g() {
        let map = e820_map(&RamLayout::new(16 << 30));
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, 3 << 30);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 4 << 30,
                size: 13 << 30,
                kind: E820_RAM
            }
        );
        // Nothing is mapped in the MMIO hole.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= 3 << 30 || e.addr >= 4 << 30));
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

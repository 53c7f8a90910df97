//! The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): the kernel starts in long
//! mode at `code32_start + 0x200` with RSI pointing at the zero page (`boot_params`), an
//! identity map covering the kernel and everything we hand it, and flat segments.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError};

use super::e820::E820Entry;
use crate::layout::{PDPT_START, PD_START, PML4_START, ZERO_PAGE_START};
use crate::memory::GuestMemoryMmap;

/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// "KEEP_SEGMENTS": do not reload segment registers in the 32-bit entry. Ignored by current
/// kernels' 64-bit entry but harmless, and what older kernels expect from direct-boot loaders.
const KEEP_SEGMENTS: u8 = 1 << 6;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Protocol 2.12 added `xloadflags` and the 64-bit entry point.
pub const MIN_PROTOCOL: u16 = 0x020c;
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point from the start of the protected-mode kernel.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Before protocol 2.03 the initrd limit was not in the header.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
/// How much we identity-map: the whole 32-bit space, so the kernel, zero page, command line,
/// initramfs (all below 4 GiB) and the MMIO hole are reachable before the kernel builds its own
/// page tables.
const IDENTITY_MAP_GIB: u64 = 4;

/// Highest address (exclusive) the kernel accepts its initramfs below.
pub fn initrd_limit(hdr: &setup_header) -> u64 {
    let version = hdr.version;
    if version >= 0x0203 {
        u64::from(hdr.initrd_addr_max) + 1
    } else {
        DEFAULT_INITRD_ADDR_MAX + 1
    }
}

/// Longest command line (without the NUL) the kernel accepts.
pub fn cmdline_limit(hdr: &setup_header) -> usize {
    let version = hdr.version;
    if version >= 0x0206 {
        hdr.cmdline_size as usize
    } else {
        255
    }
}

/// First address after everything the kernel may use while decompressing itself: it moves to
/// at least `pref_address` and needs `init_size` bytes there. `None` if the header's values
/// overflow.
pub fn kernel_footprint_end(hdr: &setup_header, load_addr: u64, loaded_end: u64) -> Option<u64> {
    let pref = hdr.pref_address;
    let init_size = u64::from(hdr.init_size);
    let end = load_addr.max(pref).checked_add(init_size)?;
    Some(end.max(loaded_end))
}

/// Fills the zero page from the kernel's setup header.
pub fn boot_params(
    hdr: setup_header,
    e820: &[E820Entry],
    cmdline: u64,
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> boot_params {
    let mut params = boot_params::zeroed();
    params.hdr = hdr;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.loadflags |= KEEP_SEGMENTS;
    params.hdr.cmd_line_ptr = cmdline as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    // Honoured from protocol 2.14; older kernels scan 0xe0000-0xfffff, where the RSDP is too.
    params.acpi_rsdp_addr = rsdp;
    let n = e820.len().min(params.e820_table.len());
    for (i, e) in e820.iter().take(n).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = n as u8;
    params
}

pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    params: boot_params,
) -> Result<u64, GuestMemoryError> {
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(ZERO_PAGE_START)
}

/// One page of page-table entries at a guest address.
pub struct TablePage {
    pub addr: u64,
    pub entries: [u64; 512],
}

/// Identity map of the first 4 GiB: PML4 -> one PDPT -> either 1 GiB pages, or four page
/// directories of 2 MiB pages.
pub fn identity_map(use_1g_pages: bool) -> Vec<TablePage> {
    let mut pages = Vec::with_capacity(6);
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_START | PTE_PRESENT | PTE_WRITE;
    pages.push(TablePage {
        addr: PML4_START,
        entries: pml4,
    });
    let mut pdpt = [0u64; 512];
    for gib in 0..IDENTITY_MAP_GIB {
        pdpt[gib as usize] = if use_1g_pages {
            (gib << 30) | PTE_PRESENT | PTE_WRITE | PTE_HUGE
        } else {
            (PD_START + gib * 0x1000) | PTE_PRESENT | PTE_WRITE
        };
    }
    pages.push(TablePage {
        addr: PDPT_START,
        entries: pdpt,
    });
    if !use_1g_pages {
        for gib in 0..IDENTITY_MAP_GIB {
            let mut pd = [0u64; 512];
            for (i, e) in pd.iter_mut().enumerate() {
                *e = (gib << 30) | ((i as u64) << 21) | PTE_PRESENT | PTE_WRITE | PTE_HUGE;
            }
            pages.push(TablePage {
                addr: PD_START + gib * 0x1000,
                entries: pd,
            });
        }
    }
    pages
}

/// Writes the identity map; returns CR3.
pub fn write_page_tables(
    mem: &GuestMemoryMmap,
    use_1g_pages: bool,
) -> Result<u64, GuestMemoryError> {
    for page in identity_map(use_1g_pages) {
        let mut bytes = [0u8; 4096];
        for (chunk, e) in bytes.chunks_exact_mut(8).zip(page.entries.iter()) {
            chunk.copy_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&bytes, GuestAddress(page.addr))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::e820::{e820_map, E820_RAM};
    use crate::layout::RamLayout;

    /// Walks our tables like the MMU would and returns the physical address for `va`.
    fn translate(pages: &[TablePage], va: u64) -> Option<u64> {
        let table = |addr: u64| pages.iter().find(|p| p.addr == addr).map(|p| &p.entries);
        let pml4e = table(PML4_START)?[((va >> 39) & 0x1ff) as usize];
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte = table(pml4e & !0xfff)?[((va >> 30) & 0x1ff) as usize];
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        if pdpte & PTE_HUGE != 0 {
            return Some((pdpte & !0x3fff_ffff & !(PTE_HUGE | 3)) | (va & 0x3fff_ffff));
        }
        let pde = table(pdpte & !0xfff)?[((va >> 21) & 0x1ff) as usize];
        if pde & PTE_PRESENT == 0 || pde & PTE_HUGE == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn identity_maps_first_4g_both_ways() {
        for use_1g in [false, true] {
            let pages = identity_map(use_1g);
            assert_eq!(pages.len(), if use_1g { 2 } else { 6 });
            for va in [
                0u64,
                0x7000,
                0x100_0000,
                0xbfff_f000,
                0xfee0_0000,
                0xffff_ffff,
            ] {
                assert_eq!(translate(&pages, va), Some(va), "va {va:#x} 1g {use_1g}");
            }
            assert_eq!(translate(&pages, 1 << 32), None);
        }
    }

    #[test]
    fn zero_page_fields() {
        let mut hdr = setup_header {
            version: 0x020f,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        hdr.loadflags = 1;
        let e820 = e820_map(&RamLayout::new(512 << 20));
        let p = boot_params(hdr, &e820, 0x20000, Some((0x1f00_0000, 0x1234)), 0xe0000);
        let bytes = p.as_slice();
        assert_eq!(bytes.len(), 4096);
        // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
        assert_eq!(bytes[0x1e8], e820.len() as u8); // e820_entries
        assert_eq!(bytes[0x210], 0xff); // type_of_loader
        assert_eq!(bytes[0x211] & KEEP_SEGMENTS, KEEP_SEGMENTS); // loadflags
        assert_eq!(&bytes[0x1fe..0x200], &0xaa55u16.to_le_bytes());
        assert_eq!(&bytes[0x202..0x206], b"HdrS");
        assert_eq!(&bytes[0x218..0x21c], &0x1f00_0000u32.to_le_bytes()); // ramdisk_image
        assert_eq!(&bytes[0x21c..0x220], &0x1234u32.to_le_bytes()); // ramdisk_size
        assert_eq!(&bytes[0x228..0x22c], &0x20000u32.to_le_bytes()); // cmd_line_ptr
        assert_eq!(&bytes[0x070..0x078], &0xe0000u64.to_le_bytes()); // acpi_rsdp_addr
                                                                     // First e820 entry at 0x2d0: addr, size, type.
        assert_eq!(&bytes[0x2d0..0x2d8], &0u64.to_le_bytes());
        assert_eq!(&bytes[0x2d8..0x2e0], &0xa0000u64.to_le_bytes());
        assert_eq!(&bytes[0x2e0..0x2e4], &E820_RAM.to_le_bytes());
        assert_eq!(initrd_limit(&hdr), 0x8000_0000);
        assert_eq!(cmdline_limit(&hdr), 2047);
    }

    #[test]
    fn footprint_covers_decompression() {
        let hdr = setup_header {
            pref_address: 0x100_0000,
            init_size: 0x200_0000,
            ..Default::default()
        };
        assert_eq!(
            kernel_footprint_end(&hdr, 0x10_0000, 0x90_0000),
            Some(0x300_0000)
        );
        let bogus = setup_header {
            pref_address: u64::MAX - 0x1000,
            init_size: 0x200_0000,
            ..Default::default()
        };
        assert_eq!(kernel_footprint_end(&bogus, 0x10_0000, 0x90_0000), None);
    }
}

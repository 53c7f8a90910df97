//! PVH boot: the kernel starts in 32-bit protected mode at the address in its
//! XEN_ELFNOTE_PHYS32_ENTRY note, with EBX pointing at an `hvm_start_info`.
//!
//! Structures from Xen's `public/arch-x86/hvm/start_info.h`.

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError};

use super::e820::E820Entry;
use crate::layout::{PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::memory::GuestMemoryMmap;

pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvmStartInfo {
    pub magic: u32,
    /// 1: the memmap fields are valid.
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvmModlistEntry {
    pub paddr: u64,
    pub size: u64,
    pub cmdline_paddr: u64,
    pub reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HvmMemmapTableEntry {
    pub addr: u64,
    pub size: u64,
    pub type_: u32,
    pub reserved: u32,
}

// SAFETY: plain integers with no padding (checked by the size assertions below), so every
// byte pattern is a valid value.
unsafe impl ByteValued for HvmStartInfo {}
// SAFETY: as above.
unsafe impl ByteValued for HvmModlistEntry {}
// SAFETY: as above.
unsafe impl ByteValued for HvmMemmapTableEntry {}

const _: () = assert!(std::mem::size_of::<HvmStartInfo>() == 56);
const _: () = assert!(std::mem::size_of::<HvmModlistEntry>() == 32);
const _: () = assert!(std::mem::size_of::<HvmMemmapTableEntry>() == 24);

/// Builds the start info for the given memory map, command line, initramfs and RSDP.
pub fn start_info(
    memmap_entries: usize,
    cmdline: u64,
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> HvmStartInfo {
    HvmStartInfo {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: u32::from(initramfs.is_some()),
        modlist_paddr: if initramfs.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: cmdline,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap_entries as u32,
        reserved: 0,
    }
}

/// Writes the start info, module list and memory map; returns the start info's address
/// (the kernel's EBX).
pub fn write(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    cmdline: u64,
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<u64, GuestMemoryError> {
    for (i, e) in e820.iter().enumerate() {
        let entry = HvmMemmapTableEntry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<HvmMemmapTableEntry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    if let Some((paddr, size)) = initramfs {
        let module = HvmModlistEntry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))?;
    }
    let info = start_info(e820.len(), cmdline, initramfs, rsdp);
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_fields() {
        let info = start_info(3, 0x20000, Some((0x1000_0000, 4096)), 0xe0000);
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.memmap_entries, 3);
        let bytes = info.as_slice();
        // Field offsets as the C header lays them out.
        assert_eq!(&bytes[0..4], &0x336e_c578u32.to_le_bytes());
        assert_eq!(&bytes[24..32], &0x20000u64.to_le_bytes());
        assert_eq!(&bytes[32..40], &0xe0000u64.to_le_bytes());
        assert_eq!(&bytes[48..52], &3u32.to_le_bytes());

        let none = start_info(3, 0x20000, None, 0xe0000);
        assert_eq!(none.nr_modules, 0);
        assert_eq!(none.modlist_paddr, 0);
    }
}

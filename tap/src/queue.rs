//! One queue of a tap: its descriptor, with virtio-net headers, and the ioctls that set how
//! the kernel treats the frames.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::ifreq::*;
use crate::{Error, Result};

/// Offloads the kernel may apply to frames it hands us (`TUNSETOFFLOAD`'s `TUN_F_*`): what the
/// guest said it can take (its GUEST_* features).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads(pub u32);

impl Offloads {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
    pub const UFO: u32 = 0x10;
    pub const USO4: u32 = 0x20;
    pub const USO6: u32 = 0x40;

    pub fn has(self, bit: u32) -> bool {
        self.0 & bit == bit
    }
}

/// How long [`TapQueue::open_queues`] waits for a busy tap to be let go.
pub const BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// One queue of a tap device.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    name: String,
    multi_queue: bool,
}

impl TapQueue {
    /// Opens (creating it if it does not exist, which needs CAP_NET_ADMIN) one queue of the tap
    /// `name`; a name with `%d` lets the kernel pick a free one. The descriptor is non-blocking
    /// and close-on-exec.
    pub fn open(name: &str, multi_queue: bool) -> Result<Self> {
        check_name(name)?;
        // SAFETY: a constant NUL-terminated path; the descriptor is owned right after.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq::named(name);
        let mq = if multi_queue { IFF_MULTI_QUEUE } else { 0 };
        req.set_short(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | mq);
        ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| Error::SetIff {
            name: name.to_owned(),
            source,
        })?;
        Ok(Self {
            fd,
            name: req.name(),
            multi_queue,
        })
    }

    /// Opens `count` queues of one tap (multi-queue when more than one). A tap that is busy
    /// is tried again for up to [`BUSY_PATIENCE`]: a process that has just exited can hold its
    /// queue a little longer (the kernel lets go of an io_uring's registered files from a work
    /// queue, after the process is gone), so a tap a stopped backend used is briefly busy.
    pub fn open_queues(name: &str, count: usize) -> Result<Vec<Self>> {
        let deadline = std::time::Instant::now() + BUSY_PATIENCE;
        loop {
            match Self::try_open_queues(name, count) {
                Err(Error::SetIff { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn try_open_queues(name: &str, count: usize) -> Result<Vec<Self>> {
        let first = Self::open(name, count > 1)?;
        let actual = first.name.clone();
        let mut queues = vec![first];
        for _ in 1..count {
            queues.push(Self::open(&actual, true)?);
        }
        Ok(queues)
    }

    /// A tap queue someone else opened: it must be a tap with `IFF_VNET_HDR` and no packet
    /// information (the header cannot be turned on afterwards). It is made non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let raw = fd.as_raw_fd();
        let bad = |what: String| Error::BadFd { fd: raw, what };
        let mut req = IfReq::named("");
        ioctl(raw, TUNGETIFF, &mut req)
            .map_err(|e| bad(format!("not a tap queue (TUNGETIFF: {e})")))?;
        let flags = req.short();
        if flags & IFF_TAP == 0 {
            return Err(bad(format!("{} is a tun, not a tap", req.name())));
        }
        if flags & IFF_VNET_HDR == 0 || flags & IFF_NO_PI == 0 {
            return Err(bad(format!(
                "tap {} was opened without IFF_VNET_HDR and IFF_NO_PI",
                req.name()
            )));
        }
        // SAFETY: fcntl on a descriptor we own.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(bad(format!(
                "cannot make it non-blocking: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(Self {
            fd,
            name: req.name(),
            multi_queue: flags & IFF_MULTI_QUEUE != 0,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn multi_queue(&self) -> bool {
        self.multi_queue
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    fn ioctl_error(&self, what: &'static str) -> impl FnOnce(io::Error) -> Error + '_ {
        move |source| Error::Ioctl {
            name: self.name.clone(),
            what,
            source,
        }
    }

    /// Who may attach and detach its queues without CAP_NET_ADMIN.
    pub fn set_owner(&self, uid: libc::uid_t) -> Result<()> {
        ioctl_value(self.raw(), TUNSETOWNER, uid.into()).map_err(self.ioctl_error("TUNSETOWNER"))
    }

    /// The length of the virtio-net header that starts every frame (10, or 12 with
    /// `num_buffers`).
    pub fn set_vnet_hdr_len(&self, len: i32) -> Result<()> {
        let mut value = len;
        ioctl_int(self.raw(), TUNSETVNETHDRSZ, &mut value)
            .map_err(self.ioctl_error("TUNSETVNETHDRSZ"))
    }

    pub fn set_offloads(&self, offloads: Offloads) -> Result<()> {
        ioctl_value(self.raw(), TUNSETOFFLOAD, offloads.0.into())
            .map_err(self.ioctl_error("TUNSETOFFLOAD"))
    }

    /// The offloads among `wanted` this kernel's tap accepts (each tried on its own, since a
    /// kernel refuses the whole set for one it lacks), then none set.
    pub fn probe_offloads(&self, wanted: Offloads) -> Offloads {
        let mut accepted = 0;
        // CSUM first: the others need it.
        let order = [
            Offloads::CSUM,
            Offloads::TSO4,
            Offloads::TSO6,
            Offloads::TSO_ECN,
            Offloads::UFO,
            Offloads::USO4 | Offloads::USO6,
        ];
        for bit in order {
            if wanted.0 & bit == 0 {
                continue;
            }
            let trial = accepted | (wanted.0 & bit);
            let needs_csum = trial & Offloads::CSUM != 0 || bit == Offloads::CSUM;
            if needs_csum && self.set_offloads(Offloads(trial)).is_ok() {
                accepted = trial;
            }
        }
        let _ = self.set_offloads(Offloads(0));
        Offloads(accepted)
    }

    /// Attaches or detaches this queue (multi-queue taps): a detached queue gets no frames,
    /// so frames are not steered to a queue pair the guest does not use.
    pub fn set_attached(&self, attached: bool) -> Result<()> {
        let mut req = IfReq::named("");
        req.set_short(if attached {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        });
        match ioctl(self.raw(), TUNSETQUEUE, &mut req) {
            Ok(()) => Ok(()),
            // Already in the state asked for.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(e) => Err(self.ioctl_error("TUNSETQUEUE")(e)),
        }
    }

    /// Reads one frame (header included) into `buf`; `Ok(None)` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: read into a buffer of the length given.
        let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Reads one frame (header included), scattered over `iov`; `Ok(None)` when none is
    /// waiting. A frame longer than `iov` is dropped by the kernel with `EFAULT`.
    ///
    /// # Safety
    /// Every iovec must point to memory writable for its length.
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: the caller vouches for the iovecs; the count fits (callers cap it).
        let n = unsafe { libc::readv(self.raw(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Writes one frame (header included), gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must point to memory readable for its length.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller vouches for the iovecs; the count fits (callers cap it).
        let n = unsafe { libc::writev(self.raw(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(Error::BadName(name.to_owned()));
    }
    Ok(())
}

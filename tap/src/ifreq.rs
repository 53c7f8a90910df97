//! `struct ifreq` and the ioctls on it.

use std::io;
use std::os::fd::RawFd;

/// `struct ifreq`: a name and a 24-byte union (flags, address, MTU, ...).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IfReq {
    pub name: [u8; libc::IFNAMSIZ],
    pub data: [u8; 24],
}

impl IfReq {
    /// An ifreq naming `name` (already checked to fit).
    pub fn named(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        let bytes = name.as_bytes();
        let len = bytes.len().min(libc::IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&bytes[..len]);
        req
    }

    pub fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    pub fn set_short(&mut self, value: i16) {
        self.data[..2].copy_from_slice(&value.to_ne_bytes());
    }

    pub fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub fn set_int(&mut self, value: i32) {
        self.data[..4].copy_from_slice(&value.to_ne_bytes());
    }

    /// A `sockaddr_in` with `addr` (network order bytes).
    pub fn set_inet(&mut self, addr: [u8; 4]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr);
    }

    /// A `sockaddr` of family ARPHRD_ETHER with `mac`.
    pub fn set_hwaddr(&mut self, mac: [u8; 6]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }

    pub fn hwaddr(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.data[2..8]);
        mac
    }
}

/// `ioctl(fd, request, &mut req)`.
pub fn ioctl(fd: RawFd, request: u64, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every request used with this takes a `struct ifreq`, which `IfReq` lays out.
    let r = unsafe { libc::ioctl(fd, request as _, req as *mut IfReq) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, request, value)` for requests that take an integer by value.
pub fn ioctl_value(fd: RawFd, request: u64, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the requests used with this take their argument by value.
    let r = unsafe { libc::ioctl(fd, request as _, value) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, request, &mut value)` for requests that read or write an integer.
pub fn ioctl_int(fd: RawFd, request: u64, value: &mut libc::c_int) -> io::Result<()> {
    // SAFETY: the requests used with this take a pointer to an int.
    let r = unsafe { libc::ioctl(fd, request as _, value as *mut libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// <linux/if_tun.h>
pub const TUNSETIFF: u64 = 0x4004_54ca;
pub const TUNSETOWNER: u64 = 0x4004_54cc;
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
pub const TUNGETIFF: u64 = 0x8004_54d2;
pub const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
pub const TUNSETQUEUE: u64 = 0x4004_54d9;
pub const IFF_TAP: i16 = 0x0002;
pub const IFF_NO_PI: i16 = 0x1000;
pub const IFF_VNET_HDR: i16 = 0x4000;
pub const IFF_MULTI_QUEUE: i16 = 0x0100;
pub const IFF_ATTACH_QUEUE: i16 = 0x0200;
pub const IFF_DETACH_QUEUE: i16 = 0x0400;

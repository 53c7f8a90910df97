//! A network interface's address, netmask, MAC, MTU and up state, set through an `AF_INET`
//! socket's ioctls (CAP_NET_ADMIN).

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::str::FromStr;

use crate::ifreq::{ioctl, IfReq};
use crate::{Error, Result};

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address made from `seed` (stable for the same seed).
    pub fn local_from(seed: &[u8]) -> Self {
        // FNV-1a: stable across runs and Rust versions, unlike std's hasher.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in seed {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        let b = hash.to_be_bytes();
        MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("'{s}' is not a MAC address (six hex bytes, 02:00:00:00:00:01)");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            if part.is_empty() || part.len() > 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// What to set on an interface; `None` leaves it as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub ip: Option<Ipv4Addr>,
    pub mask: Option<Ipv4Addr>,
    /// The host side's MAC (Cloud Hypervisor's `host_mac=`).
    pub mac: Option<MacAddr>,
    pub mtu: Option<u16>,
}

/// An interface, by name.
pub struct Interface {
    name: String,
    socket: OwnedFd,
}

impl Interface {
    pub fn new(name: &str) -> Result<Self> {
        // SAFETY: socket(2) with constant arguments; owned right after.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::Configure {
                name: name.to_owned(),
                what: "cannot open a socket to configure it",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            // SAFETY: a fresh descriptor nothing else owns.
            socket: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn call(&self, request: u64, req: &mut IfReq, what: &'static str) -> Result<()> {
        ioctl(self.socket.as_raw_fd(), request, req).map_err(|source| Error::Configure {
            name: self.name.clone(),
            what,
            source,
        })
    }

    /// Applies `config` and brings the interface up.
    pub fn configure(&self, config: &InterfaceConfig) -> Result<()> {
        if let Some(mac) = config.mac {
            let mut req = IfReq::named(&self.name);
            req.set_hwaddr(mac.0);
            self.call(
                libc::SIOCSIFHWADDR,
                &mut req,
                "cannot set its MAC address (host_mac)",
            )?;
        }
        if let Some(mtu) = config.mtu {
            let mut req = IfReq::named(&self.name);
            req.set_int(i32::from(mtu));
            self.call(libc::SIOCSIFMTU, &mut req, "cannot set its MTU")?;
        }
        if let Some(ip) = config.ip {
            let mut req = IfReq::named(&self.name);
            req.set_inet(ip.octets());
            self.call(libc::SIOCSIFADDR, &mut req, "cannot set its address")?;
        }
        if let Some(mask) = config.mask {
            let mut req = IfReq::named(&self.name);
            req.set_inet(mask.octets());
            self.call(libc::SIOCSIFNETMASK, &mut req, "cannot set its netmask")?;
        }
        self.up()
    }

    pub fn up(&self) -> Result<()> {
        let mut req = IfReq::named(&self.name);
        self.call(libc::SIOCGIFFLAGS, &mut req, "cannot read its flags")?;
        let flags = req.short() | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        req.set_short(flags);
        self.call(libc::SIOCSIFFLAGS, &mut req, "cannot bring it up")
    }

    pub fn mac(&self) -> Result<MacAddr> {
        let mut req = IfReq::named(&self.name);
        self.call(libc::SIOCGIFHWADDR, &mut req, "cannot read its MAC address")?;
        Ok(MacAddr(req.hwaddr()))
    }

    pub fn mtu(&self) -> Result<u16> {
        let mut req = IfReq::named(&self.name);
        self.call(libc::SIOCGIFMTU, &mut req, "cannot read its MTU")?;
        let mtu = i32::from_ne_bytes([req.data[0], req.data[1], req.data[2], req.data[3]]);
        Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_print_and_derive() {
        let mac: MacAddr = "02:1a:2B:3c:4d:5e".parse().unwrap();
        assert_eq!(mac.to_string(), "02:1a:2b:3c:4d:5e");
        assert!("02:1a:2b:3c:4d".parse::<MacAddr>().is_err());
        assert!("02:1a:2b:3c:4d:5e0".parse::<MacAddr>().is_err());
        assert!("zz:1a:2b:3c:4d:5e".parse::<MacAddr>().is_err());
        let a = MacAddr::local_from(b"_net0");
        assert_eq!(a, MacAddr::local_from(b"_net0"));
        assert_ne!(a, MacAddr::local_from(b"_net1"));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast: {a}");
    }
}

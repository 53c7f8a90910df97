//! Tap devices, as the network backend and cloister's managed mode use them.
//!
//! A tap is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every frame read or written
//! starts with a virtio-net header, so checksum and segmentation offloads pass between the
//! guest and the host kernel untouched. A multi-queue tap (`IFF_MULTI_QUEUE`) has one
//! descriptor per queue pair. Creating a tap, or giving it addresses, needs CAP_NET_ADMIN;
//! using descriptors someone else opened needs nothing, which is how cloister hands them to
//! the backend it starts.

mod ifreq;
mod interface;
mod queue;

pub use interface::{Interface, InterfaceConfig, MacAddr};
pub use queue::{Offloads, TapQueue};

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap {name} (TUNSETIFF; creating a tap needs CAP_NET_ADMIN, and an existing one must be a tap with the same multi-queue setting)")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap descriptor {fd}: {what}")]
    BadFd { fd: i32, what: String },
    #[error("tap {name}: {what}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("tap {name}: {what}")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The interface name the kernel gives a new tap when the name is a pattern.
pub const DEFAULT_NAME_PATTERN: &str = "vmtap%d";

pub type Result<T> = std::result::Result<T, Error>;

//! The generic vhost-user frontend: every virtio device Cloister offers is a backend process
//! on the other end of a UNIX socket. [`socket`] reaches it, [`connection`] speaks the protocol, [`device`] makes a
//! connection a [`crate::virtio::VirtioDevice`], [`control`] is the thread that owns the
//! connection once the device exists, and [`kind`] says what differs between device types
//! (the kinds themselves are in [`crate::kinds`]).

pub mod connection;
pub mod control;
pub mod device;
pub mod kind;
pub mod socket;
pub mod watchdog;

pub use connection::{Connection, ConnectionError};
pub use device::VhostUserDevice;
pub use kind::DeviceKind;

//! The generic vhost-user frontend: every virtio device Cloister offers is a backend process
//! on the other end of a UNIX socket. [`connection`] speaks the protocol, [`device`] makes a
//! connection a [`crate::virtio::VirtioDevice`], and small per-type pieces ([`blk`]) say what
//! differs between device types.

pub mod blk;
pub mod connection;
pub mod device;
pub mod watchdog;

pub use connection::{Connection, ConnectionError};
pub use device::VhostUserDevice;

/// What differs between vhost-user device types.
pub trait DeviceKind: Send + Sync {
    /// The backend program, for messages and for managed backends.
    fn backend_name(&self) -> &'static str;
    fn device_type(&self) -> u32;
    /// Device-specific feature bits (0-23) we pass through when the backend offers them.
    fn device_features(&self) -> u64;
    /// Bytes of config space read from the backend with GET_CONFIG.
    fn config_len(&self) -> u32;
    /// Fixes up the backend's config space for what the guest is given.
    fn adjust_config(&self, config: &mut [u8], queues: u16);
}

//! What differs between vhost-user device types, as the frontend sees it: the virtio device
//! type, which device feature bits pass through, and where the config space comes from.

/// Where a device's config space comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSpace {
    /// `GET_CONFIG` of this many bytes (the backend must offer the CONFIG protocol feature).
    Backend(u32),
    /// Known locally (a virtio-fs tag, an rng's empty space), whatever the backend offers.
    Local(Vec<u8>),
    /// From the backend when it offers CONFIG, else these bytes.
    BackendOr(u32, Vec<u8>),
}

pub trait DeviceKind: Send + Sync {
    /// What the device is called in default ids and messages: "disk", "fs", "rng", ...
    fn kind_name(&self) -> &'static str;
    /// The backend program, for messages.
    fn backend_name(&self) -> &str;
    fn device_type(&self) -> u32;
    /// Device-specific feature bits (0-23) we pass through when the backend offers them.
    fn device_features(&self) -> u64;
    fn config_space(&self) -> ConfigSpace;
    /// Refuses a config space read from the backend that contradicts what the user asked
    /// (a NIC's `mac=` other than the backend's); the reason, for the message.
    fn check_backend_config(&self, _config: &[u8]) -> Result<(), String> {
        Ok(())
    }
    /// Fixes up the config space for what the guest is given (`queues` it sees).
    fn adjust_config(&self, _config: &mut [u8], _queues: u16) {}
    /// What two devices of this kind may not share, as `key=value` (a virtio-fs tag).
    fn unique_key(&self) -> Option<String> {
        None
    }
    /// Device feature bits the VMM offers the guest itself, whatever the backend offers,
    /// because their config fields are ours (a NIC's MAC when the config space is made
    /// locally or the user gave one). Never passed to the backend unless it offered them.
    /// `local_config`: the config space was made locally.
    fn local_features(&self, _local_config: bool) -> u64 {
        0
    }
    /// How many of the queues asked for the guest gets, given the device features the backend
    /// offers (and we pass) and the queues it serves: a NIC's control queue only with a
    /// backend that has one. At least [`DeviceKind::required_queues`].
    fn usable_queues(&self, asked: usize, _features: u64, _available: u64) -> usize {
        asked
    }
    /// The device features the guest is offered once it has `queues` queues (a NIC without
    /// its control queue loses what needs it).
    fn adjust_features(&self, features: u64, _queues: usize) -> u64 {
        features
    }
    /// The fewest queues a backend must serve for `asked`.
    fn required_queues(&self, asked: usize) -> usize {
        asked
    }
    /// Whether a backend of this kind returns what it takes from a ring in the order it took
    /// it, so that a new backend can take over a running ring from its used index when the
    /// last one dies. (One that completes out of order, a disk's, needs in-flight tracking.)
    fn completes_in_order(&self) -> bool {
        false
    }
    /// Whether a lost backend is replaced (started again, or connected to again) and takes the
    /// running rings over, rather than the device failing. Right for kinds that complete in
    /// order, and for those whose backends track what they have in flight.
    fn recoverable(&self) -> bool {
        self.completes_in_order()
    }
}

/// Every device-specific feature bit (0-23), for kinds whose features we pass through as
/// the backend offers them.
pub const ALL_DEVICE_FEATURES: u64 = (1 << 24) - 1;

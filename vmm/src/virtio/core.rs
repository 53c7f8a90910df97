//! The part of a virtio transport that PCI and MMIO share: feature negotiation, the device
//! status state machine, per-queue configuration, activation at DRIVER_OK and reset.
//!
//! The transports only decode their registers into calls on [`VirtioCore`].

use std::io;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActiveQueue, DeviceError, VirtioDevice};
use super::{
    NO_VECTOR, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};

/// One queue as the driver configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// MSI-X vector (PCI only).
    pub vector: u16,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        QueueState {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            vector: NO_VECTOR,
        }
    }
}

/// The eventfds a transport gives each queue at activation.
pub trait QueueEvents {
    /// The queue's notification eventfd (registered with KVM as an ioeventfd).
    fn kick(&self, queue: usize) -> io::Result<EventFd>;
    /// The eventfd that interrupts the guest for this queue.
    fn call(&self, queue: usize, vector: u16) -> io::Result<EventFd>;
}

/// What a status write did, for the transport to act on.
#[derive(Debug)]
pub enum StatusChange {
    None,
    /// The driver wrote 0: the device was reset (transports clear their own state too).
    Reset,
    /// DRIVER_OK could not start the device; DEVICE_NEEDS_RESET is now set and the transport
    /// should raise a configuration interrupt.
    ActivationFailed(DeviceError),
}

pub struct VirtioCore {
    device: Box<dyn VirtioDevice>,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    pub queue_select: u16,
    queues: Vec<QueueState>,
    /// MSI-X vector for configuration changes (PCI only).
    pub config_vector: u16,
    activated: bool,
}

impl VirtioCore {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueState::new(m))
            .collect();
        VirtioCore {
            device,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            config_vector: NO_VECTOR,
            activated: false,
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The 32 feature bits chosen by `device_feature_select`.
    pub fn device_features_word(&self) -> u32 {
        feature_word(self.device.features(), self.device_feature_select)
    }

    pub fn driver_features_word(&self) -> u32 {
        feature_word(self.driver_features, self.driver_feature_select)
    }

    /// Feature bits can only be written until FEATURES_OK; bits the device does not offer are
    /// dropped (the FEATURES_OK check catches a driver that relies on them).
    pub fn write_driver_features_word(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.driver_features = (self.driver_features & !mask) | (u64::from(value) << shift);
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn config_generation(&self) -> u8 {
        self.config_generation
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn queues(&self) -> &[QueueState] {
        &self.queues
    }

    /// The queue chosen by `queue_select`, if it exists.
    pub fn selected_queue(&self) -> Option<&QueueState> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue, for a configuration write: none once the driver set DRIVER_OK
    /// (queues are live and belong to the device then).
    pub fn selected_queue_mut(&mut self) -> Option<&mut QueueState> {
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// A write to the device status register.
    pub fn write_status(&mut self, value: u8, events: &dyn QueueEvents) -> StatusChange {
        if value == 0 {
            self.reset();
            return StatusChange::Reset;
        }
        let old = self.status;
        // The driver only ever adds bits; anything else is a confused driver and ignored.
        // DEVICE_NEEDS_RESET is ours and stays until reset.
        if value & old & !STATUS_DEVICE_NEEDS_RESET != old & !STATUS_DEVICE_NEEDS_RESET {
            return StatusChange::None;
        }
        let mut new = (value & !STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET);
        let adds = |new: u8, bit: u8| new & bit != 0 && old & bit == 0;
        if adds(new, STATUS_FEATURES_OK) && !self.features_acceptable() {
            // The driver reads the status back and gives up.
            new &= !STATUS_FEATURES_OK;
        }
        if adds(new, STATUS_DRIVER_OK) {
            if new & STATUS_FEATURES_OK == 0 {
                new &= !STATUS_DRIVER_OK;
            } else {
                self.status = new;
                if let Err(e) = self.activate(events) {
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                    return StatusChange::ActivationFailed(e);
                }
                return StatusChange::None;
            }
        }
        self.status = new;
        StatusChange::None
    }

    /// Sets DEVICE_NEEDS_RESET. Returns false if it was already set (no new interrupt needed).
    pub fn set_needs_reset(&mut self) -> bool {
        if self.status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return false;
        }
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        true
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device.features() == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self, events: &dyn QueueEvents) -> Result<(), DeviceError> {
        let mut active = Vec::new();
        for (index, q) in self.queues.iter().enumerate().filter(|(_, q)| q.ready) {
            if q.size == 0 || q.size > q.max_size || !q.size.is_power_of_two() {
                return Err(DeviceError(format!(
                    "queue {index}: size {} is not a power of two up to {}",
                    q.size, q.max_size
                )));
            }
            let fd_error = |e: io::Error| {
                DeviceError(format!("queue {index}: cannot duplicate an eventfd: {e}"))
            };
            active.push(ActiveQueue {
                index,
                size: q.size,
                desc: GuestAddress(q.desc),
                avail: GuestAddress(q.avail),
                used: GuestAddress(q.used),
                kick: events.kick(index).map_err(fd_error)?,
                call: events.call(index, q.vector).map_err(fd_error)?,
            });
        }
        self.device.activate(self.driver_features, active)?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        for q in &mut self.queues {
            *q = QueueState::new(q.max_size);
        }
    }
}

fn feature_word(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER};
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A queue as activated: (index, size, desc, avail, used).
    pub type Activated = (usize, u16, u64, u64, u64);

    /// What a fake device saw.
    #[derive(Default, Debug)]
    pub struct Log {
        pub activations: Vec<(u64, Vec<Activated>)>,
        pub resets: usize,
        pub config_writes: Vec<(u64, Vec<u8>)>,
    }

    pub struct FakeDevice {
        pub log: Arc<Mutex<Log>>,
        pub fail_activation: bool,
        pub sizes: Vec<u16>,
    }

    impl FakeDevice {
        pub fn new(queues: usize) -> (Self, Arc<Mutex<Log>>) {
            let log = Arc::new(Mutex::new(Log::default()));
            (
                FakeDevice {
                    log: log.clone(),
                    fail_activation: false,
                    sizes: vec![256; queues],
                },
                log,
            )
        }
    }

    pub const FAKE_FEATURES: u64 = (1 << 32) | (1 << 29) | (1 << 5);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            FAKE_FEATURES
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0xc0u8.wrapping_add((offset as usize + i) as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, features: u64, queues: Vec<ActiveQueue>) -> Result<(), DeviceError> {
            if self.fail_activation {
                return Err(DeviceError("backend said no".into()));
            }
            let qs = queues
                .iter()
                .map(|q| (q.index, q.size, q.desc.0, q.avail.0, q.used.0))
                .collect();
            self.log.lock().unwrap().activations.push((features, qs));
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
    }

    pub struct Events;
    impl QueueEvents for Events {
        fn kick(&self, _: usize) -> io::Result<EventFd> {
            EventFd::new(EFD_NONBLOCK)
        }
        fn call(&self, _: usize, _: u16) -> io::Result<EventFd> {
            EventFd::new(EFD_NONBLOCK)
        }
    }

    fn negotiate(core: &mut VirtioCore, features: u64) -> u8 {
        core.write_status(STATUS_ACKNOWLEDGE, &Events);
        core.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER, &Events);
        core.driver_feature_select = 0;
        core.write_driver_features_word(features as u32);
        core.driver_feature_select = 1;
        core.write_driver_features_word((features >> 32) as u32);
        core.write_status(
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            &Events,
        );
        core.status()
    }

    #[test]
    fn feature_words() {
        let (dev, _) = FakeDevice::new(1);
        let mut core = VirtioCore::new(Box::new(dev));
        assert_eq!(core.device_features_word(), 1 << 29 | 1 << 5);
        core.device_feature_select = 1;
        assert_eq!(core.device_features_word(), 1);
        core.device_feature_select = 2;
        assert_eq!(core.device_features_word(), 0);
    }

    #[test]
    fn features_ok_needs_a_subset_with_version_1() {
        for (features, ok) in [
            (FAKE_FEATURES, true),
            (1 << 32, true),
            (1 << 29, false),              // no VERSION_1
            ((1 << 32) | (1 << 6), false), // not offered
        ] {
            let (dev, _) = FakeDevice::new(1);
            let mut core = VirtioCore::new(Box::new(dev));
            let status = negotiate(&mut core, features);
            assert_eq!(status & STATUS_FEATURES_OK != 0, ok, "{features:#x}");
        }
    }

    #[test]
    fn driver_ok_activates_ready_queues_and_reset_stops_them() {
        let (dev, log) = FakeDevice::new(2);
        let mut core = VirtioCore::new(Box::new(dev));
        let s = negotiate(&mut core, 1 << 32);
        // Features are frozen after FEATURES_OK.
        core.driver_feature_select = 0;
        core.write_driver_features_word(1 << 29);
        assert_eq!(core.driver_features(), 1 << 32);
        core.queue_select = 1;
        let q = core.selected_queue_mut().unwrap();
        q.size = 128;
        q.desc = 0x1000;
        q.avail = 0x2000;
        q.used = 0x3000;
        q.ready = true;
        assert!(matches!(
            core.write_status(s | STATUS_DRIVER_OK, &Events),
            StatusChange::None
        ));
        assert!(core.is_activated());
        assert_eq!(
            log.lock().unwrap().activations,
            vec![(1 << 32, vec![(1, 128, 0x1000, 0x2000, 0x3000)])]
        );
        // Queues are frozen while the device runs.
        assert!(core.selected_queue_mut().is_none());
        // Clearing bits is ignored.
        core.write_status(STATUS_ACKNOWLEDGE, &Events);
        assert_eq!(core.status(), s | STATUS_DRIVER_OK);

        assert!(matches!(core.write_status(0, &Events), StatusChange::Reset));
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(core.status(), 0);
        assert!(!core.is_activated());
        assert_eq!(core.selected_queue().unwrap().size, 256);
        assert!(!core.queues()[1].ready);

        // And it can be activated again.
        let s = negotiate(&mut core, 1 << 32);
        core.write_status(s | STATUS_DRIVER_OK, &Events);
        assert_eq!(log.lock().unwrap().activations.len(), 2);
        // A reset before activation does not bother the device.
        core.write_status(0, &Events);
        core.write_status(0, &Events);
        assert_eq!(log.lock().unwrap().resets, 2);
    }

    #[test]
    fn failed_activation_needs_reset() {
        let (mut dev, _) = FakeDevice::new(1);
        dev.fail_activation = true;
        let mut core = VirtioCore::new(Box::new(dev));
        let s = negotiate(&mut core, 1 << 32);
        assert!(matches!(
            core.write_status(s | STATUS_DRIVER_OK, &Events),
            StatusChange::ActivationFailed(_)
        ));
        assert_ne!(core.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(!core.is_activated());
        assert!(!core.set_needs_reset(), "already set");
        core.write_status(0, &Events);
        assert_eq!(core.status(), 0);
    }

    #[test]
    fn bad_queue_size_fails_activation() {
        let (dev, log) = FakeDevice::new(1);
        let mut core = VirtioCore::new(Box::new(dev));
        let s = negotiate(&mut core, 1 << 32);
        let q = core.selected_queue_mut().unwrap();
        q.size = 100;
        q.ready = true;
        assert!(matches!(
            core.write_status(s | STATUS_DRIVER_OK, &Events),
            StatusChange::ActivationFailed(_)
        ));
        assert!(log.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn driver_ok_without_features_ok_is_dropped() {
        let (dev, log) = FakeDevice::new(1);
        let mut core = VirtioCore::new(Box::new(dev));
        core.write_status(
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
            &Events,
        );
        assert_eq!(core.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert!(log.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn needs_reset_is_sticky_until_reset() {
        let (dev, _) = FakeDevice::new(1);
        let mut core = VirtioCore::new(Box::new(dev));
        let s = negotiate(&mut core, 1 << 32);
        core.write_status(s | STATUS_DRIVER_OK, &Events);
        assert!(core.set_needs_reset());
        assert_eq!(core.config_generation(), 1);
        // The driver writes back what it read plus a bit: still set.
        core.write_status(core.status() | 0x80, &Events);
        assert_ne!(core.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        core.write_status(0, &Events);
        assert_eq!(core.status(), 0);
    }
}

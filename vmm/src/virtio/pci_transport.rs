//! virtio-pci, modern (virtio 1.x) and non-transitional: device ID 0x1040 + type, every
//! structure in one 64-bit memory BAR.
//!
//! BAR 0 layout:
//! ```text
//! 0x0000  common configuration (0x38 bytes)
//! 0x1000  ISR status (1 byte)
//! 0x2000  device-specific configuration
//! 0x3000  notifications: queue n at 0x3000 + 4 n (notify_off_multiplier 4)
//! 0x4000  MSI-X table (16 bytes per vector: one per queue plus one for config changes)
//! 0x5000  MSI-X pending-bit array
//! ```
//!
//! Each queue's notification address is an ioeventfd registered with KVM, handed to the
//! backend as its kick fd; each MSI-X vector's eventfd is an irqfd, handed to the backend as
//! the call fd of the queues using it. The VMM is out of the I/O path; it only sees setup,
//! config-space reads and the rare mask change. The ioeventfds follow the BAR when the guest
//! moves it.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::core::{QueueEvents, StatusChange, VirtioCore};
use super::device::VirtioDevice;
use super::driver_log::DriverLog;
use super::{VirtioTransport, INTERRUPT_CONFIG, NO_VECTOR};
use crate::devices::{Bus, BusDevice};
use crate::pci::config_space::{self, ConfigSpace, ConfigSpaceError, Header};
use crate::pci::msix::{self, MsixError, MsixVectors};
use crate::pci::PciDevice;
use crate::vm_ops::VmOps;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern devices are 0x1040 + the virtio device type.
const DEVICE_ID_BASE: u16 = 0x1040;
/// Revision 1 marks a modern device.
const REVISION: u8 = 1;
/// Non-transitional devices may use any subsystem ID of at least 0x40.
const SUBSYSTEM_ID: u16 = 0x40;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 1;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const REGION_LEN: u64 = 0x1000;
/// What fits in the table region (16 bytes each), one vector per queue plus config.
pub const MAX_QUEUES: usize = (REGION_LEN / msix::ENTRY_SIZE) as usize - 1;

const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
/// VIRTIO_PCI_CAP_PCI_CFG: a window in config space onto BAR 0, for firmware and drivers that
/// cannot map the BAR yet. The spec requires every device to offer it.
const CAP_PCI_CFG: u8 = 5;
/// Offsets in that capability: which BAR, where in it, how many bytes; then the data window.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

#[derive(Debug, Error)]
pub enum PciTransportError {
    #[error("{0} queues is more than the {MAX_QUEUES} the transport supports")]
    TooManyQueues(usize),
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot set up config space")]
    ConfigSpace(#[from] ConfigSpaceError),
    #[error("cannot set up MSI-X")]
    Msix(#[from] MsixError),
}

/// PCI class code for a device type: what lspci shows; drivers match on the IDs instead.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00, // network controller, Ethernet
        2 => 0x01_80_00, // mass storage, other
        3 => 0x07_80_00, // communication, other
        _ => 0xff_00_00, // unassigned class
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![
        CAP_VENDOR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

struct State {
    config: ConfigSpace,
    msix_cap: usize,
    pci_cfg_cap: usize,
    msix: MsixVectors,
    core: VirtioCore,
    isr: u8,
    /// Where BAR 0 is on the MMIO bus and the ioeventfds are registered, if anywhere.
    mapped: Option<u64>,
    /// Taken off the bus for good: BAR 0 stays unmapped whatever config space says.
    unplugged: bool,
}

pub struct VirtioPciDevice {
    /// Says what the guest's driver got wrong, under the device's name.
    driver_log: DriverLog,
    /// One per queue, at the queue's notification address.
    notify: Vec<EventFd>,
    vm: Arc<dyn VmOps>,
    mmio_bus: Arc<Bus>,
    this: Weak<VirtioPciDevice>,
    state: Mutex<State>,
}

impl VirtioPciDevice {
    /// A device whose BAR 0 starts out at `bar_addr` (from the 64-bit window). It appears on
    /// the MMIO bus once the guest enables memory decoding.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        vm: Arc<dyn VmOps>,
        mmio_bus: Arc<Bus>,
    ) -> Result<Arc<Self>, PciTransportError> {
        let queues = device.queue_max_sizes().len();
        if queues > MAX_QUEUES {
            return Err(PciTransportError::TooManyQueues(queues));
        }
        let device_type = device.device_type();
        let mut config = ConfigSpace::new(&Header {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: DEVICE_ID_BASE + device_type as u16,
            revision_id: REVISION,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
        });
        config.add_memory_bar(0, BAR_SIZE, bar_addr, true, false)?;
        let ro = |c: &[u8]| vec![0u8; c.len()];
        let notify_len = (queues as u64 * u64::from(NOTIFY_MULTIPLIER)).max(4);
        for cap in [
            virtio_cap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, &[]),
            virtio_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(CAP_ISR, ISR_OFFSET, ISR_LEN, &[]),
            virtio_cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_LEN, &[]),
        ] {
            config.add_capability(&cap, &ro(&cap))?;
        }
        let vectors = queues as u16 + 1;
        let (cap, wmask) =
            msix::capability(vectors, 0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&cap, &wmask)?;
        let window = virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut window_wmask = vec![0u8; window.len()];
        window_wmask[PCI_CFG_BAR] = 0xff;
        window_wmask[PCI_CFG_OFFSET..].fill(0xff);
        let pci_cfg_cap = config.add_capability(&window, &window_wmask)?;
        let msix = MsixVectors::new(vectors, vm.clone())?;
        let notify = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(PciTransportError::EventFd)?;
        Ok(Arc::new_cyclic(|this| VirtioPciDevice {
            driver_log: DriverLog::new(name),
            notify,
            vm,
            mmio_bus,
            this: this.clone(),
            state: Mutex::new(State {
                config,
                msix_cap,
                pci_cfg_cap,
                msix,
                core: VirtioCore::new(device),
                isr: 0,
                mapped: None,
                unplugged: false,
            }),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything logged here follows from what the guest's driver does.
    fn log(&self, what: std::fmt::Arguments) {
        self.driver_log.say(what);
    }

    /// Puts BAR 0 and the notification ioeventfds where the config space says, if that
    /// changed.
    fn sync_bar(&self, st: &mut State) {
        let want = st
            .config
            .bar_mapping(0)
            .map(|(addr, _)| addr)
            .filter(|_| !st.unplugged);
        if want == st.mapped {
            return;
        }
        if let Some(old) = st.mapped.take() {
            let _ = self.mmio_bus.remove(old);
            for (q, fd) in self.notify.iter().enumerate() {
                if let Err(e) = self.vm.unregister_ioevent(fd, notify_addr(old, q), None) {
                    self.log(format_args!("queue {q}: {e}"));
                }
            }
        }
        let (Some(addr), Some(this)) = (want, self.this.upgrade()) else {
            return;
        };
        // A guest can put the BAR anywhere, including over something else; then it is simply
        // not decoded, as two devices claiming one address would be on real hardware.
        if let Err(e) = self.mmio_bus.insert(this, addr, BAR_SIZE) {
            self.log(format_args!("BAR 0 at {addr:#x} not mapped: {e}"));
            return;
        }
        for (q, fd) in self.notify.iter().enumerate() {
            if let Err(e) = self.vm.register_ioevent(fd, notify_addr(addr, q), None) {
                self.log(format_args!("queue {q}: {e}"));
            }
        }
        st.mapped = Some(addr);
    }

    fn raise_config_interrupt(&self, st: &mut State) {
        st.isr |= INTERRUPT_CONFIG as u8;
        if let Some(e) = st.msix.event(st.core.config_vector) {
            // A full counter still means "pending"; nothing to do on error.
            let _ = e.write(1);
        }
    }

    fn common_read(&self, st: &State, offset: u64, data: &mut [u8]) {
        let core = &st.core;
        let mut r = [0u8; COMMON_LEN as usize];
        let put = |r: &mut [u8], off: usize, bytes: &[u8]| {
            r[off..off + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut r, 0x00, &core.device_feature_select.to_le_bytes());
        put(&mut r, 0x04, &core.device_features_word().to_le_bytes());
        put(&mut r, 0x08, &core.driver_feature_select.to_le_bytes());
        put(&mut r, 0x0c, &core.driver_features_word().to_le_bytes());
        put(&mut r, 0x10, &core.config_vector.to_le_bytes());
        put(&mut r, 0x12, &(core.num_queues() as u16).to_le_bytes());
        r[0x14] = core.status();
        r[0x15] = core.config_generation();
        put(&mut r, 0x16, &core.queue_select.to_le_bytes());
        if let Some(q) = core.selected_queue() {
            put(&mut r, 0x18, &q.size.to_le_bytes());
            put(&mut r, 0x1a, &q.vector.to_le_bytes());
            put(&mut r, 0x1c, &u16::from(q.ready).to_le_bytes());
            put(&mut r, 0x1e, &core.queue_select.to_le_bytes());
            put(&mut r, 0x20, &q.desc.to_le_bytes());
            put(&mut r, 0x28, &q.avail.to_le_bytes());
            put(&mut r, 0x30, &q.used.to_le_bytes());
        }
        // An absent queue reads as all zeros: queue_size 0 tells the driver it does not exist.
        read_slice(&r, offset, data);
    }

    fn common_write(&self, st: &mut State, offset: u64, data: &[u8]) {
        let v = le_value(data);
        let State { core, msix, .. } = st;
        let vector = |v: u64| {
            if v < msix.table.len() as u64 {
                v as u16
            } else {
                // Reading back NO_VECTOR tells the driver the vector was refused.
                NO_VECTOR
            }
        };
        match (offset, data.len()) {
            (0x00, 4) => core.device_feature_select = v as u32,
            (0x08, 4) => core.driver_feature_select = v as u32,
            (0x0c, 4) => core.write_driver_features_word(v as u32),
            (0x10, 2) => core.config_vector = vector(v),
            (0x14, 1) => {
                let events = PciQueueEvents {
                    notify: &self.notify,
                    msix,
                };
                match core.write_status(v as u8, &events) {
                    StatusChange::None => {}
                    StatusChange::Reset => st.isr = 0,
                    StatusChange::ActivationFailed(e) => {
                        self.log(format_args!("cannot start the device: {e}"));
                        self.raise_config_interrupt(st);
                    }
                }
            }
            (0x16, 2) => core.queue_select = v as u16,
            (0x18, 2) => {
                if let Some(q) = core.selected_queue_mut() {
                    q.size = v as u16;
                }
            }
            (0x1a, 2) => {
                let vec = vector(v);
                if let Some(q) = core.selected_queue_mut() {
                    q.vector = vec;
                }
            }
            // Only 1 may be written (a queue is disabled by resetting the device).
            (0x1c, 2) => {
                if let Some(q) = core.selected_queue_mut() {
                    q.ready |= v == 1;
                }
            }
            (0x20..=0x37, 4 | 8) => {
                if let Some(q) = core.selected_queue_mut() {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    write_part(field, offset & 7, data.len(), v);
                }
            }
            _ => {}
        }
    }
}

/// One 64-bit queue address written in halves or whole.
fn write_part(field: &mut u64, part: u64, len: usize, v: u64) {
    match (part, len) {
        (0, 8) => *field = v,
        (0, 4) => *field = (*field & !0xffff_ffff) | v,
        (4, 4) => *field = (*field & 0xffff_ffff) | (v << 32),
        _ => {}
    }
}

fn notify_addr(bar: u64, queue: usize) -> u64 {
    bar + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn read_slice(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = src.get(offset as usize + i).copied().unwrap_or(0);
    }
}

struct PciQueueEvents<'a> {
    notify: &'a [EventFd],
    msix: &'a MsixVectors,
}

impl QueueEvents for PciQueueEvents<'_> {
    fn kick(&self, queue: usize) -> io::Result<EventFd> {
        self.notify
            .get(queue)
            .ok_or_else(|| io::Error::other("no such queue"))?
            .try_clone()
    }

    fn call(&self, _queue: usize, vector: u16) -> io::Result<EventFd> {
        match self.msix.event(vector) {
            Some(e) => e.try_clone(),
            // No vector: the driver polls or does not care; the backend still needs a fd.
            None => EventFd::new(EFD_NONBLOCK),
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut st = self.state();
        let region = offset & !(REGION_LEN - 1);
        let within = offset - region;
        match region {
            COMMON_OFFSET => self.common_read(&st, within, data),
            ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                data.fill(0);
                if within == 0 {
                    if let Some(b) = data.first_mut() {
                        *b = st.isr;
                    }
                    st.isr = 0;
                }
            }
            DEVICE_OFFSET => st.core.device().read_config(within, data),
            MSIX_TABLE_OFFSET => st.msix.table.read(within, data),
            MSIX_PBA_OFFSET => st.msix.read_pba(within, data),
            _ => data.fill(0),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut st = self.state();
        let region = offset & !(REGION_LEN - 1);
        let within = offset - region;
        match region {
            COMMON_OFFSET => self.common_write(&mut st, within, data),
            DEVICE_OFFSET => st.core.device_mut().write_config(within, data),
            NOTIFY_OFFSET => {
                // Normally caught by KVM; reaches us only if the ioeventfd could not be
                // registered. Deliver it the slow way.
                let q = (within / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(fd) = self.notify.get(q) {
                    let _ = fd.write(1);
                }
            }
            MSIX_TABLE_OFFSET => {
                if let Err(e) = st.msix.write_table(within, data) {
                    self.log(format_args!("MSI-X: {e}"));
                }
            }
            _ => {}
        }
    }
}

/// An access through the PCI_CFG window: where in BAR 0, and how many bytes.
struct WindowAccess {
    offset: u64,
    len: usize,
}

impl VirtioPciDevice {
    /// The BAR access the PCI_CFG capability's fields describe, if the config access at
    /// `offset` touches its data window and the fields are valid (BAR 0, 1, 2 or 4 bytes,
    /// naturally aligned, inside the BAR; the spec leaves anything else undefined: ignored).
    fn window_access(st: &State, offset: usize, len: usize) -> Option<WindowAccess> {
        let data = st.pci_cfg_cap + PCI_CFG_DATA;
        if offset >= data + 4 || offset + len <= data {
            return None;
        }
        let cap = st.pci_cfg_cap;
        let bar = st.config.u32_at(cap + PCI_CFG_BAR) & 0xff;
        let at = u64::from(st.config.u32_at(cap + PCI_CFG_OFFSET));
        let length = st.config.u32_at(cap + PCI_CFG_LENGTH) as usize;
        let valid = bar == 0
            && matches!(length, 1 | 2 | 4)
            && at % length as u64 == 0
            && at + length as u64 <= BAR_SIZE;
        valid.then_some(WindowAccess {
            offset: at,
            len: length,
        })
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&self, offset: usize, data: &mut [u8]) {
        let access = {
            let st = self.state();
            Self::window_access(&st, offset, data.len())
        };
        if let Some(access) = access {
            // Fill the data window from the BAR first (the state lock is not held: the BAR
            // read takes it), then read config space as usual.
            let mut bytes = [0u8; 4];
            BusDevice::read(self, access.offset, &mut bytes[..access.len]);
            let mut st = self.state();
            let window = st.pci_cfg_cap + PCI_CFG_DATA;
            st.config.write(window, &bytes);
        }
        self.state().config.read(offset, data);
    }

    fn config_write(&self, offset: usize, data: &[u8]) {
        let mut st = self.state();
        st.config.write(offset, data);
        if let Some(access) = Self::window_access(&st, offset, data.len()) {
            let mut bytes = [0u8; 4];
            st.config
                .read(st.pci_cfg_cap + PCI_CFG_DATA, &mut bytes[..access.len]);
            drop(st);
            BusDevice::write(self, access.offset, &bytes[..access.len]);
            return;
        }
        let control = st.msix_cap + msix::MSIX_CONTROL_OFFSET;
        if offset < control + 2 && offset + data.len() > control {
            let value = st.config.u16_at(control);
            if let Err(e) = st.msix.set_control(value) {
                self.log(format_args!("MSI-X: {e}"));
            }
        }
        let touches =
            |start: usize, len: usize| offset < start + len && offset + data.len() > start;
        if touches(config_space::COMMAND, 2) || touches(config_space::BAR0, 8) {
            self.sync_bar(&mut st);
        }
    }
}

impl VirtioTransport for VirtioPciDevice {
    fn unplug(&self) {
        let mut st = self.state();
        st.unplugged = true;
        self.sync_bar(&mut st);
        let State { core, msix, .. } = &mut *st;
        let events = PciQueueEvents {
            notify: &self.notify,
            msix,
        };
        // As the driver's reset would: the backend stops using guest memory.
        core.write_status(0, &events);
    }

    fn backend_lost(&self) {
        let mut st = self.state();
        st.core.device_mut().backend_lost();
        if st.core.set_needs_reset() {
            self.raise_config_interrupt(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::core::tests::{FakeDevice, FAKE_FEATURES};
    use crate::virtio::{
        STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
        STATUS_FEATURES_OK,
    };
    use crate::vm_ops::fake::FakeVmOps;
    use std::os::fd::AsRawFd;

    const BAR: u64 = 0x1_0000_0000;

    struct Rig {
        dev: Arc<VirtioPciDevice>,
        vm: Arc<FakeVmOps>,
        bus: Arc<Bus>,
        log: Arc<Mutex<crate::virtio::core::tests::Log>>,
    }

    fn rig(queues: usize) -> Rig {
        let (fake, log) = FakeDevice::new(queues);
        let vm = Arc::new(FakeVmOps::default());
        let bus = Arc::new(Bus::new());
        let dev =
            VirtioPciDevice::new("disk0", Box::new(fake), BAR, vm.clone(), bus.clone()).unwrap();
        Rig { dev, vm, bus, log }
    }

    impl Rig {
        fn cfg32(&self, off: usize) -> u32 {
            let mut b = [0u8; 4];
            self.dev.config_read(off, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&self, off: u64, v: u64, len: usize) {
            assert!(self.bus.write(BAR + off, &v.to_le_bytes()[..len]));
        }
        fn r(&self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            assert!(self.bus.read(BAR + off, &mut b[..len]));
            u64::from_le_bytes(b)
        }
        fn enable_memory(&self) {
            self.dev
                .config_write(4, &config_space::COMMAND_MEMORY.to_le_bytes());
        }
        /// (cfg_type, offset, length) of each virtio capability, and the MSI-X capability's
        /// offset.
        fn caps(&self) -> (Vec<(u8, u32, u32)>, usize) {
            let mut out = Vec::new();
            let mut msix = 0;
            let mut p = (self.cfg32(0x34) & 0xff) as usize;
            while p != 0 {
                let head = self.cfg32(p);
                match head & 0xff {
                    0x09 => out.push(((head >> 24) as u8, self.cfg32(p + 8), self.cfg32(p + 12))),
                    0x11 => msix = p,
                    other => panic!("unexpected capability {other:#x}"),
                }
                p = ((head >> 8) & 0xff) as usize;
            }
            (out, msix)
        }
    }

    #[test]
    fn identity_and_capabilities() {
        let rig = rig(2);
        assert_eq!(rig.cfg32(0), 0x1042_1af4);
        assert_eq!(rig.cfg32(8) >> 8, 0x01_80_00);
        assert_eq!(rig.cfg32(8) & 0xff, 1, "revision 1");
        assert_eq!(rig.cfg32(0x10), 0x4, "64-bit memory BAR");
        assert_eq!(rig.cfg32(0x14), 1);
        let (caps, msix) = rig.caps();
        assert_eq!(
            caps,
            vec![
                (1, 0, 0x38),
                (2, 0x3000, 8),
                (3, 0x1000, 1),
                (4, 0x2000, 0x1000),
                (5, 0, 0)
            ]
        );
        assert_eq!(rig.cfg32(0x50 + 16), 4, "notify_off_multiplier");
        let control = rig.cfg32(msix) >> 16;
        assert_eq!(control & 0x7ff, 2, "3 vectors");
        assert_eq!(rig.cfg32(msix + 4), 0x4000);
        assert_eq!(rig.cfg32(msix + 8), 0x5000);
    }

    #[test]
    fn pci_cfg_window_reaches_bar0_without_mapping_it() {
        let rig = rig(2);
        let mut cap = (rig.cfg32(0x34) & 0xff) as usize;
        while rig.cfg32(cap) & 0xff != 0x09 || (rig.cfg32(cap) >> 24) != 5 {
            cap = ((rig.cfg32(cap) >> 8) & 0xff) as usize;
            assert_ne!(cap, 0, "no PCI_CFG capability");
        }
        let aim = |offset: u32, len: u32| {
            rig.dev.config_write(cap + 4, &[0]);
            rig.dev.config_write(cap + 8, &offset.to_le_bytes());
            rig.dev.config_write(cap + 12, &len.to_le_bytes());
        };
        // Memory decoding is off: the BAR is not on the bus, the window still works.
        let mut b = [0u8; 4];
        assert!(!rig.bus.read(BAR, &mut b));
        aim(18, 2);
        assert_eq!(
            rig.cfg32(cap + 16) & 0xffff,
            2,
            "num_queues through the window"
        );
        aim(22, 2);
        rig.dev.config_write(cap + 16, &1u16.to_le_bytes());
        rig.enable_memory();
        assert_eq!(rig.r(22, 2), 1, "queue_select written through the window");
        // Fields the spec leaves undefined are ignored: unaligned, too long, another BAR.
        for (bar, offset, len) in [(0u8, 23u32, 2u32), (0, 20, 8), (1, 22, 2)] {
            rig.dev.config_write(cap + 4, &[bar]);
            rig.dev.config_write(cap + 8, &offset.to_le_bytes());
            rig.dev.config_write(cap + 12, &len.to_le_bytes());
            rig.dev.config_write(cap + 16, &0u32.to_le_bytes());
            assert_eq!(rig.r(22, 2), 1);
        }
    }

    #[test]
    fn bar_is_decoded_only_with_memory_enabled_and_follows_moves() {
        let rig = rig(2);
        let mut b = [0u8; 4];
        assert!(!rig.bus.read(BAR, &mut b));
        assert!(rig.vm.state().ioevents.is_empty());
        rig.enable_memory();
        assert!(rig.bus.read(BAR, &mut b));
        let fds: Vec<i32> = rig.dev.notify.iter().map(|e| e.as_raw_fd()).collect();
        let expect = |bar: u64| {
            [(fds[0], bar + 0x3000, None), (fds[1], bar + 0x3004, None)]
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(rig.vm.state().ioevents, expect(BAR));
        // Sizing with decode off, then a move.
        rig.dev.config_write(4, &0u16.to_le_bytes());
        assert!(!rig.bus.read(BAR, &mut b));
        assert!(rig.vm.state().ioevents.is_empty());
        rig.dev.config_write(0x10, &[0xff; 4]);
        rig.dev.config_write(0x14, &[0xff; 4]);
        assert_eq!(rig.cfg32(0x10), 0xffff_8004, "32 KiB");
        rig.dev.config_write(0x10, &0x8000u32.to_le_bytes());
        rig.dev.config_write(0x14, &2u32.to_le_bytes());
        rig.enable_memory();
        assert!(rig.bus.read(0x2_0000_8000, &mut b));
        assert!(!rig.bus.read(BAR, &mut b));
        assert_eq!(rig.vm.state().ioevents, expect(0x2_0000_8000));
    }

    #[test]
    fn driver_setup_activates_with_msix_call_fds() {
        let rig = rig(2);
        rig.enable_memory();
        assert_eq!(rig.r(0x12, 2), 2, "num_queues");
        rig.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        rig.w(0x00, 1, 4);
        assert_eq!(rig.r(0x04, 4), FAKE_FEATURES >> 32);
        rig.w(0x08, 1, 4);
        rig.w(0x0c, 1, 4);
        rig.w(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
        assert_ne!(rig.r(0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        // Config vector 0, queue 1 on vector 2; vector 7 does not exist.
        rig.w(0x10, 0, 2);
        assert_eq!(rig.r(0x10, 2), 0);
        rig.w(0x16, 1, 2);
        assert_eq!(rig.r(0x1e, 2), 1, "queue_notify_off");
        rig.w(0x1a, 7, 2);
        assert_eq!(rig.r(0x1a, 2), u64::from(NO_VECTOR));
        rig.w(0x1a, 2, 2);
        assert_eq!(rig.r(0x18, 2), 256);
        rig.w(0x18, 64, 2);
        rig.w(0x20, 0x1000, 4);
        rig.w(0x24, 0x1, 4);
        rig.w(0x28, 0x2_0000_2000, 8);
        rig.w(0x30, 0x3000, 4);
        rig.w(0x1c, 1, 2);
        assert_eq!(rig.r(0x20, 8), 0x1_0000_1000);
        // Absent queue: size 0.
        rig.w(0x16, 5, 2);
        assert_eq!(rig.r(0x18, 2), 0);
        rig.w(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
        assert_eq!(
            rig.log.lock().unwrap().activations,
            vec![(1 << 32, vec![(1, 64, 0x1_0000_1000, 0x2_0000_2000, 0x3000)])]
        );
        // Device config reads go to the device.
        assert_eq!(rig.r(0x2000 + 4, 1), 0xc4);
        rig.w(0x2000 + 2, 0x55, 1);
        assert_eq!(rig.log.lock().unwrap().config_writes, vec![(2, vec![0x55])]);
        // Reset stops the device.
        rig.w(0x14, 0, 1);
        assert_eq!(rig.r(0x14, 1), 0);
        assert_eq!(rig.log.lock().unwrap().resets, 1);
    }

    #[test]
    fn backend_loss_sets_needs_reset_and_signals_config_vector() {
        let rig = rig(1);
        rig.enable_memory();
        rig.w(0x10, 1, 2);
        rig.dev.backend_lost();
        assert_ne!(rig.r(0x14, 1) as u8 & STATUS_DEVICE_NEEDS_RESET, 0);
        let st = rig.dev.state();
        assert_eq!(st.msix.event(1).unwrap().read().unwrap(), 1);
        drop(st);
        assert_eq!(rig.r(0x1000, 1), 2, "ISR config bit");
        assert_eq!(rig.r(0x1000, 1), 0, "cleared by the read");
        // Only once.
        rig.dev.backend_lost();
        assert!(rig.dev.state().msix.event(1).unwrap().read().is_err());
    }

    #[test]
    fn msix_through_bar_and_config_space() {
        let rig = rig(1);
        rig.enable_memory();
        let (_, msix) = rig.caps();
        rig.w(0x4000, 0xfee0_0000, 4);
        rig.w(0x4008, 0x25, 4);
        rig.w(0x400c, 0, 4);
        assert!(rig.vm.state().irqfds.is_empty());
        // Enable through the capability's Message Control.
        rig.dev.config_write(msix + 2, &(1u16 << 15).to_le_bytes());
        assert_eq!(rig.cfg32(msix) >> 16 & 0xc000, 0x8000);
        assert_eq!(rig.vm.state().irqfds.len(), 1);
        assert_eq!(
            rig.vm.state().routes.values().next(),
            Some(&(0xfee0_0000, 0x25))
        );
        assert_eq!(rig.r(0x4008, 4), 0x25);
        // Function mask.
        rig.dev.config_write(msix + 3, &[0xc0]);
        assert!(rig.vm.state().irqfds.is_empty());
        rig.dev.state().msix.event(0).unwrap().write(1).unwrap();
        assert_eq!(rig.r(0x5000, 8), 1, "pending while masked");
    }

    #[test]
    fn notify_write_reaching_the_vmm_still_kicks() {
        let rig = rig(2);
        rig.enable_memory();
        rig.w(0x3004, 1, 2);
        assert_eq!(rig.dev.notify[1].read().unwrap(), 1);
    }
}

//! virtio-mmio, version 2 (non-legacy): a 512-byte register window and one IOAPIC pin per
//! device, described to the guest in the DSDT (`LNRO0005`).
//!
//! Notifications: QueueNotify is one register for every queue, so each queue gets an
//! ioeventfd on it with datamatch = queue index, handed to the backend as its kick fd.
//!
//! Interrupts: all queues share one eventfd, an irqfd on the device's GSI, handed to the
//! backend as every queue's call fd. The backend signals it directly, so the VMM never learns
//! that buffers were used, yet the driver reads InterruptStatus on every interrupt and ignores
//! the interrupt when it reads 0. So while the device is active, InterruptStatus always has
//! the "used buffer" bit set: Linux then walks its virtqueues, which costs it a few reads of
//! guest memory when nothing is there (the rare spurious case), and is exactly right
//! otherwise. The configuration-change bit is real: the VMM sets it when it raises a config
//! interrupt and the driver's InterruptACK clears it. The VMM still sees the status read and
//! the ACK write of each interrupt (two cheap exits, inherent to virtio-mmio) but does no work
//! for the I/O itself; the PCI transport with MSI-X has not even those.

use std::io;
use std::sync::{Mutex, MutexGuard};

use std::sync::Arc;

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::core::{QueueEvents, StatusChange, VirtioCore};
use super::device::VirtioDevice;
use super::driver_log::DriverLog;
use super::{VirtioTransport, INTERRUPT_CONFIG, INTERRUPT_VRING};
use crate::devices::BusDevice;
use crate::vm_ops::{VmOps, VmOpsError};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x1af4;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

#[derive(Debug, Error)]
pub enum MmioTransportError {
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    #[error(transparent)]
    Vm(#[from] VmOpsError),
}

struct State {
    core: VirtioCore,
    config_pending: bool,
}

pub struct VirtioMmioDevice {
    /// Says what the guest's driver got wrong, under the device's name.
    driver_log: DriverLog,
    /// One per queue, all on QueueNotify with datamatch = queue index.
    notify: Vec<EventFd>,
    /// An irqfd on the device's GSI: every queue's call fd, and our config interrupt.
    irq: EventFd,
    base: u64,
    gsi: u32,
    vm: Arc<dyn VmOps>,
    state: Mutex<State>,
}

impl VirtioMmioDevice {
    /// A device whose registers are at `base` (the caller puts it on the MMIO bus there),
    /// interrupting on IOAPIC pin `gsi`.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        base: u64,
        gsi: u32,
        vm: Arc<dyn VmOps>,
    ) -> Result<Self, MmioTransportError> {
        let queues = device.queue_max_sizes().len();
        let notify = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioTransportError::EventFd)?;
        for (q, fd) in notify.iter().enumerate() {
            vm.register_ioevent(fd, base + REG_QUEUE_NOTIFY, Some(q as u32))?;
        }
        let irq = EventFd::new(EFD_NONBLOCK).map_err(MmioTransportError::EventFd)?;
        vm.register_irqfd(&irq, gsi)?;
        Ok(VirtioMmioDevice {
            driver_log: DriverLog::new(name),
            notify,
            irq,
            base,
            gsi,
            vm,
            state: Mutex::new(State {
                core: VirtioCore::new(device),
                config_pending: false,
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise_config_interrupt(&self, st: &mut State) {
        st.config_pending = true;
        let _ = self.irq.write(1);
    }

    fn read_register(&self, st: &State, reg: u64) -> u32 {
        let core = &st.core;
        let queue = core.selected_queue();
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match reg {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => core.device().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => core.device_features_word(),
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => {
                let mut s = 0;
                if core.is_activated() {
                    s |= INTERRUPT_VRING;
                }
                if st.config_pending {
                    s |= INTERRUPT_CONFIG;
                }
                s
            }
            REG_STATUS => u32::from(core.status()),
            REG_QUEUE_DESC_LOW => queue.map_or(0, |q| lo(q.desc)),
            REG_QUEUE_DESC_HIGH => queue.map_or(0, |q| hi(q.desc)),
            REG_QUEUE_DRIVER_LOW => queue.map_or(0, |q| lo(q.avail)),
            REG_QUEUE_DRIVER_HIGH => queue.map_or(0, |q| hi(q.avail)),
            REG_QUEUE_DEVICE_LOW => queue.map_or(0, |q| lo(q.used)),
            REG_QUEUE_DEVICE_HIGH => queue.map_or(0, |q| hi(q.used)),
            // No shared memory regions: length all ones.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => u32::from(core.config_generation()),
            _ => 0,
        }
    }

    fn write_register(&self, st: &mut State, reg: u64, v: u32) {
        let set_lo = |f: &mut u64| *f = (*f & !0xffff_ffff) | u64::from(v);
        let set_hi = |f: &mut u64| *f = (*f & 0xffff_ffff) | (u64::from(v) << 32);
        let core = &mut st.core;
        match reg {
            REG_DEVICE_FEATURES_SEL => core.device_feature_select = v,
            REG_DRIVER_FEATURES => core.write_driver_features_word(v),
            REG_DRIVER_FEATURES_SEL => core.driver_feature_select = v,
            // Out-of-range values select no queue and set no valid size, rather than alias.
            REG_QUEUE_SEL => core.queue_select = u16::try_from(v).unwrap_or(u16::MAX),
            REG_QUEUE_NUM => {
                if let Some(q) = core.selected_queue_mut() {
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = core.selected_queue_mut() {
                    q.ready = v == 1;
                }
            }
            REG_QUEUE_NOTIFY => {
                // KVM catches these; we only see one for a queue index that does not exist,
                // or if an ioeventfd was refused. Deliver it the slow way if it can be.
                if let Some(fd) = self.notify.get(v as usize) {
                    let _ = fd.write(1);
                }
            }
            REG_INTERRUPT_ACK if v & INTERRUPT_CONFIG != 0 => st.config_pending = false,
            REG_STATUS => {
                let events = MmioQueueEvents {
                    notify: &self.notify,
                    irq: &self.irq,
                };
                match core.write_status(v as u8, &events) {
                    StatusChange::None => {}
                    StatusChange::Reset => st.config_pending = false,
                    StatusChange::ActivationFailed(e) => {
                        self.driver_log
                            .say(format_args!("cannot start the device: {e}"));
                        self.raise_config_interrupt(st);
                    }
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = core.selected_queue_mut() {
                    match reg {
                        REG_QUEUE_DESC_LOW => set_lo(&mut q.desc),
                        REG_QUEUE_DESC_HIGH => set_hi(&mut q.desc),
                        REG_QUEUE_DRIVER_LOW => set_lo(&mut q.avail),
                        REG_QUEUE_DRIVER_HIGH => set_hi(&mut q.avail),
                        REG_QUEUE_DEVICE_LOW => set_lo(&mut q.used),
                        _ => set_hi(&mut q.used),
                    }
                }
            }
            _ => {}
        }
    }
}

struct MmioQueueEvents<'a> {
    notify: &'a [EventFd],
    irq: &'a EventFd,
}

impl QueueEvents for MmioQueueEvents<'_> {
    fn kick(&self, queue: usize) -> io::Result<EventFd> {
        self.notify
            .get(queue)
            .ok_or_else(|| io::Error::other("no such queue"))?
            .try_clone()
    }

    fn call(&self, _queue: usize, _vector: u16) -> io::Result<EventFd> {
        self.irq.try_clone()
    }
}

impl BusDevice for VirtioMmioDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let st = self.state();
        if offset >= CONFIG_SPACE {
            st.core.device().read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(&st, offset).to_le_bytes());
        } else {
            // Registers are 32-bit only.
            data.fill(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut st = self.state();
        if offset >= CONFIG_SPACE {
            st.core
                .device_mut()
                .write_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_register(&mut st, offset, v);
        }
    }
}

impl VirtioTransport for VirtioMmioDevice {
    fn unplug(&self) {
        let mut st = self.state();
        let events = MmioQueueEvents {
            notify: &self.notify,
            irq: &self.irq,
        };
        st.core.write_status(0, &events);
        for (q, fd) in self.notify.iter().enumerate() {
            let _ = self
                .vm
                .unregister_ioevent(fd, self.base + REG_QUEUE_NOTIFY, Some(q as u32));
        }
        let _ = self.vm.unregister_irqfd(&self.irq, self.gsi);
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
    use crate::virtio::core::tests::{FakeDevice, Log};
    use crate::virtio::{
        STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
        STATUS_FEATURES_OK,
    };
    use crate::vm_ops::fake::FakeVmOps;
    use std::os::fd::AsRawFd;

    const BASE: u64 = 0xf000_0000;

    fn dev(queues: usize) -> (VirtioMmioDevice, Arc<FakeVmOps>, Arc<Mutex<Log>>) {
        let (fake, log) = FakeDevice::new(queues);
        let vm = Arc::new(FakeVmOps::default());
        let d = VirtioMmioDevice::new("disk0", Box::new(fake), BASE, 16, vm.clone()).unwrap();
        (d, vm, log)
    }

    fn r(d: &VirtioMmioDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(d: &VirtioMmioDevice, off: u64, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identity() {
        let (d, vm, _) = dev(2);
        assert_eq!(r(&d, REG_MAGIC), MAGIC);
        assert_eq!(r(&d, REG_VERSION), 2);
        assert_eq!(r(&d, REG_DEVICE_ID), 2);
        assert_eq!(r(&d, REG_SHM_LEN_LOW), u32::MAX);
        // Narrow register reads are not allowed.
        let mut b = [0u8; 2];
        d.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        // Config space: any width.
        d.read(CONFIG_SPACE + 1, &mut b);
        assert_eq!(b, [0xc1, 0xc2]);
        let s = vm.state();
        assert!(s.irqfds.contains(&(d.irq.as_raw_fd(), 16)));
        let fds: Vec<_> = d.notify.iter().map(|e| e.as_raw_fd()).collect();
        assert!(s.ioevents.contains(&(fds[0], BASE + 0x50, Some(0))));
        assert!(s.ioevents.contains(&(fds[1], BASE + 0x50, Some(1))));
    }

    #[test]
    fn setup_activate_interrupt_status_and_reset() {
        let (d, _, log) = dev(2);
        w(
            &d,
            REG_STATUS,
            u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
        );
        w(&d, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&d, REG_DEVICE_FEATURES), 1);
        w(&d, REG_DRIVER_FEATURES_SEL, 1);
        w(&d, REG_DRIVER_FEATURES, 1);
        let s = u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        w(&d, REG_STATUS, s);
        assert_eq!(r(&d, REG_STATUS), s);
        w(&d, REG_QUEUE_SEL, 0);
        assert_eq!(r(&d, REG_QUEUE_NUM_MAX), 256);
        assert_eq!(r(&d, REG_QUEUE_READY), 0);
        w(&d, REG_QUEUE_NUM, 32);
        w(&d, REG_QUEUE_DESC_LOW, 0x1000);
        w(&d, REG_QUEUE_DESC_HIGH, 1);
        w(&d, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(&d, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(&d, REG_QUEUE_READY, 1);
        assert_eq!(r(&d, REG_QUEUE_DESC_HIGH), 1);
        w(&d, REG_QUEUE_SEL, 2);
        assert_eq!(r(&d, REG_QUEUE_NUM_MAX), 0, "no queue 2");
        assert_eq!(r(&d, REG_INTERRUPT_STATUS), 0);
        w(&d, REG_STATUS, s | u32::from(STATUS_DRIVER_OK));
        assert_eq!(
            log.lock().unwrap().activations,
            vec![(1 << 32, vec![(0, 32, 0x1_0000_1000, 0x2000, 0x3000)])]
        );
        // Active: the used-buffer bit always reads set, and an ACK does not clear it.
        assert_eq!(r(&d, REG_INTERRUPT_STATUS), INTERRUPT_VRING);
        w(&d, REG_INTERRUPT_ACK, INTERRUPT_VRING);
        assert_eq!(r(&d, REG_INTERRUPT_STATUS), INTERRUPT_VRING);
        w(&d, REG_STATUS, 0);
        assert_eq!(r(&d, REG_STATUS), 0);
        assert_eq!(r(&d, REG_INTERRUPT_STATUS), 0);
        assert_eq!(log.lock().unwrap().resets, 1);
    }

    #[test]
    fn backend_loss_raises_a_config_interrupt_until_acked() {
        let (d, _, _) = dev(1);
        d.backend_lost();
        assert_ne!(r(&d, REG_STATUS) as u8 & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(d.irq.read().unwrap(), 1);
        assert_eq!(r(&d, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG);
        w(&d, REG_INTERRUPT_ACK, INTERRUPT_CONFIG);
        assert_eq!(r(&d, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn out_of_range_queue_registers_do_not_alias() {
        let (d, _, log) = dev(1);
        w(&d, REG_QUEUE_SEL, 0x1_0000);
        assert_eq!(r(&d, REG_QUEUE_NUM_MAX), 0, "queue 0x10000 is not queue 0");
        w(&d, REG_QUEUE_SEL, 0);
        w(&d, REG_QUEUE_NUM, 0x1_0040);
        w(&d, REG_QUEUE_READY, 1);
        let s = u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        w(&d, REG_DRIVER_FEATURES_SEL, 1);
        w(&d, REG_DRIVER_FEATURES, 1);
        w(&d, REG_STATUS, s);
        w(&d, REG_STATUS, s | u32::from(STATUS_DRIVER_OK));
        // Not a queue of 64: the start is refused.
        assert!(log.lock().unwrap().activations.is_empty());
        assert_ne!(r(&d, REG_STATUS) as u8 & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn stray_notify_is_delivered() {
        let (d, _, _) = dev(2);
        w(&d, REG_QUEUE_NOTIFY, 1);
        assert_eq!(d.notify[1].read().unwrap(), 1);
        w(&d, REG_QUEUE_NOTIFY, 9);
    }
}

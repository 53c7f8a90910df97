//! The KVM operations devices use while the VM runs: GSI routes for MSI vectors, irqfds and
//! ioeventfds. A trait, so the PCI and MMIO transports are unit-tested without /dev/kvm.
//!
//! KVM's `KVM_SET_GSI_ROUTING` replaces the whole table, so [`KvmVmOps`] keeps every route: the
//! PC routes [`crate::irqchip`] installs first, plus one MSI route per allocated GSI.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

use crate::irqchip::{self, IOAPIC_PINS};

/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: usize = 4096;

#[derive(Debug, Error)]
pub enum VmOpsError {
    #[error("no free GSI for an MSI vector")]
    GsisExhausted,
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot build the interrupt routing table")]
    RoutingTable(#[source] vmm_sys_util::fam::Error),
}

/// What devices ask of KVM after start-up.
pub trait VmOps: Send + Sync {
    /// A GSI of its own for an MSI vector.
    fn allocate_gsi(&self) -> Result<u32, VmOpsError>;
    /// Gives `gsi` back, with its route (a device was removed).
    fn free_gsi(&self, gsi: u32);
    /// How many GSIs are allocated.
    fn gsis_in_use(&self) -> usize;
    /// Points `gsi` at an MSI message.
    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), VmOpsError>;
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmOpsError>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmOpsError>;
    /// Guest writes to `addr` signal `fd` inside KVM, without an exit: any write
    /// (`datamatch` None), or only 32-bit writes of that value (the MMIO transport's single
    /// notify register, one eventfd per queue index).
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), VmOpsError>;
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), VmOpsError>;
}

/// The full routing table: the PC routes and the MSI routes.
struct RouteTable {
    legacy: Vec<kvm_irq_routing_entry>,
    msi: BTreeMap<u32, (u64, u32)>,
    /// MSI GSIs, above the IOAPIC pins, as many as fit in KVM's table beside the PC routes;
    /// freed ones are handed out again (devices come and go).
    gsis: IdAllocator,
    in_use: usize,
}

impl RouteTable {
    fn new() -> Self {
        let legacy = irqchip::default_routes();
        let last = IOAPIC_PINS + (MAX_ROUTES - legacy.len()) as u32 - 1;
        RouteTable {
            legacy,
            msi: BTreeMap::new(),
            gsis: IdAllocator::new(IOAPIC_PINS, last)
                .expect("the PC routes are far fewer than KVM's limit"),
            in_use: 0,
        }
    }

    fn allocate(&mut self) -> Result<u32, VmOpsError> {
        let gsi = self
            .gsis
            .allocate_id()
            .map_err(|_| VmOpsError::GsisExhausted)?;
        self.in_use += 1;
        Ok(gsi)
    }

    fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut v = self.legacy.clone();
        v.extend(
            self.msi
                .iter()
                .map(|(&gsi, &(address, data))| msi_entry(gsi, address, data)),
        );
        v
    }
}

fn msi_entry(gsi: u32, address: u64, data: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: address as u32,
                address_hi: (address >> 32) as u32,
                data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

pub struct KvmVmOps {
    vm: Arc<VmFd>,
    routes: Mutex<RouteTable>,
}

impl KvmVmOps {
    /// `vm` must already have the PC routes of [`irqchip::setup`].
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmVmOps {
            vm,
            routes: Mutex::new(RouteTable::new()),
        }
    }
}

fn ioevent_address(addr: u64) -> IoEventAddress {
    IoEventAddress::Mmio(addr)
}

impl VmOps for KvmVmOps {
    fn allocate_gsi(&self) -> Result<u32, VmOpsError> {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()
    }

    fn free_gsi(&self, gsi: u32) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.msi.remove(&gsi).is_some() {
            // A stale route to a freed GSI is harmless (nothing signals it), so a failure to
            // shrink KVM's table is not worth more than keeping ours in step.
            if let Ok(table) = KvmIrqRouting::from_entries(&routes.entries()) {
                let _ = self.vm.set_gsi_routing(&table);
            }
        }
        if routes.gsis.free_id(gsi).is_ok() {
            routes.in_use -= 1;
        }
    }

    fn gsis_in_use(&self) -> usize {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).in_use
    }

    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), VmOpsError> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let old = routes.msi.insert(gsi, (address, data));
        let table =
            KvmIrqRouting::from_entries(&routes.entries()).map_err(VmOpsError::RoutingTable)?;
        if let Err(e) = self.vm.set_gsi_routing(&table) {
            // Keep our table equal to KVM's.
            match old {
                Some(o) => routes.msi.insert(gsi, o),
                None => routes.msi.remove(&gsi),
            };
            return Err(VmOpsError::Kvm("set the GSI routing table", e));
        }
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmOpsError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|e| VmOpsError::Kvm("register an irqfd", e))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmOpsError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(|e| VmOpsError::Kvm("unregister an irqfd", e))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), VmOpsError> {
        let a = ioevent_address(addr);
        match datamatch {
            Some(v) => self.vm.register_ioevent(fd, &a, v),
            None => self.vm.register_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(|e| VmOpsError::Kvm("register an ioeventfd", e))
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: Option<u32>,
    ) -> Result<(), VmOpsError> {
        let a = ioevent_address(addr);
        match datamatch {
            Some(v) => self.vm.unregister_ioevent(fd, &a, v),
            None => self.vm.unregister_ioevent(fd, &a, NoDatamatch),
        }
        .map_err(|e| VmOpsError::Kvm("unregister an ioeventfd", e))
    }
}

/// A [`VmOps`] that records what it is asked, for transport tests.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::collections::BTreeSet;
    use std::os::fd::AsRawFd;

    #[derive(Default)]
    pub struct State {
        pub next_gsi: u32,
        pub freed_gsis: Vec<u32>,
        pub routes: BTreeMap<u32, (u64, u32)>,
        /// (eventfd, gsi)
        pub irqfds: BTreeSet<(i32, u32)>,
        /// (eventfd, address, datamatch)
        pub ioevents: BTreeSet<(i32, u64, Option<u32>)>,
    }

    #[derive(Default)]
    pub struct FakeVmOps {
        pub state: Mutex<State>,
    }

    impl FakeVmOps {
        pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap()
        }
    }

    impl VmOps for FakeVmOps {
        fn allocate_gsi(&self) -> Result<u32, VmOpsError> {
            let mut s = self.state();
            let gsi = IOAPIC_PINS + s.next_gsi;
            s.next_gsi += 1;
            Ok(gsi)
        }
        fn free_gsi(&self, gsi: u32) {
            let mut s = self.state();
            s.routes.remove(&gsi);
            s.freed_gsis.push(gsi);
        }
        fn gsis_in_use(&self) -> usize {
            let s = self.state();
            s.next_gsi as usize - s.freed_gsis.len()
        }
        fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), VmOpsError> {
            self.state().routes.insert(gsi, (address, data));
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmOpsError> {
            // KVM refuses an eventfd that is already an irqfd.
            if !self.state().irqfds.insert((fd.as_raw_fd(), gsi)) {
                return Err(VmOpsError::Kvm(
                    "register an irqfd",
                    kvm_ioctls::Error::new(16),
                ));
            }
            Ok(())
        }
        fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), VmOpsError> {
            self.state().irqfds.remove(&(fd.as_raw_fd(), gsi));
            Ok(())
        }
        fn register_ioevent(
            &self,
            fd: &EventFd,
            addr: u64,
            datamatch: Option<u32>,
        ) -> Result<(), VmOpsError> {
            self.state()
                .ioevents
                .insert((fd.as_raw_fd(), addr, datamatch));
            Ok(())
        }
        fn unregister_ioevent(
            &self,
            fd: &EventFd,
            addr: u64,
            datamatch: Option<u32>,
        ) -> Result<(), VmOpsError> {
            self.state()
                .ioevents
                .remove(&(fd.as_raw_fd(), addr, datamatch));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keeps_pc_routes_and_adds_msi() {
        let mut t = RouteTable::new();
        let pc = t.entries().len();
        let a = t.allocate().unwrap();
        let b = t.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        t.msi.insert(b, (0xfee0_0000, 0x4041));
        let e = t.entries();
        assert_eq!(e.len(), pc + 1);
        let last = e.last().unwrap();
        assert_eq!((last.gsi, last.type_), (25, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry we built.
        let msi = unsafe { last.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_0000, 0, 0x4041)
        );
    }

    #[test]
    fn gsis_run_out() {
        let mut t = RouteTable::new();
        let n = (0..10_000).take_while(|_| t.allocate().is_ok()).count();
        assert_eq!(n + t.legacy.len(), MAX_ROUTES);
    }
}

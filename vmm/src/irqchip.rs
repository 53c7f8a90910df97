//! KVM's in-kernel interrupt controllers (dual 8259 PIC, IOAPIC, per-vCPU LAPIC) and PIT, and
//! the GSI routing that matches what our MADT tells the guest.

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_pit_config, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use thiserror::Error;

/// IOAPIC input pins KVM's IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;

#[derive(Debug, Error)]
pub enum IrqchipError {
    #[error("cannot create the in-kernel interrupt controllers")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    #[error("cannot set up interrupt routing")]
    Routing(#[source] kvm_ioctls::Error),
    #[error("cannot build the interrupt routing table")]
    RoutingTable(#[source] vmm_sys_util::fam::Error),
}

fn route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

/// The PC routing: ISA IRQs 0-15 go to the 8259 pins of the same number (2 is the cascade),
/// and to the IOAPIC pin of the same number except IRQ0 (the PIT), which is wired to pin 2 —
/// the "IRQ0 -> GSI2" interrupt source override in the MADT. GSIs 16-23 are IOAPIC-only.
///
/// KVM's default table wires IRQ0 to IOAPIC pin 0, which would contradict the override.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity(40);
    for irq in 0..16 {
        if irq == 2 {
            continue;
        }
        let (chip, pin) = if irq < 8 {
            (KVM_IRQCHIP_PIC_MASTER, irq)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
        };
        routes.push(route(irq, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => routes.push(route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => routes.push(route(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    routes
}

pub fn setup(vm: &VmFd) -> Result<(), IrqchipError> {
    vm.create_irq_chip().map_err(IrqchipError::Create)?;
    let routing =
        KvmIrqRouting::from_entries(&default_routes()).map_err(IrqchipError::RoutingTable)?;
    vm.set_gsi_routing(&routing)
        .map_err(IrqchipError::Routing)?;
    // The PC speaker port is handled in the kernel as a dummy, so probing it costs no exits.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(IrqchipError::Pit)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(gsi: u32) -> Vec<(u32, u32)> {
        default_routes()
            .iter()
            .filter(|r| r.gsi == gsi)
            // SAFETY: every entry we build is an irqchip route.
            .map(|r| unsafe { (r.u.irqchip.irqchip, r.u.irqchip.pin) })
            .collect()
    }

    #[test]
    fn pc_routing() {
        assert_eq!(
            targets(0),
            vec![(KVM_IRQCHIP_PIC_MASTER, 0), (KVM_IRQCHIP_IOAPIC, 2)]
        );
        assert_eq!(targets(2), vec![]);
        assert_eq!(
            targets(4),
            vec![(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
        assert_eq!(
            targets(9),
            vec![(KVM_IRQCHIP_PIC_SLAVE, 1), (KVM_IRQCHIP_IOAPIC, 9)]
        );
        assert_eq!(targets(20), vec![(KVM_IRQCHIP_IOAPIC, 20)]);
    }
}

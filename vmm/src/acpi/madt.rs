//! MADT: one local APIC per vCPU, the IOAPIC, and the ISA interrupt overrides the in-kernel
//! irqchip routing implements (see [`crate::irqchip`]).
//!
//! Written by hand on an [`Sdt`] because acpi_tables' MADT builder has no interrupt source
//! override or NMI entries and cannot set the PC-AT-compatible flag.

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout::{APIC_START, IOAPIC_START};

const MADT_REVISION: u8 = 5;
/// The system also has dual 8259s (KVM's in-kernel PIC), which Linux must mask.
const PCAT_COMPAT: u32 = 1;

const TYPE_LOCAL_APIC: u8 = 0;
const TYPE_IO_APIC: u8 = 1;
const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;

const LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags: polarity bits 1:0, trigger mode bits 3:2.
const INTI_ACTIVE_HIGH: u16 = 0b01;
const INTI_LEVEL: u16 = 0b11 << 2;
/// Conforms to the bus (ISA: edge, active high).
const INTI_CONFORMS: u16 = 0;

pub const IOAPIC_ID: u8 = 0;

fn local_apic(uid: u8, apic_id: u8) -> [u8; 8] {
    let f = LAPIC_ENABLED.to_le_bytes();
    [TYPE_LOCAL_APIC, 8, uid, apic_id, f[0], f[1], f[2], f[3]]
}

fn io_apic(id: u8, addr: u32, gsi_base: u32) -> [u8; 12] {
    let mut e = [0u8; 12];
    e[..4].copy_from_slice(&[TYPE_IO_APIC, 12, id, 0]);
    e[4..8].copy_from_slice(&addr.to_le_bytes());
    e[8..12].copy_from_slice(&gsi_base.to_le_bytes());
    e
}

fn source_override(irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut e = [0u8; 10];
    // Bus 0 = ISA.
    e[..4].copy_from_slice(&[TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, 0, irq]);
    e[4..8].copy_from_slice(&gsi.to_le_bytes());
    e[8..10].copy_from_slice(&flags.to_le_bytes());
    e
}

/// LINT1 of every processor (UID 0xff) is the NMI input.
fn local_apic_nmi() -> [u8; 6] {
    [TYPE_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]
}

pub fn build(vcpus: usize) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, PCAT_COMPAT);
    let mut body = Vec::with_capacity(vcpus * 8 + 12 + 20 + 6);
    for cpu in 0..vcpus {
        // APIC ID = ACPI processor UID = vCPU index; the CPUID topology says the same.
        body.extend_from_slice(&local_apic(cpu as u8, cpu as u8));
    }
    body.extend_from_slice(&io_apic(IOAPIC_ID, IOAPIC_START as u32, 0));
    // The PIT's IRQ0 arrives on IOAPIC pin 2, as on every PC since the 8259 cascade.
    body.extend_from_slice(&source_override(0, 2, INTI_CONFORMS));
    // IRQ9 is the ACPI SCI line on PCs: level-triggered, active high.
    body.extend_from_slice(&source_override(9, 9, INTI_ACTIVE_HIGH | INTI_LEVEL));
    body.extend_from_slice(&local_apic_nmi());
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits the entries after the 44-byte header into (type, bytes).
    fn entries(t: &[u8]) -> Vec<(u8, &[u8])> {
        let mut v = Vec::new();
        let mut off = 44;
        while off < t.len() {
            let len = t[off + 1] as usize;
            v.push((t[off], &t[off..off + len]));
            off += len;
        }
        assert_eq!(off, t.len());
        v
    }

    #[test]
    fn entries_for_two_vcpus() {
        let t = build(2);
        assert_eq!(&t[..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        let e = entries(&t);
        let types: Vec<u8> = e.iter().map(|(ty, _)| *ty).collect();
        assert_eq!(types, vec![0, 0, 1, 2, 2, 4]);
        assert_eq!(e[1].1, &[0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(&e[2].1[4..8], &0xfec0_0000u32.to_le_bytes());
        assert_eq!(e[3].1, &[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(e[4].1, &[2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]);
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    }
}

//! Initial register state of the boot vCPU for each protocol, the FPU, and the local APIC's
//! LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::boot::BootEntry;
use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER};
use crate::memory::GuestMemoryMmap;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set; interrupts start disabled.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// GDT slots. Linux's boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18; PVH accepts
/// any flat selectors, so both protocols share the layout.
const GDT_CODE: usize = 2;
const GDT_DATA: usize = 3;
const GDT_TSS: usize = 4;

/// Segment descriptor flags (access byte in 7:0, G/DB/L/AVL in 15:12).
const CODE64_FLAGS: u16 = 0xa09b; // G, L, present, DPL0, code exec/read, accessed
const CODE32_FLAGS: u16 = 0xc09b; // G, D, present, DPL0, code exec/read, accessed
const DATA_FLAGS: u16 = 0xc093; // G, B, present, DPL0, data read/write, accessed
const TSS_FLAGS: u16 = 0x008b; // present, 32-bit TSS (busy); byte-granular

/// Encodes a segment descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The cached part of a segment register as KVM wants it, decoded from a descriptor.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Descriptors in the boot GDT: null, unused, code, data, TSS.
const GDT_ENTRIES: usize = GDT_TSS + 1;
const _: () = assert!(BOOT_GDT_START + (GDT_ENTRIES * 8) as u64 <= BOOT_IDT_START);

fn gdt(long_mode: bool) -> [u64; GDT_ENTRIES] {
    let code = if long_mode {
        CODE64_FLAGS
    } else {
        CODE32_FLAGS
    };
    [
        0,
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0x67),
    ]
}

/// General-purpose registers for the boot vCPU.
pub fn boot_regs(entry: &BootEntry) -> kvm_regs {
    match *entry {
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        BootEntry::Linux64 {
            entry, boot_params, ..
        } => kvm_regs {
            rip: entry,
            rsi: boot_params,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    }
}

/// Writes the GDT and an empty IDT to guest memory and fills in segment and control
/// registers. `sregs` should come from KVM (it carries the APIC base).
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    entry: &BootEntry,
    sregs: &mut kvm_sregs,
) -> Result<(), GuestMemoryError> {
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    let table = gdt(long_mode);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + (i * 8) as u64))?;
    }
    // An empty IDT: any exception before the kernel installs its own is a triple fault,
    // which we report, rather than a jump through garbage.
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let data = segment_from_gdt(table[GDT_DATA], GDT_DATA);
    sregs.cs = segment_from_gdt(table[GDT_CODE], GDT_CODE);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(table[GDT_TSS], GDT_TSS);

    match *entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { cr3, .. } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = cr3;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// x87 control word and MXCSR at their power-on defaults (all exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *b as _;
    }
}

/// Virtual-wire mode on the BSP: LINT0 delivers the 8259's ExtINT, LINT1 is NMI, as the MP
/// spec (and the MADT's LAPIC NMI entry) describe.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let with_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lint0 = lapic_reg(state, APIC_LVT_LINT0);
    set_lapic_reg(state, APIC_LVT_LINT0, with_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic_reg(state, APIC_LVT_LINT1);
    set_lapic_reg(state, APIC_LVT_LINT1, with_mode(lint1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip() {
        let code = segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), GDT_CODE);
        assert_eq!(code.selector, 0x10);
        assert_eq!(
            (code.l, code.db, code.g, code.s, code.present),
            (1, 0, 1, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let code32 = segment_from_gdt(gdt_entry(CODE32_FLAGS, 0, 0xfffff), GDT_CODE);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment_from_gdt(gdt_entry(DATA_FLAGS, 0, 0xfffff), GDT_DATA);
        assert_eq!(data.selector, 0x18);
        assert_eq!(data.type_, 0x3);
        let tss = segment_from_gdt(gdt_entry(TSS_FLAGS, 0, 0x67), GDT_TSS);
        assert_eq!((tss.type_, tss.limit, tss.s, tss.g), (0xb, 0x67, 0, 0));
        let base = segment_from_gdt(gdt_entry(DATA_FLAGS, 0x1234_5678, 0xfffff), 1);
        assert_eq!(base.base, 0x1234_5678);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn known_encodings() {
        // Reference values used by Firecracker's and the kernel's own boot GDTs.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn regs_per_protocol() {
        let pvh = boot_regs(&BootEntry::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        });
        assert_eq!((pvh.rip, pvh.rbx, pvh.rflags), (0x100_0000, 0x6000, 2));
        let lin = boot_regs(&BootEntry::Linux64 {
            entry: 0x10_0200,
            boot_params: 0x7000,
            cr3: 0x9000,
        });
        assert_eq!((lin.rip, lin.rsi, lin.rsp), (0x10_0200, 0x7000, 0x8ff0));
    }

    #[test]
    fn idt_does_not_overwrite_the_gdt() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let entry = BootEntry::Linux64 {
            entry: 0x10_0200,
            boot_params: 0x7000,
            cr3: 0x9000,
        };
        let mut sregs = kvm_sregs::default();
        boot_sregs(&mem, &entry, &mut sregs).unwrap();
        let table = gdt(true);
        for (i, e) in table.iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(sregs.gdt.base + (i * 8) as u64))
                .unwrap();
            assert_eq!(got, *e, "GDT entry {i}");
        }
        assert!(sregs.gdt.base + u64::from(sregs.gdt.limit) < sregs.idt.base);
        assert_eq!(sregs.tr.selector, 0x20);
    }

    #[test]
    fn lint_modes() {
        let mut s = kvm_lapic_state::default();
        set_lapic_reg(&mut s, APIC_LVT_LINT0, 0x1_0000);
        set_lint(&mut s);
        assert_eq!(lapic_reg(&s, APIC_LVT_LINT0), 0x1_0700);
        assert_eq!(lapic_reg(&s, APIC_LVT_LINT1), 0x400);
    }
}

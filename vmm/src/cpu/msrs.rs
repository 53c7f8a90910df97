//! The MSRs every vCPU starts with (the list Firecracker and Cloud Hypervisor use): syscall
//! entry points cleared, TSC at 0, fast strings on, MTRRs enabled with write-back default.

use kvm_bindings::{kvm_msr_entry, Msrs};

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITE_BACK: u64 = 6;

pub fn boot_msr_entries() -> [kvm_msr_entry; 11] {
    let e = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    [
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
}

pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    Msrs::from_entries(&boot_msr_entries())
}

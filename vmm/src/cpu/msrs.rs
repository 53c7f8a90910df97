//! The MSRs every vCPU starts with (the list Firecracker and Cloud Hypervisor use): syscall
//! entry points cleared, TSC at 0, MTRRs enabled with write-back default, and fast strings on
//! top of KVM's own MISC_ENABLE (see [`misc_enable`]).

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
pub const MISC_ENABLE_BTS_UNAVAIL: u64 = 1 << 11;
pub const MISC_ENABLE_PEBS_UNAVAIL: u64 = 1 << 12;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITE_BACK: u64 = 6;

/// MISC_ENABLE for the guest: KVM's value with fast strings turned on.
///
/// KVM resets the register with BTS_UNAVAIL and PEBS_UNAVAIL set and clears PEBS_UNAVAIL when
/// it virtualizes PEBS (Intel, after KVM_SET_CPUID2); the guest's perf driver reads those bits,
/// so they must be kept rather than overwritten.
pub fn misc_enable(kvm_value: u64) -> u64 {
    kvm_value | MISC_ENABLE_FAST_STRING
}

/// The fixed part of the list; MISC_ENABLE is read, modified and written per vCPU.
pub fn boot_msr_entries() -> [kvm_msr_entry; 10] {
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
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
}

pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    Msrs::from_entries(&boot_msr_entries())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misc_enable_keeps_kvms_bits() {
        let reset = MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL;
        assert_eq!(misc_enable(reset), reset | 1);
        // PEBS virtualized: KVM cleared PEBS_UNAVAIL, and it stays clear.
        assert_eq!(
            misc_enable(MISC_ENABLE_BTS_UNAVAIL),
            MISC_ENABLE_BTS_UNAVAIL | 1
        );
        assert!(boot_msr_entries()
            .iter()
            .all(|e| e.index != MSR_IA32_MISC_ENABLE));
    }
}

//! CPUID for each vCPU: what KVM supports on this host, patched so the guest sees a
//! hypervisor, KVM's paravirt leaves, and a consistent topology of one package with one
//! single-threaded core per vCPU, APIC ID = vCPU index.
//!
//! Topology is reported the way each vendor's guests read it: Intel guests use leaf 1, leaf 4
//! and the x2APIC leaves 0xB/0x1F; AMD guests use leaf 1, 0x80000001 (CmpLegacy), 0x80000008,
//! 0x8000001D and 0x8000001E (and 0xB on CPUs that have it).

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

const LEAF_VENDOR: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_INTEL: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_CACHE_AMD: u32 = 0x8000_001d;
const LEAF_TOPOLOGY_AMD: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const ECX_CMP_LEGACY: u32 = 1 << 1;
const EDX_PDPE1GB: u32 = 1 << 26;

/// x2APIC topology level types (leaf 0xB ECX[15:8]).
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(e) = find(entries, LEAF_VENDOR, 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&e.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&e.edx.to_le_bytes());
    id[8..].copy_from_slice(&e.ecx.to_le_bytes());
    match &id {
        // Centaur and Zhaoxin CPUs describe their caches and topology the way Intel's do.
        b"GenuineIntel" | b"CentaurHauls" | b"  Shanghai  " => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Whether the guest may use 1 GiB pages (our boot page tables use them only then).
pub fn has_1g_pages(entries: &[kvm_cpuid_entry2]) -> bool {
    find(entries, LEAF_EXT_FEATURES, 0).is_some_and(|e| e.edx & EDX_PDPE1GB != 0)
}

/// Bits needed to number `n` things: ceil(log2(n)).
fn id_bits(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

/// KVM emulates the LAPIC's TSC-deadline timer mode in the kernel but leaves the CPUID bit to
/// the VMM (KVM_CAP_TSC_DEADLINE_TIMER). Without it Linux programs the LAPIC timer in one-shot
/// mode, two register writes (two exits) per timer event instead of one MSR write.
pub fn enable_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        e.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Patches KVM's supported CPUID for vCPU `apic_id` of `vcpus`.
pub fn patch(entries: &mut Vec<kvm_cpuid_entry2>, apic_id: u32, vcpus: u32) {
    let vendor = vendor(entries);
    let max_basic = find(entries, LEAF_VENDOR, 0).map_or(0, |e| e.eax);
    // "Addressable IDs" fields describe APIC ID space, so they are powers of two.
    let id_space = vcpus.max(1).next_power_of_two();

    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (id_space.min(255) << 16) | (e.ebx & 0xffff);
                e.ecx |= ECX_HYPERVISOR;
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_INTEL if vendor == Vendor::Intel && e.eax & 0x1f != 0 => {
                // Cores per package - 1 in 31:26.
                e.eax = (e.eax & !(0x3f << 26)) | ((id_space - 1).min(0x3f) << 26);
                set_cache_sharing(&mut e.eax, id_space);
            }
            LEAF_HYPERVISOR => {
                e.eax = e.eax.max(LEAF_KVM_FEATURES);
                set_signature(e);
            }
            LEAF_EXT_FEATURES if vendor == Vendor::Amd => {
                if vcpus > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_ADDR_SIZES if vendor == Vendor::Amd => {
                // ApicIdSize in 15:12, NC (cores - 1) in 7:0; keep the rest (PerfTscSize...).
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(vcpus) << 12) | ((vcpus - 1) & 0xff);
            }
            LEAF_CACHE_AMD if vendor == Vendor::Amd && e.eax & 0x1f != 0 => {
                set_cache_sharing(&mut e.eax, id_space);
            }
            LEAF_TOPOLOGY_AMD if vendor == Vendor::Amd => {
                // Extended APIC ID; core ID with one thread per core; one node.
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | (apic_id & 0xff);
                e.ecx &= !0x7ff;
            }
            _ => {}
        }
    }

    if !entries.iter().any(|e| e.function == LEAF_HYPERVISOR) {
        let mut e = kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: LEAF_KVM_FEATURES,
            ..Default::default()
        };
        set_signature(&mut e);
        entries.push(e);
    }

    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if max_basic >= leaf && entries.iter().any(|e| e.function == leaf) {
            entries.retain(|e| e.function != leaf);
            entries.extend(x2apic_topology(leaf, apic_id, vcpus));
        }
    }
}

/// Cache descriptor EAX (leaf 4 and 0x8000001D share the layout: type in 4:0, level in 7:5,
/// logical processors sharing the cache - 1 in 25:14). With one thread per core, L1 and L2 are
/// private to a vCPU; L3 and beyond are shared by the whole package (`id_space` APIC IDs).
fn set_cache_sharing(eax: &mut u32, id_space: u32) {
    let level = (*eax >> 5) & 0x7;
    let sharing = if level >= 3 { id_space - 1 } else { 0 };
    *eax = (*eax & !(0xfff << 14)) | (sharing.min(0xfff) << 14);
}

fn set_signature(e: &mut kvm_cpuid_entry2) {
    let word = |i: usize| {
        u32::from_le_bytes([
            KVM_SIGNATURE[i],
            KVM_SIGNATURE[i + 1],
            KVM_SIGNATURE[i + 2],
            KVM_SIGNATURE[i + 3],
        ])
    };
    e.ebx = word(0);
    e.ecx = word(4);
    e.edx = word(8);
}

/// Leaf 0xB/0x1F subleaves: SMT level (1 thread per core), core level (all vCPUs), end.
fn x2apic_topology(leaf: u32, apic_id: u32, vcpus: u32) -> [kvm_cpuid_entry2; 3] {
    let sub = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        sub(0, 0, 1, LEVEL_SMT),
        sub(1, id_bits(vcpus), vcpus, LEVEL_CORE),
        sub(2, 0, 0, LEVEL_INVALID),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn vendor_leaf(id: &[u8; 12], max: u32) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes(id[i..i + 4].try_into().unwrap());
        entry(0, 0, max, w(0), w(8), w(4))
    }

    fn get(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *find(entries, f, i).unwrap()
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor_leaf(b"GenuineIntel", 0x1f),
            entry(1, 0, 0x906ea, 0x0010_0800, 0x7ffa_fbff, 0xbfeb_fbff),
            // L1d, L2, L3 descriptors (type in 4:0, level in 7:5).
            entry(4, 0, (1 << 5) | 1 | (7 << 26), 0, 0, 0),
            entry(4, 1, (2 << 5) | 3 | (7 << 26) | (1 << 14), 0, 0, 0),
            entry(4, 2, (3 << 5) | 3 | (7 << 26) | (15 << 14), 0, 0, 0),
            entry(4, 3, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 6),
            entry(0xb, 1, 4, 8, 0x201, 6),
            entry(0x4000_0000, 0, 0x4000_0001, 0, 0, 0),
        ]
    }

    fn amd() -> Vec<kvm_cpuid_entry2> {
        vec![
            vendor_leaf(b"AuthenticAMD", 0x10),
            entry(1, 0, 0x830f10, 0x0010_0800, 0x7ed8_320b, 0x178b_fbff),
            entry(0x8000_0001, 0, 0, 0, 0x75c2_37ff, 0x2fd3_fbff),
            entry(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
            entry(0x8000_001d, 0, (1 << 5) | 1 | (1 << 14), 0, 0, 0),
            entry(0x8000_001d, 3, (3 << 5) | 3 | (15 << 14), 0, 0, 0),
            entry(0x8000_001e, 0, 4, 0x0102, 0x0300, 0),
        ]
    }

    #[test]
    fn tsc_deadline_bit() {
        let mut e = intel();
        enable_tsc_deadline(&mut e);
        assert_ne!(get(&e, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn detects_vendor() {
        assert_eq!(vendor(&intel()), Vendor::Intel);
        assert_eq!(vendor(&amd()), Vendor::Amd);
        assert_eq!(vendor(&[vendor_leaf(b"HygonGenuine", 0xd)]), Vendor::Amd);
        assert_eq!(vendor(&[vendor_leaf(b"CentaurHauls", 0xd)]), Vendor::Intel);
        assert_eq!(vendor(&[vendor_leaf(b"  Shanghai  ", 0xd)]), Vendor::Intel);
        assert_eq!(vendor(&[vendor_leaf(b"VIA VIA VIA ", 0xd)]), Vendor::Other);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn zhaoxin_gets_intel_cache_topology() {
        let mut e = intel();
        e[0] = vendor_leaf(b"  Shanghai  ", 0x1f);
        patch(&mut e, 0, 4);
        assert_eq!(get(&e, 4, 0).eax >> 26, 3);
        assert_eq!((get(&e, 4, 2).eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn intel_topology() {
        let mut e = intel();
        patch(&mut e, 2, 3);
        let l1 = get(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "addressable IDs");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        // Leaf 4: cores per package - 1 = 3; L1/L2 private, L3 shared by all.
        assert_eq!(get(&e, 4, 0).eax >> 26, 3);
        assert_eq!((get(&e, 4, 1).eax >> 14) & 0xfff, 0);
        assert_eq!((get(&e, 4, 2).eax >> 14) & 0xfff, 3);
        assert_eq!(get(&e, 4, 3).eax, 0, "terminator untouched");
        // Leaf 0xB: SMT level with 1 thread, core level with 3 vCPUs, then the end.
        let smt = get(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = get(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        assert_eq!(get(&e, 0xb, 2).ecx, 2);
        assert_eq!(e.iter().filter(|x| x.function == 0xb).count(), 3);
        let kvm = get(&e, 0x4000_0000, 0);
        let mut sig = Vec::new();
        for r in [kvm.ebx, kvm.ecx, kvm.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn amd_topology() {
        let mut e = amd();
        patch(&mut e, 1, 2);
        assert_eq!(get(&e, 1, 0).ebx >> 24, 1);
        assert_ne!(get(&e, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        let sizes = get(&e, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 1, "NC = cores - 1");
        assert_eq!((sizes.ecx >> 12) & 0xf, 1, "ApicIdSize");
        assert_eq!(sizes.eax, 0x3030, "address sizes kept");
        assert_eq!((get(&e, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((get(&e, 0x8000_001d, 3).eax >> 14) & 0xfff, 1);
        let topo = get(&e, 0x8000_001e, 0);
        assert_eq!(topo.eax, 1);
        assert_eq!(topo.ebx & 0xffff, 1, "core 1, one thread per core");
        assert_eq!(topo.ecx & 0x7ff, 0);
        // Leaf 0xB absent (max basic leaf 0x10): not invented.
        assert!(e.iter().all(|x| x.function != 0xb));
        // KVM leaf added when missing.
        assert!(find(&e, 0x4000_0000, 0).is_some());
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut e = amd();
        patch(&mut e, 0, 1);
        assert_eq!(get(&e, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(get(&e, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(get(&e, 0x8000_0008, 0).ecx & 0xf0ff, 0);
    }

    #[test]
    fn pdpe1gb() {
        assert!(has_1g_pages(&amd()));
        assert!(!has_1g_pages(&intel()));
    }
}

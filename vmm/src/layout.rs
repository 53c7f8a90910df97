//! The guest-physical address map: where RAM, boot structures, ACPI tables and the MMIO hole
//! live. One place, so boot code, ACPI, e820 and (later) PCI agree.
//!
//! ```text
//! 0x0000_0000  RAM (real-mode area; boot structures below)
//!   0x500        GDT            0x530  IDT
//!   0x6000       PVH hvm_start_info + module list
//!   0x7000       PVH memory map / bzImage zero page (boot_params)
//!   0x8ff0       initial stack (bzImage)
//!   0x9000       PML4, then PDPT, then 4 PDs (bzImage identity map of the first 4 GiB)
//!   0x20000      kernel command line
//! 0x000a_0000  legacy VGA/BIOS area, reserved in e820
//!   0xe0000      ACPI: RSDP, then the other tables
//! 0x0010_0000  RAM: the kernel is loaded at 1 MiB or above; the initramfs at the top of low RAM
//! min(size,3G) end of low RAM
//! 0xc000_0000  32-bit MMIO hole:
//!   0xc000_0000  32-bit PCI MMIO window (BARs), 512 MiB
//!   0xe000_0000  PCIe ECAM (bus 0 uses its first 1 MiB)
//!   0xf000_0000  virtio-mmio devices, one 4 KiB slot each (512-byte register window)
//!   0xfec0_0000  IOAPIC        0xfee0_0000  LAPIC
//! 0x1_0000_0000 the rest of RAM, if any
//! after RAM    64-bit PCI MMIO window (BARs), 1 GiB aligned
//! ```

use vm_memory::GuestAddress;

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x530;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x7000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Room reserved for the command line (up to the EBDA/VGA area is far more than any kernel
/// accepts; Linux's limit is 2 KiB on x86 unless rebuilt).
pub const CMDLINE_MAX_SIZE: u64 = 0x10000;

/// End of usable low RAM below 1 MiB: the legacy VGA/BIOS area starts here.
pub const EBDA_START: u64 = 0xa0000;
/// Start of the BIOS area where guests scan for the RSDP; ACPI tables live here.
pub const ACPI_START: u64 = 0xe0000;
pub const RSDP_START: u64 = ACPI_START;
/// End of the legacy area (exclusive) = start of high RAM.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: guest RAM stops here and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// 32-bit PCI MMIO window, for BARs.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// PCIe ECAM: room for 256 buses x 32 devices x 8 functions x 4 KiB. We have one bus, so only
/// its first [`PCI_ECAM_BUS_SIZE`] bytes are decoded, reserved in e820 and announced in MCFG.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// One bus's worth of ECAM: 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_BUS_SIZE: u64 = 0x10_0000;
/// virtio-mmio devices: slot `n` is at `VIRTIO_MMIO_START + n * VIRTIO_MMIO_STRIDE`, decodes
/// [`VIRTIO_MMIO_SIZE`] bytes and raises IOAPIC pin `VIRTIO_MMIO_GSI_BASE + n`.
pub const VIRTIO_MMIO_START: u64 = 0xf000_0000;
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// The ACPI hot-plug registers ([`crate::devices::acpi_hotplug`]), after the virtio-mmio
/// slots.
pub const ACPI_HOTPLUG_START: u64 = 0xf001_0000;
/// The Generic Event Device's interrupt: an ISA pin nothing else uses (COM1 has 4).
pub const ACPI_GED_GSI: u32 = 5;
/// GSIs 16-23 are the IOAPIC pins no ISA device uses.
pub const VIRTIO_MMIO_GSI_BASE: u32 = 16;
pub const VIRTIO_MMIO_SLOTS: u32 = 8;
/// The 64-bit PCI window starts at the first 1 GiB boundary after RAM and is this large: far
/// more than any BAR set we create, far below any CPU's physical address width.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
pub const PCI_MMIO64_SIZE: u64 = 16 << 30;
/// KVM's TSS and identity-map pages (needed on Intel hosts); inside the hole, not in RAM.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Where virtio-mmio device number `n` lives and which IOAPIC pin it raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub gsi: u32,
}

impl VirtioMmioSlot {
    pub fn new(n: u32) -> Option<Self> {
        (n < VIRTIO_MMIO_SLOTS).then(|| VirtioMmioSlot {
            base: VIRTIO_MMIO_START + u64::from(n) * VIRTIO_MMIO_STRIDE,
            gsi: VIRTIO_MMIO_GSI_BASE + n,
        })
    }

    /// Its number `n`.
    pub fn index(&self) -> u32 {
        self.gsi - VIRTIO_MMIO_GSI_BASE
    }
}

/// How guest RAM is split around the MMIO hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamLayout {
    /// Bytes of RAM from 0 (at most [`MMIO_HOLE_START`]).
    pub low_size: u64,
    /// Bytes of RAM from 4 GiB.
    pub high_size: u64,
}

/// One contiguous piece of guest RAM and where it sits in the backing memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub guest_addr: GuestAddress,
    pub size: u64,
    pub file_offset: u64,
}

impl RamLayout {
    pub fn new(size: u64) -> Self {
        let low_size = size.min(MMIO_HOLE_START);
        RamLayout {
            low_size,
            high_size: size - low_size,
        }
    }

    /// Regions in guest-address order; they share one memfd at consecutive offsets.
    pub fn regions(&self) -> impl Iterator<Item = RamRegion> {
        let low = RamRegion {
            guest_addr: GuestAddress(0),
            size: self.low_size,
            file_offset: 0,
        };
        let high = RamRegion {
            guest_addr: GuestAddress(MMIO_HOLE_END),
            size: self.high_size,
            file_offset: self.low_size,
        };
        std::iter::once(low).chain((self.high_size > 0).then_some(high))
    }

    /// First address past low RAM; boot payloads that need 32-bit addresses go below it.
    pub fn low_end(&self) -> u64 {
        self.low_size
    }

    pub fn total(&self) -> u64 {
        self.low_size + self.high_size
    }

    /// The 64-bit PCI MMIO window `(start, size)`: above everything RAM uses, and at least
    /// at 4 GiB so it never overlaps the 32-bit hole.
    pub fn pci_mmio64_window(&self) -> (u64, u64) {
        let ram_end = MMIO_HOLE_END + self.high_size;
        (ram_end.next_multiple_of(PCI_MMIO64_ALIGN), PCI_MMIO64_SIZE)
    }
}

// The fixed areas must not overlap; checked at compile time.
const _: () = {
    // The boot GDT has 5 descriptors (cpu::regs); the IDT is one.
    assert!(BOOT_GDT_START + 5 * 8 <= BOOT_IDT_START);
    assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
    assert!(PVH_MODLIST_START + 32 <= PVH_MEMMAP_START);
    assert!(PD_START + 4 * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE <= EBDA_START);
    assert!(PCI_MMIO_START + PCI_MMIO_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= VIRTIO_MMIO_START);
    assert!(PCI_ECAM_BUS_SIZE <= PCI_ECAM_SIZE);
    assert!(VIRTIO_MMIO_SIZE <= VIRTIO_MMIO_STRIDE);
    assert!(VIRTIO_MMIO_START + VIRTIO_MMIO_SLOTS as u64 * VIRTIO_MMIO_STRIDE <= IOAPIC_START);
    assert!(VIRTIO_MMIO_GSI_BASE + VIRTIO_MMIO_SLOTS <= crate::irqchip::IOAPIC_PINS);
    assert!(IOAPIC_START + 0x1000 <= APIC_START);
    assert!(APIC_START + 0x1000 <= KVM_IDENTITY_MAP_START);
    assert!(KVM_IDENTITY_MAP_START + 0x1000 == KVM_TSS_START);
    assert!(KVM_TSS_START + 3 * 0x1000 <= MMIO_HOLE_END);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        let l = RamLayout::new(512 << 20);
        let r: Vec<_> = l.regions().collect();
        assert_eq!(
            r,
            vec![RamRegion {
                guest_addr: GuestAddress(0),
                size: 512 << 20,
                file_offset: 0
            }]
        );
        assert_eq!(l.low_end(), 512 << 20);
    }

    #[test]
    fn exactly_3g_has_no_high_region() {
        let l = RamLayout::new(3 << 30);
        assert_eq!(l.regions().count(), 1);
        assert_eq!(l.high_size, 0);
    }

    #[test]
    fn large_guest_splits_around_hole() {
        let l = RamLayout::new(16 << 30);
        let r: Vec<_> = l.regions().collect();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, 3 << 30);
        assert_eq!(r[1].guest_addr, GuestAddress(4 << 30));
        assert_eq!(r[1].size, 13 << 30);
        assert_eq!(r[1].file_offset, 3 << 30);
        assert_eq!(l.total(), 16 << 30);
    }

    #[test]
    fn virtio_mmio_slots() {
        assert_eq!(
            VirtioMmioSlot::new(1),
            Some(VirtioMmioSlot {
                base: 0xf000_1000,
                gsi: 17
            })
        );
        assert_eq!(VirtioMmioSlot::new(8), None);
    }

    #[test]
    fn pci_window_above_ram() {
        assert_eq!(RamLayout::new(512 << 20).pci_mmio64_window().0, 4 << 30);
        assert_eq!(RamLayout::new(5 << 30).pci_mmio64_window().0, 6 << 30);
        let (start, _) = RamLayout::new((16 << 30) + 4096).pci_mmio64_window();
        assert_eq!(start, 18 << 30);
    }
}

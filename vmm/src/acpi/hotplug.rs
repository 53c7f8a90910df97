//! ACPI hot-plug in the DSDT: the Generic Event Device whose interrupt says "look", the
//! controller whose registers say what changed ([`crate::devices::acpi_hotplug`]), a slot
//! object per PCI slot that Linux's `acpiphp` binds to, and the power button.
//!
//! In ASL:
//! ```text
//! Device (\_SB.HPC_) {                         // the registers
//!     OperationRegion (HPCR, SystemMemory, base, 16)
//!     Field (HPCR, DWordAcc, NoLock, WriteAsZeros) { EVTS, 32, PCIU, 32, PCID, 32, B0EJ, 32 }
//!     Mutex (BLCK, 0)
//!     Method (PCEJ, 1, Serialized) { Acquire (BLCK, 0xFFFF); B0EJ = 1 << Arg0; Release (BLCK) }
//! }
//! Device (\_SB.GED_) {                         // ACPI0013, edge interrupt on GSI n
//!     Method (_EVT, 1, Serialized) {
//!         Local0 = \_SB.HPC_.EVTS
//!         If ((Local0 & 2) == 2) { \_SB.PCI0.PCNT () }
//!         If ((Local0 & 4) == 4) { Notify (\_SB.PWRB, 0x80) }
//!     }
//! }
//! Device (\_SB.PWRB) { Name (_HID, EisaId ("PNP0C0C")) }
//! // in \_SB.PCI0, for each slot n in 1..31:
//! Device (Snn) { Name (_SUN, n); Name (_ADR, n << 16); Method (_EJ0, 1) { \_SB.HPC_.PCEJ (_SUN) } }
//! Method (DVNT, 2, Serialized) { /* Notify (Snn, Arg1) for each bit n of Arg0 */ }
//! Method (PCNT, 0, Serialized) { DVNT (\_SB.HPC_.PCIU, 1); DVNT (\_SB.HPC_.PCID, 3) }
//! ```
//! Notify 1 is "device check" (a device appeared: scan the slot), 3 "eject request" (let go of
//! it, then `_EJ0`). Slot 0 is the host bridge's and has no object.

use acpi_tables::aml::{
    Acquire, And, Arg, Device, EISAName, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, MethodCall, Mutex, Name, Notify,
    OpRegion, OpRegionSpace, Path, Release, ResourceTemplate, Return, ShiftLeft, Store, ONE, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use crate::devices::acpi_hotplug::{EVENT_PCI, EVENT_POWER_BUTTON, LEN};
use crate::layout::{ACPI_GED_GSI, ACPI_HOTPLUG_START};

/// PCI slots a device may be hot-plugged into (0 is the host bridge).
const SLOTS: std::ops::Range<u8> = 1..32;

/// Appends `\_SB_.HPC_`, `\_SB_.GED_` and `\_SB_.PWRB`.
pub fn append_devices(aml: &mut Vec<u8>) {
    let base = ACPI_HOTPLUG_START as u32;
    let len = LEN as u32;
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A06"));
    let uid = Name::new(Path::new("_UID"), &2u8);
    let regs = Memory32Fixed::new(true, base, len);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&regs]));
    let region = OpRegion::new(Path::new("HPCR"), OpRegionSpace::SystemMemory, &base, &len);
    let field = Field::new(
        Path::new("HPCR"),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"EVTS", 32),
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let lock = Mutex::new(Path::new("BLCK"), 0);
    let acquire = Acquire::new(Path::new("BLCK"), 0xffff);
    let b0ej = Path::new("B0EJ");
    let bit = ShiftLeft::new(&b0ej, &ONE, &Arg(0));
    let release = Release::new(Path::new("BLCK"));
    let ret = Return::new(&ZERO);
    let pcej = Method::new(
        Path::new("PCEJ"),
        1,
        true,
        vec![&acquire, &bit, &release, &ret],
    );
    Device::new(
        Path::new("_SB_.HPC_"),
        vec![&hid, &uid, &crs, &region, &field, &lock, &pcej],
    )
    .to_aml_bytes(aml);

    let hid = Name::new(Path::new("_HID"), &"ACPI0013");
    let uid = Name::new(Path::new("_UID"), &0u8);
    let irq = Interrupt::new(true, true, false, false, ACPI_GED_GSI);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&irq]));
    let evts = Path::new("\\_SB_.HPC_.EVTS");
    let read = Store::new(&Local(0), &evts);
    let pci_bits = And::new(&Local(1), &Local(0), &EVENT_PCI);
    let pci_set = Equal::new(&Local(1), &EVENT_PCI);
    let scan = MethodCall::new(Path::new("\\_SB_.PCI0.PCNT"), vec![]);
    let on_pci = If::new(&pci_set, vec![&scan]);
    let button_bits = And::new(&Local(1), &Local(0), &EVENT_POWER_BUTTON);
    let button_set = Equal::new(&Local(1), &EVENT_POWER_BUTTON);
    let pwrb = Path::new("\\_SB_.PWRB");
    let press = Notify::new(&pwrb, &0x80u8);
    let on_button = If::new(&button_set, vec![&press]);
    let evt = Method::new(
        Path::new("_EVT"),
        1,
        true,
        vec![&read, &pci_bits, &on_pci, &button_bits, &on_button],
    );
    Device::new(Path::new("_SB_.GED_"), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(aml);

    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    Device::new(Path::new("_SB_.PWRB"), vec![&hid, &uid]).to_aml_bytes(aml);
}

/// The objects inside `\_SB_.PCI0`: a device per slot, and the methods that notify them.
pub struct SlotObjects;

impl Aml for SlotObjects {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        for n in SLOTS {
            let sun = Name::new(Path::new("_SUN"), &n);
            let adr = Name::new(Path::new("_ADR"), &(u32::from(n) << 16));
            let sun_path = Path::new("_SUN");
            let call = MethodCall::new(Path::new("\\_SB_.HPC_.PCEJ"), vec![&sun_path]);
            let ej0 = Method::new(Path::new("_EJ0"), 1, false, vec![&call]);
            Device::new(slot_path(n), vec![&sun, &adr, &ej0]).to_aml_bytes(sink);
        }
        let notifies: Vec<SlotNotify> = SLOTS.map(|slot| SlotNotify { slot }).collect();
        let refs: Vec<&dyn Aml> = notifies.iter().map(|n| n as &dyn Aml).collect();
        Method::new(Path::new("DVNT"), 2, true, refs).to_aml_bytes(sink);
        let pciu = Path::new("\\_SB_.HPC_.PCIU");
        let pcid = Path::new("\\_SB_.HPC_.PCID");
        let up = MethodCall::new(Path::new("DVNT"), vec![&pciu, &ONE]);
        let down = MethodCall::new(Path::new("DVNT"), vec![&pcid, &3u8]);
        Method::new(Path::new("PCNT"), 0, true, vec![&up, &down]).to_aml_bytes(sink);
    }
}

fn slot_path(n: u8) -> Path {
    Path::new(&format!("S{n:03}"))
}

/// `If ((Arg0 & bit) == bit) { Notify (Snnn, Arg1) }`.
struct SlotNotify {
    slot: u8,
}

impl Aml for SlotNotify {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let bit = 1u32 << self.slot;
        And::new(&Local(0), &Arg(0), &bit).to_aml_bytes(sink);
        let path = slot_path(self.slot);
        let notify = Notify::new(&path, &Arg(1));
        If::new(&Equal::new(&Local(0), &bit), vec![&notify]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_objects_are_there() {
        let mut aml = Vec::new();
        append_devices(&mut aml);
        for name in [
            &b"HPC_"[..],
            b"GED_",
            b"PWRB",
            b"PCEJ",
            b"_EVT",
            b"ACPI0013",
            b"EVTS",
        ] {
            assert!(contains(&aml, name), "{}", String::from_utf8_lossy(name));
        }
        let mut slots = Vec::new();
        SlotObjects.to_aml_bytes(&mut slots);
        assert!(contains(&slots, b"S001") && contains(&slots, b"S031"));
        assert!(!contains(&slots, b"S000"), "slot 0 is the host bridge's");
        assert!(contains(&slots, b"DVNT") && contains(&slots, b"PCNT"));
    }
}

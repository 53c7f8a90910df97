//! Tiny guests for the host's `/dev/kvm`, and a runner for `cloister` on them.
//!
//! Stock kernels do not run on this host's KVM (PVM), but small code of our own does. Each
//! payload is an ELF64 file with one PT_NOTE holding the Xen `XEN_ELFNOTE_PHYS32_ENTRY` note and
//! a PT_LOAD at 1 MiB, so `cloister` boots it exactly like a PVH vmlinux: 32-bit protected mode,
//! paging off, EBX = `hvm_start_info`. The code is hand-assembled here (no assembler needed);
//! every instruction carries its mnemonic in a comment.
//!
//! The payloads use the port numbers and values `cloister` itself declares to the guest
//! (through its FADT and DSDT), taken from the `vmm` crate.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmm::devices::acpi_pm::{S5_SLEEP_CONTROL_VALUE, SLEEP_CONTROL_PORT};
use vmm::devices::i8042::{I8042_COMMAND_PORT, I8042_RESET_COMMAND};
use vmm::devices::pvpanic::{PVPANIC_PANICKED, PVPANIC_PORT};
use vmm::devices::serial::COM1_PORT;
use vmm::layout::APIC_START;

/// Printed by [`Payload::PowerOff`] when EBX points at a valid `hvm_start_info`.
pub const MARKER_OK: &str = "CLOISTER-PAYLOAD-OK";
/// Printed by [`Payload::PowerOff`] when the start info magic is wrong.
pub const MARKER_BAD_START_INFO: &str = "CLOISTER-PAYLOAD-BAD-START-INFO";
pub const MARKER_TRIPLE_FAULT: &str = "CLOISTER-PAYLOAD-TRIPLE-FAULT";
pub const MARKER_PANIC: &str = "CLOISTER-PAYLOAD-PANIC";
pub const MARKER_RESET: &str = "CLOISTER-PAYLOAD-I8042-RESET";
pub const MARKER_HANG: &str = "CLOISTER-PAYLOAD-HANG";
pub const MARKER_BAD_FETCH: &str = "CLOISTER-PAYLOAD-BAD-FETCH";
/// Printed by the bzImage payload when it runs in long mode with RSI at a zero page.
pub const MARKER_BZIMAGE_OK: &str = "CLOISTER-BZIMAGE-OK";
pub const MARKER_BZIMAGE_BAD: &str = "CLOISTER-BZIMAGE-BAD-BOOT-STATE";
pub const MARKER_SMP_BSP: &str = "CLOISTER-SMP-BSP";
/// The application processor came up through INIT/SIPI and ran its real-mode code.
pub const MARKER_SMP_AP_OK: &str = "CLOISTER-SMP-AP-OK";
pub const MARKER_SMP_AP_TIMEOUT: &str = "CLOISTER-SMP-AP-TIMEOUT";
/// Printed by [`Payload::PciPba`] when the pending bits it read were all clear.
pub const MARKER_PBA_CLEAR: &str = "CLOISTER-PCI-PBA-CLEAR";
pub const MARKER_PBA_PENDING: &str = "CLOISTER-PCI-PBA-PENDING";
/// No virtio-pci device, or no VIRTIO_PCI_CAP_PCI_CFG capability in its list.
pub const MARKER_PCI_NOT_FOUND: &str = "CLOISTER-PCI-NOT-FOUND";
/// Printed by [`Payload::StringIo`] with `rep outsb`; the `QQQ` comes from `rep insb`.
pub const MARKER_STRING_IO: &str = "CLOISTER-STRING-IO-QQQ";

/// What the payload does after printing its marker line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Payload {
    /// Checks the PVH start info magic, prints [`MARKER_OK`], powers off through ACPI S5.
    PowerOff,
    /// Loads an empty IDT and executes `ud2`: #UD -> #GP -> #DF -> triple fault.
    TripleFault,
    /// Reports a panic through pvpanic.
    Panic,
    /// Resets through the i8042 (0xfe to port 0x64).
    I8042Reset,
    /// Prints its marker and halts with interrupts off, forever.
    Hang,
    /// Jumps into the MMIO hole, where there is no memory to fetch instructions from.
    BadFetch,
    /// Prints the command line and the start of the initramfs (both NUL-terminated strings in
    /// the tests) found through the PVH start info, then powers off.
    Echo,
    /// Echoes what arrives on COM1 (polling the line status register) until a newline, then
    /// powers off.
    EchoInput,
    /// Wakes vCPU 1 with INIT/SIPI, waits for it to set a flag from real mode, reports, powers
    /// off. Needs `--cpus boot=2` or more.
    Smp,
    /// Port I/O the devices see in odd shapes: a 4-byte `in` from the UART's data port, a
    /// 2-byte `out` to pvpanic (bit 0 of its first byte clear), `rep insb` from the UART's
    /// scratch register into its own marker, then the marker through `rep outsb`; powers off.
    StringIo,
    /// Finds the first virtio-pci device on bus 0 through 0xCF8/0xCFC, walks its capability
    /// list to VIRTIO_PCI_CAP_PCI_CFG, reads the first dword of the MSI-X pending-bit array
    /// through that window (BAR 0 + 0x5000: no BAR mapping needed), reports whether it was
    /// clear, powers off.
    PciPba,
    /// [`FLOOD_PAGES`] pages of console output, 4 KiB per `rep outsb` (one exit each), then
    /// [`MARKER_FLOOD_DONE`] and poweroff.
    Flood,
    /// Prints [`MARKER_SPIN`], then adds 1 to the dword at [`SPIN_COUNTER`] for ever: a vCPU
    /// that is always running, and a guest whose memory always changes.
    Spin,
}

/// Where [`Payload::Spin`] counts (a guest physical address nothing else uses).
pub const SPIN_COUNTER: u64 = 0x5_0000;
pub const MARKER_SPIN: &str = "CLOISTER-PAYLOAD-SPIN";

/// How many 4 KiB pages of `x`s [`Payload::Flood`] writes.
/// More than cloister's console buffer (256 KiB) and a pipe's (64 KiB) together, and quick
/// enough on a host where each byte is an exit.
pub const FLOOD_PAGES: u32 = 128;
/// Printed by [`Payload::Flood`] after its flood.
pub const MARKER_FLOOD_DONE: &str = "CLOISTER-PAYLOAD-FLOOD-DONE";

/// Guest-physical load address of the code (the kernel's usual 1 MiB start).
const CODE_BASE: u32 = 0x10_0000;
/// Strings live here, after at most 2 KiB of code.
const DATA_OFFSET: u32 = 0x800;
const DATA_BASE: u32 = CODE_BASE + DATA_OFFSET;
/// The AP trampoline: SIPI vector 0x10 starts the AP in real mode at 0x10000.
const AP_BASE: u32 = 0x1_0000;
const AP_SIPI_VECTOR: u32 = AP_BASE >> 12;
/// The AP writes 1 here (CS:0x1000 with CS base 0x10000).
const AP_FLAG: u32 = AP_BASE + 0x1000;
/// An address in the 32-bit MMIO hole with nothing behind it.
const NOWHERE: u32 = 0xd000_0000;
const PVH_START_MAGIC: u32 = 0x336e_c578;
/// PCI configuration mechanism #1.
const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
const PCI_CONFIG_DATA: u16 = 0xcfc;
const PCI_VENDOR_VIRTIO: u32 = 0x1af4;
/// VIRTIO_PCI_CAP_PCI_CFG's fields: BAR, offset in it, length, then the data window.
const PCI_CFG_CAP_BAR: u32 = 4;
const PCI_CFG_CAP_OFFSET: u32 = 8;
const PCI_CFG_CAP_LENGTH: u32 = 12;
const PCI_CFG_CAP_DATA: u32 = 16;
/// Where virtio-pci puts the MSI-X pending-bit array in BAR 0.
const VIRTIO_PCI_PBA_OFFSET: u32 = 0x5000;

/// LAPIC registers (xAPIC MMIO).
const APIC_SVR: u32 = APIC_START as u32 + 0xf0;
const APIC_ICR_LOW: u32 = APIC_START as u32 + 0x300;
/// SVR: APIC software-enabled, spurious vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;
/// ICR: all-excluding-self shorthand (0b11 << 18), level assert, INIT delivery mode.
const ICR_INIT_OTHERS: u32 = (0b11 << 18) | (1 << 14) | (0b101 << 8);
/// ICR: all-excluding-self, level assert, start-up delivery mode, vector.
const ICR_SIPI_OTHERS: u32 = (0b11 << 18) | (1 << 14) | (0b110 << 8) | AP_SIPI_VECTOR;

/// A minimal 32-bit assembler: raw bytes, plus labels for near jumps (rel32) resolved at the
/// end, so code can jump forward without counting bytes by hand.
struct Asm {
    base: u32,
    code: Vec<u8>,
    labels: HashMap<&'static str, u32>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn new(base: u32) -> Self {
        Asm {
            base,
            code: Vec::new(),
            labels: HashMap::new(),
            fixups: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    fn imm32(&mut self, v: u32) {
        self.emit(&v.to_le_bytes());
    }

    fn label(&mut self, name: &'static str) {
        let addr = self.base + self.code.len() as u32;
        assert!(
            self.labels.insert(name, addr).is_none(),
            "label {name} twice"
        );
    }

    fn rel32_to(&mut self, name: &'static str) {
        self.fixups.push((self.code.len(), name));
        self.imm32(0);
    }

    /// jmp rel32
    fn jmp(&mut self, name: &'static str) {
        self.emit(&[0xe9]); // jmp rel32
        self.rel32_to(name);
    }

    /// je rel32
    fn je(&mut self, name: &'static str) {
        self.emit(&[0x0f, 0x84]); // je rel32
        self.rel32_to(name);
    }

    /// jne rel32
    fn jne(&mut self, name: &'static str) {
        self.emit(&[0x0f, 0x85]); // jne rel32
        self.rel32_to(name);
    }

    /// mov dx, imm16
    fn mov_dx(&mut self, v: u16) {
        self.emit(&[0x66, 0xba]); // mov dx, imm16 (operand-size prefix in 32-bit code)
        self.emit(&v.to_le_bytes());
    }

    /// mov al, imm8 ; out dx, al
    fn out_dx_imm8(&mut self, port: u16, v: u8) {
        self.mov_dx(port);
        self.emit(&[0xb0, v]); // mov al, imm8
        self.emit(&[0xee]); // out dx, al
    }

    /// Config-space address register := EBP | EDI + `offset` (bus 0 function's base in EBP, a
    /// capability's offset in EDI). Leaves DX at the data port.
    fn pci_select(&mut self, offset: u32) {
        self.emit(&[0x89, 0xe8]); // mov eax, ebp
        self.emit(&[0x09, 0xf8]); // or eax, edi
        self.emit(&[0x05]); // add eax, imm32
        self.imm32(offset);
        self.mov_dx(PCI_CONFIG_ADDRESS);
        self.emit(&[0xef]); // out dx, eax
        self.mov_dx(PCI_CONFIG_DATA);
    }

    /// mov ecx, imm32
    fn mov_ecx(&mut self, v: u32) {
        self.emit(&[0xb9]); // mov ecx, imm32
        self.imm32(v);
    }

    /// mov dword [addr], imm32
    fn store32(&mut self, addr: u32, v: u32) {
        self.emit(&[0xc7, 0x05]); // mov dword [disp32], imm32
        self.imm32(addr);
        self.imm32(v);
    }

    /// Busy-waits about `n` iterations.
    fn delay(&mut self, n: u32, label: &'static str) {
        self.emit(&[0xb9]); // mov ecx, imm32
        self.imm32(n);
        self.label(label);
        self.emit(&[0x49]); // dec ecx
        self.jne(label);
    }

    /// Writes the NUL-terminated string at `addr` to COM1, byte by byte.
    fn print(&mut self, addr: u32, loop_label: &'static str, done_label: &'static str) {
        self.emit(&[0xbe]); // mov esi, imm32 (zero-extends into rsi in 64-bit mode)
        self.imm32(addr);
        self.print_esi(loop_label, done_label);
    }

    /// Writes the NUL-terminated string at ESI to COM1. Encodes the same in 32- and 64-bit
    /// mode.
    fn print_esi(&mut self, loop_label: &'static str, done_label: &'static str) {
        self.mov_dx(COM1_PORT);
        self.label(loop_label);
        self.emit(&[0xac]); // lodsb  (al = [esi++]; DF is clear at entry)
        self.emit(&[0x84, 0xc0]); // test al, al
        self.je(done_label);
        self.emit(&[0xee]); // out dx, al
        self.jmp(loop_label);
        self.label(done_label);
    }

    /// ACPI S5 through the sleep control register, then halts should the VMM not stop.
    fn power_off(&mut self) {
        self.out_dx_imm8(SLEEP_CONTROL_PORT, S5_SLEEP_CONTROL_VALUE);
        self.halt_forever();
    }

    /// cli ; hlt ; jmp back to hlt
    fn halt_forever(&mut self) {
        self.emit(&[0xfa]); // cli
        self.label("halt");
        self.emit(&[0xf4]); // hlt
        self.jmp("halt");
    }

    fn finish(mut self) -> Vec<u8> {
        for (at, name) in std::mem::take(&mut self.fixups) {
            let target = self.labels[name];
            let next = self.base + at as u32 + 4;
            let rel = target.wrapping_sub(next);
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.code
    }
}

/// Strings and other data at [`DATA_BASE`], with their addresses.
struct Data {
    bytes: Vec<u8>,
}

impl Data {
    fn add(&mut self, b: &[u8]) -> u32 {
        let addr = DATA_BASE + self.bytes.len() as u32;
        self.bytes.extend_from_slice(b);
        addr
    }

    fn line(&mut self, s: &str) -> u32 {
        self.add(format!("{s}\n\0").as_bytes())
    }
}

/// The code and data loaded at 1 MiB, and the AP trampoline if any.
fn segments(kind: Payload) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut a = Asm::new(CODE_BASE);
    let mut d = Data { bytes: Vec::new() };
    let mut ap = None;
    match kind {
        Payload::PowerOff => {
            let ok = d.line(MARKER_OK);
            let bad = d.line(MARKER_BAD_START_INFO);
            a.emit(&[0x81, 0x3b]); // cmp dword [ebx], imm32
            a.imm32(PVH_START_MAGIC);
            a.je("good");
            a.print(bad, "bad_loop", "bad_done");
            a.jmp("off");
            a.label("good");
            a.print(ok, "ok_loop", "ok_done");
            a.label("off");
            a.power_off();
        }
        Payload::TripleFault => {
            let msg = d.line(MARKER_TRIPLE_FAULT);
            let idtr = d.add(&[0; 6]); // limit 0, base 0
            a.print(msg, "loop", "done");
            a.emit(&[0x0f, 0x01, 0x1d]); // lidt [disp32]
            a.imm32(idtr);
            a.emit(&[0x0f, 0x0b]); // ud2
            a.halt_forever();
        }
        Payload::Panic => {
            let msg = d.line(MARKER_PANIC);
            a.print(msg, "loop", "done");
            a.out_dx_imm8(PVPANIC_PORT, PVPANIC_PANICKED);
            a.halt_forever();
        }
        Payload::I8042Reset => {
            let msg = d.line(MARKER_RESET);
            a.print(msg, "loop", "done");
            a.emit(&[0xb0, I8042_RESET_COMMAND]); // mov al, 0xfe
            a.emit(&[0xe6, I8042_COMMAND_PORT as u8]); // out 0x64, al
            a.halt_forever();
        }
        Payload::Hang => {
            let msg = d.line(MARKER_HANG);
            a.print(msg, "loop", "done");
            a.halt_forever();
        }
        Payload::BadFetch => {
            let msg = d.line(MARKER_BAD_FETCH);
            a.print(msg, "loop", "done");
            a.emit(&[0xb8]); // mov eax, imm32
            a.imm32(NOWHERE);
            a.emit(&[0xff, 0xe0]); // jmp eax
            a.halt_forever();
        }
        Payload::Echo => {
            let nl = d.add(b"\n\0");
            let bad = d.line(MARKER_BAD_START_INFO);
            a.emit(&[0x81, 0x3b]); // cmp dword [ebx], imm32
            a.imm32(PVH_START_MAGIC);
            a.jne("bad");
            a.emit(&[0x8b, 0x73, 0x18]); // mov esi, [ebx+0x18]  (cmdline_paddr)
            a.print_esi("cmd_loop", "cmd_done");
            a.print(nl, "nl_loop", "nl_done");
            a.emit(&[0x83, 0x7b, 0x0c, 0x00]); // cmp dword [ebx+0xc], 0  (nr_modules)
            a.je("off");
            a.emit(&[0x8b, 0x43, 0x10]); // mov eax, [ebx+0x10]  (modlist_paddr)
            a.emit(&[0x8b, 0x30]); // mov esi, [eax]  (modlist[0].paddr)
            a.print_esi("mod_loop", "mod_done");
            a.jmp("off");
            a.label("bad");
            a.print(bad, "bad_loop", "bad_done");
            a.label("off");
            a.power_off();
        }
        Payload::EchoInput => {
            a.label("wait");
            a.mov_dx(COM1_PORT + 5);
            a.emit(&[0xec]); // in al, dx  (line status register)
            a.emit(&[0xa8, 0x01]); // test al, 1  (data ready)
            a.je("wait");
            a.mov_dx(COM1_PORT);
            a.emit(&[0xec]); // in al, dx  (receive buffer)
            a.emit(&[0xee]); // out dx, al  (transmit it back)
            a.emit(&[0x3c, b'\n']); // cmp al, '\n'
            a.jne("wait");
            a.power_off();
        }
        Payload::Smp => {
            let bsp = d.line(MARKER_SMP_BSP);
            let ok = d.line(MARKER_SMP_AP_OK);
            let timeout = d.line(MARKER_SMP_AP_TIMEOUT);
            a.print(bsp, "bsp_loop", "bsp_done");
            a.store32(APIC_SVR, SVR_ENABLE);
            a.store32(APIC_ICR_LOW, ICR_INIT_OTHERS);
            a.delay(0x1000, "init_wait");
            a.store32(APIC_ICR_LOW, ICR_SIPI_OTHERS);
            // Wait for the flag, with a bound so a missing AP is reported, not a hang.
            a.emit(&[0xb9]); // mov ecx, imm32
            a.imm32(0x0004_0000);
            a.label("wait");
            a.emit(&[0x80, 0x3d]); // cmp byte [disp32], imm8
            a.imm32(AP_FLAG);
            a.emit(&[1]);
            a.je("ap_ok");
            a.emit(&[0xf3, 0x90]); // pause
            a.emit(&[0x49]); // dec ecx
            a.jne("wait");
            a.print(timeout, "to_loop", "to_done");
            a.jmp("off");
            a.label("ap_ok");
            a.print(ok, "ok_loop", "ok_done");
            a.label("off");
            a.power_off();

            // Real mode, CS = 0x1000 (base 0x10000), IP = 0.
            ap = Some(vec![
                0x2e, 0xc6, 0x06, 0x00, 0x10, 0x01, // mov byte cs:[0x1000], 1
                0xfa, // cli
                0xf4, // hlt
                0xeb, 0xfd, // jmp short back to hlt
            ]);
        }
        Payload::StringIo => {
            // The marker with its last three bytes as placeholders that `rep insb` fills in.
            let line = MARKER_STRING_IO.replace("QQQ", "???");
            let msg = d.add(format!("{line}\n").as_bytes());
            let fill = msg + line.len() as u32 - 3;
            a.emit(&[0xfc]); // cld
            a.mov_dx(COM1_PORT);
            a.emit(&[0xed]); // in eax, dx  (4 bytes from a byte register)
            a.mov_dx(PVPANIC_PORT);
            a.emit(&[0x66, 0xb8, 0x00, 0x01]); // mov ax, 0x0100  (first byte 0: no panic)
            a.emit(&[0x66, 0xef]); // out dx, ax
            a.out_dx_imm8(COM1_PORT + 7, b'Q'); // scratch register = 'Q'
            a.emit(&[0xbf]); // mov edi, imm32
            a.imm32(fill);
            a.mov_ecx(3);
            a.emit(&[0xf3, 0x6c]); // rep insb  (es:[edi++] = in dx, ecx times; dx is SCR)
            a.emit(&[0xbe]); // mov esi, imm32
            a.imm32(msg);
            a.mov_ecx(line.len() as u32 + 1);
            a.mov_dx(COM1_PORT);
            a.emit(&[0xf3, 0x6e]); // rep outsb  (out dx, ds:[esi++], ecx times)
            a.power_off();
        }
        Payload::PciPba => {
            let clear = d.line(MARKER_PBA_CLEAR);
            let pending = d.line(MARKER_PBA_PENDING);
            let missing = d.line(MARKER_PCI_NOT_FOUND);
            // EBP: enable bit | bus 0 | device << 11; EDI: offset within the function.
            a.emit(&[0x31, 0xff]); // xor edi, edi
            a.emit(&[0xbd]); // mov ebp, imm32 (device 1: 0 is the host bridge)
            a.imm32(0x8000_0000 | (1 << 11));
            a.label("scan");
            a.pci_select(0);
            a.emit(&[0xed]); // in eax, dx  (device ID << 16 | vendor ID)
            a.emit(&[0x25]); // and eax, imm32
            a.imm32(0xffff);
            a.emit(&[0x3d]); // cmp eax, imm32
            a.imm32(PCI_VENDOR_VIRTIO);
            a.je("device");
            a.emit(&[0x81, 0xc5]); // add ebp, imm32
            a.imm32(1 << 11);
            a.emit(&[0x81, 0xfd]); // cmp ebp, imm32
            a.imm32(0x8000_0000 | (32 << 11));
            a.jne("scan");
            a.jmp("missing");
            a.label("device");
            a.pci_select(0x34);
            a.emit(&[0xed]); // in eax, dx  (capabilities pointer in the low byte)
            a.emit(&[0x25]); // and eax, imm32
            a.imm32(0xfc);
            a.label("cap");
            a.emit(&[0x89, 0xc7]); // mov edi, eax
            a.emit(&[0x83, 0xff, 0x00]); // cmp edi, 0
            a.je("missing");
            a.pci_select(0);
            a.emit(&[0xed]); // in eax, dx  (cfg_type << 24 | len << 16 | next << 8 | id)
            a.emit(&[0x89, 0xc3]); // mov ebx, eax
            a.emit(&[0x81, 0xe3]); // and ebx, imm32
            a.imm32(0xff00_00ff);
            a.emit(&[0x81, 0xfb]); // cmp ebx, imm32  (vendor-specific, VIRTIO_PCI_CAP_PCI_CFG)
            a.imm32(0x0500_0009);
            a.je("window");
            a.emit(&[0xc1, 0xe8, 0x08]); // shr eax, 8
            a.emit(&[0x25]); // and eax, imm32
            a.imm32(0xfc);
            a.jmp("cap");
            a.label("window");
            for (field, value) in [
                (PCI_CFG_CAP_BAR, 0),
                (PCI_CFG_CAP_OFFSET, VIRTIO_PCI_PBA_OFFSET),
                (PCI_CFG_CAP_LENGTH, 4),
            ] {
                a.pci_select(field);
                a.emit(&[0xb8]); // mov eax, imm32
                a.imm32(value);
                a.emit(&[0xef]); // out dx, eax
            }
            a.pci_select(PCI_CFG_CAP_DATA);
            a.emit(&[0xed]); // in eax, dx  (BAR 0 + 0x5000: pending bits 0-31)
            a.emit(&[0x85, 0xc0]); // test eax, eax
            a.jne("pending");
            a.print(clear, "clear_loop", "clear_done");
            a.jmp("off");
            a.label("pending");
            a.print(pending, "pending_loop", "pending_done");
            a.jmp("off");
            a.label("missing");
            a.print(missing, "missing_loop", "missing_done");
            a.label("off");
            a.power_off();
        }
        Payload::Spin => {
            let msg = d.line(MARKER_SPIN);
            a.print(msg, "loop", "done");
            a.label("spin");
            a.emit(&[0xff, 0x05]); // inc dword [disp32]
            a.imm32(SPIN_COUNTER as u32);
            a.jmp("spin");
        }
        Payload::Flood => {
            let mut page = vec![b'x'; 4095];
            page.push(b'\n');
            let page = d.add(&page);
            let done = d.line(MARKER_FLOOD_DONE);
            a.emit(&[0xfc]); // cld
            a.emit(&[0xbf]); // mov edi, imm32
            a.imm32(FLOOD_PAGES);
            a.label("page");
            a.emit(&[0xbe]); // mov esi, imm32
            a.imm32(page);
            a.mov_ecx(4096);
            a.mov_dx(COM1_PORT);
            a.emit(&[0xf3, 0x6e]); // rep outsb
            a.emit(&[0xff, 0xcf]); // dec edi
            a.jne("page");
            a.print(done, "done_loop", "done_done");
            a.power_off();
        }
    }
    let mut code = a.finish();
    assert!(code.len() <= DATA_OFFSET as usize, "payload code too long");
    code.resize(DATA_OFFSET as usize, 0x90); // pad with nop
    code.extend_from_slice(&d.bytes);
    (code, ap)
}

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// File offsets: the note after the headers, segments page-aligned.
const NOTE_OFFSET: usize = 0x100;
const CODE_OFFSET: usize = 0x1000;
const AP_OFFSET: usize = 0x2000;

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn phdr(v: &mut Vec<u8>, p_type: u32, flags: u32, offset: usize, addr: u32, size: usize) {
    put32(v, p_type);
    put32(v, flags);
    put64(v, offset as u64); // p_offset
    put64(v, u64::from(addr)); // p_vaddr
    put64(v, u64::from(addr)); // p_paddr
    put64(v, size as u64); // p_filesz
    put64(v, size as u64); // p_memsz
    put64(v, if p_type == PT_LOAD { 0x1000 } else { 4 }); // p_align
}

/// The payload as an ELF64 x86-64 executable with a PVH entry note.
pub fn build(kind: Payload) -> Vec<u8> {
    let (code, ap) = segments(kind);
    let phnum = 2 + usize::from(ap.is_some());

    let mut note = Vec::new();
    put32(&mut note, 4); // n_namesz: "Xen\0"
    put32(&mut note, 4); // n_descsz: 32-bit entry address
    put32(&mut note, XEN_ELFNOTE_PHYS32_ENTRY); // n_type
    note.extend_from_slice(b"Xen\0");
    put32(&mut note, CODE_BASE);

    let mut f = Vec::with_capacity(CODE_OFFSET + code.len());
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI, padding.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    put16(&mut f, 2); // e_type: ET_EXEC
    put16(&mut f, 62); // e_machine: EM_X86_64
    put32(&mut f, 1); // e_version
    put64(&mut f, u64::from(CODE_BASE)); // e_entry (the 64-bit entry; PVH uses the note)
    put64(&mut f, EHDR_SIZE as u64); // e_phoff
    put64(&mut f, 0); // e_shoff
    put32(&mut f, 0); // e_flags
    put16(&mut f, EHDR_SIZE as u16); // e_ehsize
    put16(&mut f, PHDR_SIZE as u16); // e_phentsize
    put16(&mut f, phnum as u16); // e_phnum
    put16(&mut f, 64); // e_shentsize
    put16(&mut f, 0); // e_shnum
    put16(&mut f, 0); // e_shstrndx
    assert_eq!(f.len(), EHDR_SIZE);

    phdr(&mut f, PT_NOTE, PF_R, NOTE_OFFSET, 0, note.len());
    phdr(
        &mut f,
        PT_LOAD,
        PF_R | PF_W | PF_X,
        CODE_OFFSET,
        CODE_BASE,
        code.len(),
    );
    if let Some(ap) = &ap {
        phdr(
            &mut f,
            PT_LOAD,
            PF_R | PF_W | PF_X,
            AP_OFFSET,
            AP_BASE,
            ap.len(),
        );
    }

    f.resize(NOTE_OFFSET, 0);
    f.extend_from_slice(&note);
    f.resize(CODE_OFFSET, 0);
    f.extend_from_slice(&code);
    if let Some(ap) = ap {
        f.resize(AP_OFFSET, 0);
        f.extend_from_slice(&ap);
    }
    f
}

/// The bzImage payload: a Linux boot protocol 2.15 image whose 64-bit entry point checks it
/// runs in long mode (EFER.LMA) with RSI at a zero page, prints [`MARKER_BZIMAGE_OK`], the
/// command line and the start of the initramfs (if any), then powers off.
pub fn build_bzimage() -> Vec<u8> {
    /// code32_start: where the protected-mode part is loaded.
    const LOAD: u32 = CODE_BASE;
    /// The 64-bit entry point is 0x200 past the load address.
    const ENTRY: u32 = LOAD + 0x200;
    const SETUP_SECTS: u8 = 1;
    const MSR_EFER: u32 = 0xc000_0080;
    const EFER_LMA: u32 = 1 << 10;

    let mut a = Asm::new(ENTRY);
    let mut d = Data { bytes: Vec::new() };
    let ok = d.line(MARKER_BZIMAGE_OK);
    let bad = d.line(MARKER_BZIMAGE_BAD);
    let nl = d.add(b"\n\0");
    a.emit(&[0xb9]); // mov ecx, imm32
    a.imm32(MSR_EFER);
    a.emit(&[0x0f, 0x32]); // rdmsr  (edx:eax = EFER)
    a.emit(&[0xa9]); // test eax, imm32
    a.imm32(EFER_LMA);
    a.je("bad");
    a.emit(&[0x81, 0xbe, 0x02, 0x02, 0x00, 0x00]); // cmp dword [rsi+0x202], imm32
    a.imm32(u32::from_le_bytes(*b"HdrS"));
    a.jne("bad");
    a.emit(&[0x48, 0x89, 0xf3]); // mov rbx, rsi  (keep the zero page)
    a.print(ok, "ok_loop", "ok_done");
    a.emit(&[0x8b, 0xb3, 0x28, 0x02, 0x00, 0x00]); // mov esi, [rbx+0x228]  (cmd_line_ptr)
    a.print_esi("cmd_loop", "cmd_done");
    a.print(nl, "nl_loop", "nl_done");
    a.emit(&[0x83, 0xbb, 0x1c, 0x02, 0x00, 0x00, 0x00]); // cmp dword [rbx+0x21c], 0  (ramdisk_size)
    a.je("off");
    a.emit(&[0x8b, 0xb3, 0x18, 0x02, 0x00, 0x00]); // mov esi, [rbx+0x218]  (ramdisk_image)
    a.print_esi("rd_loop", "rd_done");
    a.jmp("off");
    a.label("bad");
    a.print(bad, "bad_loop", "bad_done");
    a.label("off");
    a.power_off();
    let code = a.finish();

    // The protected-mode part: padding up to the entry point, code, then data at 0x800.
    let mut pm = vec![0x90u8; (ENTRY - LOAD) as usize];
    pm.extend_from_slice(&code);
    assert!(
        pm.len() <= DATA_OFFSET as usize,
        "bzImage payload code too long"
    );
    pm.resize(DATA_OFFSET as usize, 0x90);
    pm.extend_from_slice(&d.bytes);

    // Boot sector and one setup sector; the setup header lives at 0x1f1.
    let mut f = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
    let mut set = |off: usize, bytes: &[u8]| f[off..off + bytes.len()].copy_from_slice(bytes);
    set(0x1f1, &[SETUP_SECTS]); // setup_sects
    set(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    set(0x202, b"HdrS"); // header
    set(0x206, &0x020fu16.to_le_bytes()); // version 2.15
    set(0x211, &[0x01]); // loadflags: LOADED_HIGH
    set(0x214, &LOAD.to_le_bytes()); // code32_start
    set(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    set(0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    set(0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    set(0x238, &2047u32.to_le_bytes()); // cmdline_size
    set(0x258, &u64::from(LOAD).to_le_bytes()); // pref_address
    set(0x260, &0x1000u32.to_le_bytes()); // init_size
    f.extend_from_slice(&pm);
    f
}

/// Writes the bzImage payload to `dir` and returns its path (atomically, like [`write`]).
pub fn write_bzimage(dir: &Path) -> std::io::Result<PathBuf> {
    write_file(dir, "payload-bzimage", &build_bzimage())
}

/// Writes the payload to `dir` and returns its path. The file is replaced atomically, so tests
/// running in parallel never see a half-written kernel.
pub fn write(kind: Payload, dir: &Path) -> std::io::Result<PathBuf> {
    let name = format!("payload-{kind:?}.elf").to_lowercase();
    write_file(dir, &name, &build(kind))
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let path = dir.join(name);
    let tmp = dir.join(format!(
        ".payload-{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// A scratch directory shared by all test processes (files in it are replaced atomically with
/// [`write_scratch`], so parallel tests and repeated runs neither clash nor pile up).
pub fn scratch_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("cloister-tests");
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        dir
    })
    .clone()
}

/// Writes `bytes` to `name` in the scratch directory, atomically; returns the path.
pub fn write_scratch(name: &str, bytes: &[u8]) -> PathBuf {
    write_file(&scratch_dir(), name, bytes).expect("write scratch file")
}

/// Path to the `cloister` binary of this build profile. Builds it first (once per test
/// process) with the same cargo, because `cargo test` does not build another package's
/// binaries.
pub fn cloister_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = crate::binaries::profile_dir().expect("find target directory");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "cloister", "--bin", "cloister"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build -p cloister");
        assert!(status.success(), "cargo build -p cloister failed");
        let bin = dir.join("cloister");
        assert!(bin.is_file(), "{} missing after cargo build", bin.display());
        bin
    })
    .clone()
}

/// The outcome of one `cloister` run.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// The exit status; fails the test with everything we know if cloister did not exit by
    /// itself in time.
    pub fn exit_code(&self) -> i32 {
        match self.status {
            Some(code) => code,
            None => panic!(
                "cloister did not exit within the timeout (or died from a signal)\nstdout:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            ),
        }
    }
}

/// Runs `cloister` with `args`, stdin from /dev/null, killing it after `timeout`.
pub fn run_cloister(args: &[&str], timeout: Duration) -> Run {
    run_cloister_with_input(args, None, timeout)
}

/// Like [`run_cloister`], with `input` (if any) written to its stdin, which is then closed.
pub fn run_cloister_with_input(args: &[&str], input: Option<&[u8]>, timeout: Duration) -> Run {
    let start = Instant::now();
    let mut child = Command::new(cloister_bin())
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cloister");
    let stdin_t = match (input, child.stdin.take()) {
        (Some(bytes), Some(mut stdin)) => {
            let bytes = bytes.to_vec();
            Some(std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            }))
        }
        _ => None,
    };
    // Drain both pipes on threads so a chatty guest cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout pipe");
    let mut err = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = wait_or_kill(&mut child, timeout).and_then(|st| st.code());
    let elapsed = start.elapsed();
    if let Some(t) = stdin_t {
        let _ = t.join();
    }
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Run {
        status,
        stdout,
        stderr,
        elapsed,
    }
}

/// Waits up to `timeout` for `child` to exit; after that kills it (SIGKILL) and reaps it, and
/// returns `None`.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_header_and_note() {
        let f = build(Payload::PowerOff);
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!(f[4], 2);
        assert_eq!(u16::from_le_bytes([f[18], f[19]]), 62);
        let phnum = u16::from_le_bytes([f[56], f[57]]);
        assert_eq!(phnum, 2);
        // Note: namesz 4, descsz 4, type 18, "Xen\0", entry.
        let n = &f[NOTE_OFFSET..NOTE_OFFSET + 20];
        assert_eq!(&n[8..12], &18u32.to_le_bytes());
        assert_eq!(&n[12..16], b"Xen\0");
        assert_eq!(&n[16..20], &CODE_BASE.to_le_bytes());
        // Data follows the code at the fixed offset.
        let data = &f[CODE_OFFSET + DATA_OFFSET as usize..];
        assert!(data.starts_with(MARKER_OK.as_bytes()));
    }

    #[test]
    fn jumps_resolve() {
        let mut a = Asm::new(0x1000);
        a.label("top");
        a.emit(&[0x90]);
        a.jmp("top");
        a.jmp("end");
        a.label("end");
        let c = a.finish();
        // jmp at 0x1001, next 0x1006, back to 0x1000: -6.
        assert_eq!(&c[1..6], &[0xe9, 0xfa, 0xff, 0xff, 0xff]);
        // jmp at 0x1006 to 0x100b: 0.
        assert_eq!(&c[6..11], &[0xe9, 0, 0, 0, 0]);
    }

    #[test]
    fn smp_payload_has_trampoline() {
        let f = build(Payload::Smp);
        assert_eq!(u16::from_le_bytes([f[56], f[57]]), 3);
        assert_eq!(&f[AP_OFFSET..AP_OFFSET + 3], &[0x2e, 0xc6, 0x06]);
    }
}

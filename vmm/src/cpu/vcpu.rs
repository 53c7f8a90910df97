//! A vCPU: its configuration before start, and the run loop its thread executes.
//!
//! Stopping: the main thread sets the shared `stop` flag and sends [`kick_signal`] to every
//! vCPU thread. The handler (installed without SA_RESTART) sets `immediate_exit` in this
//! thread's `kvm_run`, so KVM_RUN returns EINTR whether the signal lands inside KVM_RUN or
//! just before it; the loop then sees `stop`.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_mp_state, kvm_msr_entry, kvm_run, CpuId, Msrs, KVM_EXIT_IO_IN,
    KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use libc::{c_int, c_void, siginfo_t};
use thiserror::Error;
use vm_memory::GuestMemoryError;

use super::{msrs, regs};
use crate::boot::BootEntry;
use crate::devices::Bus;
use crate::exit::{ExitLatch, ExitReason};
use crate::memory::GuestMemoryMmap;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("vCPU {vcpu}: cannot {op}")]
    Kvm {
        vcpu: usize,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM accepted {set} of {total} boot MSRs; MSR {msr:#x} was refused")]
    Msr {
        vcpu: usize,
        set: usize,
        total: usize,
        msr: u32,
    },
    #[error("vCPU {vcpu}: cannot build an MSR list")]
    Fam {
        vcpu: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("vCPU {vcpu}: cannot write the boot GDT")]
    Gdt {
        vcpu: usize,
        #[source]
        source: GuestMemoryError,
    },
}

/// Everything a running vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: Arc<ExitLatch>,
    pub stop: Arc<AtomicBool>,
    /// Where the vCPU parks while the VM is paused.
    pub pause: Arc<super::pause::PauseGate>,
}

pub struct Vcpu {
    pub index: usize,
    fd: VcpuFd,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler. Const-initialised and without a
    /// destructor, so reading it from a signal handler is a plain TLS load.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: non-null only while this thread's VcpuFd (which owns the mapping) is alive;
        // a volatile byte store is async-signal-safe.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Publishes a `kvm_run` to this thread's kick handler for as long as it lives, and withdraws
/// it when dropped, so a kick that arrives after the mapping is gone (after a panic, say) finds
/// a null pointer instead of unmapped memory.
struct KickTarget;

impl KickTarget {
    fn publish(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|r| r.set(run));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(ptr::null_mut()));
    }
}

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (process-wide; call once before starting vCPU threads).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: usize) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(index as u64)
            .map_err(|source| VcpuError::Kvm {
                vcpu: index,
                op: "create it",
                source,
            })?;
        Ok(Vcpu { index, fd })
    }

    fn kvm_err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let vcpu = self.index;
        move |source| VcpuError::Kvm { vcpu, op, source }
    }

    /// CPUID, MSRs and FPU for every vCPU; boot registers and LAPIC LINTs for the boot vCPU
    /// (`boot` is `Some`), the wait-for-SIPI state for the others.
    pub fn configure(
        &self,
        cpuid: &CpuId,
        msrs: &Msrs,
        boot: Option<(&GuestMemoryMmap, &BootEntry)>,
    ) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.kvm_err("set CPUID"))?;
        let set = self.fd.set_msrs(msrs).map_err(self.kvm_err("set MSRs"))?;
        let entries = msrs.as_slice();
        if set < entries.len() {
            return Err(VcpuError::Msr {
                vcpu: self.index,
                set,
                total: entries.len(),
                msr: entries[set].index,
            });
        }
        self.set_misc_enable()?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.kvm_err("set FPU state"))?;

        match boot {
            Some((mem, entry)) => {
                let mut sregs = self
                    .fd
                    .get_sregs()
                    .map_err(self.kvm_err("get special registers"))?;
                regs::boot_sregs(mem, entry, &mut sregs).map_err(|source| VcpuError::Gdt {
                    vcpu: self.index,
                    source,
                })?;
                self.fd
                    .set_sregs(&sregs)
                    .map_err(self.kvm_err("set special registers"))?;
                self.fd
                    .set_regs(&regs::boot_regs(entry))
                    .map_err(self.kvm_err("set registers"))?;
                let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("get LAPIC"))?;
                regs::set_lint(&mut lapic);
                self.fd
                    .set_lapic(&lapic)
                    .map_err(self.kvm_err("set LAPIC"))?;
            }
            None => {
                // Application processors wait for INIT and SIPI from the guest through the
                // in-kernel LAPIC, like on hardware; KVM does this for non-BSPs by default
                // and we make it explicit.
                self.fd
                    .set_mp_state(kvm_mp_state {
                        mp_state: KVM_MP_STATE_UNINITIALIZED,
                    })
                    .map_err(self.kvm_err("set MP state"))?;
            }
        }
        Ok(())
    }

    /// Turns fast strings on in MISC_ENABLE, keeping the bits KVM set (after CPUID, which
    /// decides whether PEBS is available).
    fn set_misc_enable(&self) -> Result<(), VcpuError> {
        let entry = |data| kvm_msr_entry {
            index: msrs::MSR_IA32_MISC_ENABLE,
            data,
            ..Default::default()
        };
        let fam = |e| VcpuError::Fam {
            vcpu: self.index,
            source: e,
        };
        let mut current = Msrs::from_entries(&[entry(0)]).map_err(fam)?;
        let read = self
            .fd
            .get_msrs(&mut current)
            .map_err(self.kvm_err("get MISC_ENABLE"))?;
        if read != 1 {
            return Err(VcpuError::Msr {
                vcpu: self.index,
                set: 0,
                total: 1,
                msr: msrs::MSR_IA32_MISC_ENABLE,
            });
        }
        let value = msrs::misc_enable(current.as_slice()[0].data);
        let new = Msrs::from_entries(&[entry(value)]).map_err(fam)?;
        let set = self
            .fd
            .set_msrs(&new)
            .map_err(self.kvm_err("set MISC_ENABLE"))?;
        if set != 1 {
            return Err(VcpuError::Msr {
                vcpu: self.index,
                set: 0,
                total: 1,
                msr: msrs::MSR_IA32_MISC_ENABLE,
            });
        }
        Ok(())
    }

    /// The vCPU thread's body: runs until the guest or the VMM stops the VM, and reports why
    /// if this vCPU is the reason.
    pub fn run(mut self, ctx: VcpuContext) {
        // A local of the body, so it is dropped before the parameter `self` (and with it the
        // kvm_run mapping), on return and when a panic unwinds alike.
        let _kick_target = KickTarget::publish(self.fd.get_kvm_run());
        while !ctx.stop.load(Ordering::Acquire) {
            // A kick (EINTR) brings the vCPU here between runs.
            if ctx.pause.requested() {
                ctx.pause.park();
                continue;
            }
            if let Some(reason) = self.step(&ctx) {
                ctx.exit.request(reason);
                break;
            }
        }
    }

    /// One KVM_RUN and the handling of its exit. `Some` stops the VM.
    fn step(&mut self, ctx: &VcpuContext) -> Option<ExitReason> {
        let failure = match self.fd.run() {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => {
                self.port_io(&ctx.io_bus);
                return None;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                return None;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio_bus.write(addr, data);
                return None;
            }
            // With the in-kernel LAPIC, HLT does not exit; if it ever does, resuming is right.
            Ok(VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr) => return None,
            Ok(VcpuExit::Shutdown) => {
                // Where it was is all there is to go on when a guest triple-faults. (On AMD,
                // KVM resets the vCPU when it intercepts the shutdown, so what it says there is
                // the reset state, rip 0xfff0; on Intel, where the guest was.)
                return Some(ExitReason::TripleFault {
                    vcpu: self.index,
                    state: self.where_it_was(),
                });
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => return Some(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => return Some(ExitReason::Reboot),
                KVM_SYSTEM_EVENT_CRASH => return Some(ExitReason::GuestPanic),
                other => format!("unexpected KVM_EXIT_SYSTEM_EVENT type {other}"),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => format!(
                "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x}, host CPU {cpu})"
            ),
            Ok(VcpuExit::InternalError) => String::new(), // detailed below
            Ok(VcpuExit::Unknown) => String::from("KVM_EXIT_UNKNOWN"),
            Ok(VcpuExit::Exception) => String::from("KVM_EXIT_EXCEPTION"),
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                format!("KVM_EXIT_MEMORY_FAULT at {gpa:#x} (size {size:#x}, flags {flags:#x})")
            }
            Ok(other) => format!("unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR => {
                // Kicked (or another signal): clear the flag and let the loop check `stop`.
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) if e.errno() == libc::EAGAIN => return None,
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        let detail = self.describe_failure(failure);
        Some(ExitReason::VcpuFailure {
            vcpu: self.index,
            detail,
        })
    }

    /// Handles a KVM_EXIT_IO. kvm-ioctls hands out the data as one slice, but a string or
    /// repeated instruction (`rep outsb`, `rep insw`) exits once with `count` items of `size`
    /// bytes back to back, each of which is an access of its own; only `kvm_run` says which.
    fn port_io(&mut self, bus: &Bus) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the caller matched KVM_EXIT_IO, so `io` is the valid member of the union.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let len = size * io.count as usize;
        // SAFETY: as in kvm-ioctls' own KVM_EXIT_IO handling: the kernel puts the data
        // `data_offset` bytes into the kvm_run mapping (its PIO page, which `size * count`
        // never exceeds), and the slice lives no longer than the borrow of `run`.
        let data = unsafe {
            let start = (run as *mut kvm_run).cast::<u8>();
            std::slice::from_raw_parts_mut(start.add(io.data_offset as usize), len)
        };
        let port = u64::from(io.port);
        if u32::from(io.direction) == KVM_EXIT_IO_IN {
            port_in(bus, port, data, size);
        } else {
            port_out(bus, port, data, size);
        }
    }

    /// Adds what `kvm_run` says about the exit and where the guest was.
    fn describe_failure(&mut self, mut detail: String) -> String {
        let run = self.fd.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR && detail.is_empty() {
            // SAFETY: exit_reason says the `internal` member is the valid one.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let what = match internal.suberror {
                KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
                KVM_INTERNAL_ERROR_SIMUL_EX => "simultaneous exceptions",
                KVM_INTERNAL_ERROR_DELIVERY_EV => "failure delivering an event",
                KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
                _ => "unknown suberror",
            };
            detail = format!(
                "KVM_EXIT_INTERNAL_ERROR (suberror {}: {what})",
                internal.suberror
            );
            let n = (internal.ndata as usize).min(internal.data.len());
            if n > 0 {
                let words: Vec<String> = internal.data[..n]
                    .iter()
                    .map(|d| format!("{d:#x}"))
                    .collect();
                detail.push_str(&format!(", data [{}]", words.join(" ")));
            }
        } else if run.exit_reason == kvm_bindings::KVM_EXIT_UNKNOWN {
            // SAFETY: exit_reason says the `hw` member is the valid one.
            let hw = unsafe { run.__bindgen_anon_1.hw };
            detail.push_str(&format!(
                " (hardware exit reason {:#x})",
                hw.hardware_exit_reason
            ));
        }
        detail.push_str(&self.where_it_was());
        detail
    }

    /// " at rip … (registers that say what the guest was doing)", or nothing if KVM will not
    /// tell.
    fn where_it_was(&self) -> String {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return String::new();
        };
        format!(
            " at rip {:#x} (rsp {:#x}, rflags {:#x}, cs {:#x}, cr0 {:#x}, cr2 {:#x}, cr3 {:#x}, \
             cr4 {:#x}, efer {:#x}, idt {:#x}+{:#x}, gs base {:#x})",
            r.rip,
            r.rsp,
            r.rflags,
            s.cs.selector,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.idt.base,
            s.idt.limit,
            s.gs.base
        )
    }
}

/// Reads `data` from `port` as `size`-byte items, one device access each. A port nobody
/// decodes reads as all ones, as an ISA bus floats high; that covers probes of the debug port,
/// CMOS, absent UARTs and the like, silently.
fn port_in(bus: &Bus, port: u64, data: &mut [u8], size: usize) {
    if size == 0 {
        return;
    }
    for item in data.chunks_mut(size) {
        if !bus.read(port, item) {
            item.fill(0xff);
        }
    }
}

/// Writes `data` to `port` as `size`-byte items, one device access each.
fn port_out(bus: &Bus, port: u64, data: &[u8], size: usize) {
    if size == 0 {
        return;
    }
    for item in data.chunks(size) {
        bus.write(port, item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::BusDevice;
    use std::sync::Mutex;

    /// Records every access with its width; reads return a counter.
    #[derive(Default)]
    struct Port {
        writes: Mutex<Vec<Vec<u8>>>,
        reads: Mutex<u8>,
    }

    impl BusDevice for Port {
        fn read(&self, _offset: u64, data: &mut [u8]) {
            let mut n = self.reads.lock().unwrap();
            *n += 1;
            data.fill(*n);
        }
        fn write(&self, _offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push(data.to_vec());
        }
    }

    #[test]
    fn string_io_is_one_access_per_item() {
        let bus = Bus::new();
        let dev = Arc::new(Port::default());
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();

        // rep outsb of "abc": three 1-byte writes.
        port_out(&bus, 0x3f8, b"abc", 1);
        // rep outsw of two words: two 2-byte writes.
        port_out(&bus, 0x3f8, &[1, 2, 3, 4], 2);
        assert_eq!(
            *dev.writes.lock().unwrap(),
            vec![vec![b'a'], vec![b'b'], vec![b'c'], vec![1, 2], vec![3, 4]]
        );

        // rep insb of three bytes: three reads.
        let mut data = [0u8; 3];
        port_in(&bus, 0x3f8, &mut data, 1);
        assert_eq!(data, [1, 2, 3]);
        // One 4-byte in: one read.
        let mut data = [0u8; 4];
        port_in(&bus, 0x3f8, &mut data, 4);
        assert_eq!(data, [4; 4]);

        // Nothing decodes the port: all ones. Degenerate sizes do not panic.
        let mut data = [0u8; 4];
        port_in(&bus, 0x80, &mut data, 2);
        assert_eq!(data, [0xff; 4]);
        port_in(&bus, 0x3f8, &mut data, 0);
        port_out(&bus, 0x3f8, &data, 0);
        port_in(&bus, 0x3f8, &mut [0u8; 3], 2);
    }

    fn read_misc_enable(vcpu: &Vcpu) -> u64 {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index: msrs::MSR_IA32_MISC_ENABLE,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.fd.get_msrs(&mut m).unwrap(), 1);
        m.as_slice()[0].data
    }

    /// Needs /dev/kvm; passes trivially without it (the host tests insist on KVM).
    #[test]
    fn configure_keeps_kvms_misc_enable_bits() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIP: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        crate::irqchip::setup(&vm).unwrap();
        let vcpu = Vcpu::new(&vm, 0).unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.fd.set_cpuid2(&cpuid).unwrap();
        // What KVM resets it to on an Intel host without PEBS virtualization (KVM on an AMD host
        // resets it to 0).
        let kvms = msrs::MISC_ENABLE_BTS_UNAVAIL | msrs::MISC_ENABLE_PEBS_UNAVAIL;
        let reset = Msrs::from_entries(&[kvm_msr_entry {
            index: msrs::MSR_IA32_MISC_ENABLE,
            data: kvms,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.fd.set_msrs(&reset).unwrap(), 1);
        vcpu.configure(&cpuid, &msrs::boot_msrs().unwrap(), None)
            .unwrap();
        assert_eq!(read_misc_enable(&vcpu), kvms | 1);
    }

    #[test]
    fn kick_target_is_withdrawn_when_a_vcpu_thread_unwinds() {
        let mut fake = kvm_run::default();
        let ptr: *mut kvm_run = &mut fake;
        let r = std::panic::catch_unwind(|| {
            let _kick_target = KickTarget::publish(ptr);
            assert_eq!(KVM_RUN.with(|r| r.get()), ptr);
            panic!("a device bug");
        });
        assert!(r.is_err());
        assert!(KVM_RUN.with(|r| r.get()).is_null());
        // A kick now is harmless.
        handle_kick(kick_signal(), ptr::null_mut(), ptr::null_mut());
        assert_eq!(fake.immediate_exit, 0);
    }
}

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
    kvm_mp_state, kvm_run, CpuId, Msrs, KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use libc::{c_int, c_void, siginfo_t};
use thiserror::Error;
use vm_memory::GuestMemoryError;

use super::regs;
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

    /// The vCPU thread's body: runs until the guest or the VMM stops the VM, and reports why
    /// if this vCPU is the reason.
    pub fn run(mut self, ctx: VcpuContext) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        while !ctx.stop.load(Ordering::Acquire) {
            if let Some(reason) = self.step(&ctx) {
                ctx.exit.request(reason);
                break;
            }
        }
        KVM_RUN.with(|r| r.set(ptr::null_mut()));
    }

    /// One KVM_RUN and the handling of its exit. `Some` stops the VM.
    fn step(&mut self, ctx: &VcpuContext) -> Option<ExitReason> {
        let failure = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.io_bus.read(u64::from(port), data) {
                    // Nothing there: an ISA bus floats high. Covers probes of the debug port,
                    // CMOS, absent UARTs and the like, silently.
                    data.fill(0xff);
                }
                return None;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.io_bus.write(u64::from(port), data);
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
                return Some(ExitReason::TripleFault { vcpu: self.index });
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
        if let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            detail.push_str(&format!(
                " at rip {:#x} (cs {:#x}, cr0 {:#x}, efer {:#x})",
                r.rip, s.cs.selector, s.cr0, s.efer
            ));
        }
        detail
    }
}

//! Why the VM stopped, and the one-shot latch devices and vCPUs use to say so.
//!
//! The first request wins: a guest that panics and then triple-faults while we stop it is
//! reported as a panic.

use std::fmt;
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 through the sleep control register.
    PowerOff,
    /// ACPI reset register or the i8042 reset command.
    Reboot,
    /// pvpanic "panicked" event.
    GuestPanic,
    /// KVM_EXIT_SHUTDOWN: the vCPU hit a fault while delivering a double fault.
    TripleFault { vcpu: usize, state: String },
    /// Anything else that stopped a vCPU: an internal KVM error, a failed entry, an exit we do
    /// not handle, or a KVM_RUN error.
    VcpuFailure { vcpu: usize, detail: String },
    /// SIGINT, SIGTERM or SIGHUP to the VMM.
    Signal(i32),
    /// The API asked.
    Api(ApiStop),
}

/// Which API request stopped the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiStop {
    /// `vm.shutdown`: the VMM stays, the configuration too.
    Shutdown,
    /// `vm.delete`: the VMM stays, the configuration goes.
    Delete,
    /// `vmm.shutdown`: the VMM goes.
    Vmm,
}

impl ApiStop {
    pub fn endpoint(self) -> &'static str {
        match self {
            ApiStop::Shutdown => "vm.shutdown",
            ApiStop::Delete => "vm.delete",
            ApiStop::Vmm => "vmm.shutdown",
        }
    }
}

impl ExitReason {
    /// 0 for a guest that asked to stop, 1 for a guest or VMM failure, 128+N for signal N.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::PowerOff | ExitReason::Reboot | ExitReason::Api(_) => 0,
            ExitReason::Signal(n) => (128 + n).clamp(0, 255) as u8,
            _ => 1,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reboot => write!(f, "guest requested reboot; exiting"),
            ExitReason::GuestPanic => write!(f, "guest kernel panicked"),
            ExitReason::TripleFault { vcpu, state } => {
                write!(f, "vCPU {vcpu}: triple fault (KVM_EXIT_SHUTDOWN){state}")
            }
            ExitReason::VcpuFailure { vcpu, detail } => write!(f, "vCPU {vcpu}: {detail}"),
            ExitReason::Signal(n) => write!(f, "terminated by signal {}", signal_name(*n)),
            ExitReason::Api(stop) => write!(f, "stopped through the API ({})", stop.endpoint()),
        }
    }
}

fn signal_name(n: i32) -> String {
    match n {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => n.to_string(),
    }
}

/// Latches the first exit reason and wakes the main thread through an eventfd.
pub struct ExitLatch {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitLatch {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitLatch {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
            // Cannot fail short of the counter overflowing, which one write per VM cannot do.
            let _ = self.evt.write(1);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let l = ExitLatch::new().unwrap();
        assert_eq!(l.reason(), None);
        l.request(ExitReason::GuestPanic);
        l.request(ExitReason::TripleFault {
            vcpu: 0,
            state: String::new(),
        });
        assert_eq!(l.reason(), Some(ExitReason::GuestPanic));
        assert_eq!(l.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Reboot.exit_code(), 0);
        assert_eq!(ExitReason::GuestPanic.exit_code(), 1);
        assert_eq!(
            ExitReason::TripleFault {
                vcpu: 1,
                state: String::new()
            }
            .exit_code(),
            1
        );
        assert_eq!(
            ExitReason::VcpuFailure {
                vcpu: 0,
                detail: String::new()
            }
            .exit_code(),
            1
        );
        assert_eq!(ExitReason::Signal(libc::SIGTERM).exit_code(), 143);
        assert!(ExitReason::TripleFault {
            vcpu: 1,
            state: String::new()
        }
        .to_string()
        .contains("triple fault"));
    }
}

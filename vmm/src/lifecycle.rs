//! The VM's state and who may change it. The main thread owns the VM: it builds it, runs it
//! and stops it. The API thread reads the state (and a running VM's devices) from
//! [`Shared`], and asks the main thread for everything that changes the state with a
//! [`Command`], woken through an eventfd, waiting for the reply.
//!
//! Created → Running ⇄ Paused → Shutdown (`vm.shutdown`), and back to nothing with
//! `vm.delete`. A
//! guest that powers off, reboots or fails ends the process, as Cloud Hypervisor's does.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device_manager::hotplug::Hotplug;
use crate::device_manager::DeviceManager;
use crate::devices::acpi_hotplug::AcpiHotplug;
use crate::VmConfig;

/// Cloud Hypervisor's `VmState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
        }
    }
}

/// What the API thread may read.
#[derive(Default)]
pub struct Shared {
    /// The VM's configuration, from the command line or `vm.create`; none before or after
    /// `vm.delete`.
    pub config: Option<Arc<VmConfig>>,
    pub state: Option<VmState>,
    /// The running VM's devices and its hot-plug thread.
    pub running: Option<RunningVm>,
}

#[derive(Clone)]
pub struct RunningVm {
    pub devices: Arc<Mutex<DeviceManager>>,
    pub hotplug: Hotplug,
    /// The guest's ACPI events (the power button).
    pub acpi: Arc<AcpiHotplug>,
}

/// A request the main thread must serve.
#[derive(Debug)]
pub enum Command {
    /// `vm.create`, with its body.
    Create(Vec<u8>),
    Boot,
    /// `vm.shutdown`.
    Shutdown,
    /// `vm.pause`: vCPUs parked, rings stopped, the guest's clock kept.
    Pause,
    /// `vm.resume`.
    Resume,
    /// `vm.delete`: shut down if running, and forget the configuration.
    Delete,
    /// `vmm.shutdown`: the VM, if any, then the process.
    ShutdownVmm,
}

/// Why a command was refused: the HTTP status and what to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

pub type Reply = Sender<Result<(), Refusal>>;

/// The API thread's end.
#[derive(Clone)]
pub struct Control {
    shared: Arc<Mutex<Shared>>,
    commands: Sender<(Command, Reply)>,
    wake: Arc<EventFd>,
}

impl Control {
    pub fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `command` to the main thread and waits for its answer.
    pub fn call(&self, command: Command) -> Result<(), Refusal> {
        let (reply, answer) = mpsc::channel();
        let gone = || Refusal::new(503, "the VMM is stopping");
        self.commands.send((command, reply)).map_err(|_| gone())?;
        let _ = self.wake.write(1);
        answer.recv().map_err(|_| gone())?
    }
}

/// The main thread's end.
pub struct Inbox {
    shared: Arc<Mutex<Shared>>,
    commands: Receiver<(Command, Reply)>,
    wake: Arc<EventFd>,
    /// A command [`Inbox::gone`] took off the channel.
    stash: Mutex<Option<(Command, Reply)>>,
}

impl Inbox {
    pub fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the main loop polls.
    pub fn fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The next command, if any (clears the wake-up once none is left).
    pub fn next(&self) -> Option<(Command, Reply)> {
        if let Some(c) = self.stashed().take() {
            return Some(c);
        }
        match self.commands.try_recv() {
            Ok(c) => Some(c),
            Err(_) => {
                let _ = self.wake.read();
                // A command sent between try_recv and the read would have lost its wake-up.
                self.commands.try_recv().ok()
            }
        }
    }

    /// Whether the API thread is gone (nothing can send a command any more), or a command came
    /// meanwhile (kept for [`Inbox::next`]).
    pub fn check(&self) -> InboxState {
        if self.stashed().is_some() {
            return InboxState::Pending;
        }
        match self.commands.try_recv() {
            Ok(c) => {
                *self.stashed() = Some(c);
                InboxState::Pending
            }
            Err(mpsc::TryRecvError::Disconnected) => InboxState::Gone,
            Err(mpsc::TryRecvError::Empty) => InboxState::Idle,
        }
    }

    fn stashed(&self) -> MutexGuard<'_, Option<(Command, Reply)>> {
        self.stash.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`Inbox::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboxState {
    Idle,
    Pending,
    Gone,
}

/// Both ends, sharing `shared`.
pub fn channel() -> std::io::Result<(Control, Inbox)> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (tx, rx) = mpsc::channel();
    Ok((
        Control {
            shared: shared.clone(),
            commands: tx,
            wake: wake.clone(),
        },
        Inbox {
            shared,
            commands: rx,
            wake,
            stash: Mutex::new(None),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_answered() {
        let (control, inbox) = channel().unwrap();
        let t = std::thread::spawn(move || control.call(Command::Boot));
        let (command, reply) = loop {
            if let Some(c) = inbox.next() {
                break c;
            }
            std::thread::yield_now();
        };
        assert!(matches!(command, Command::Boot));
        reply.send(Err(Refusal::new(404, "no VM"))).unwrap();
        assert_eq!(t.join().unwrap(), Err(Refusal::new(404, "no VM")));
    }

    #[test]
    fn a_gone_main_thread_is_a_503() {
        let (control, inbox) = channel().unwrap();
        drop(inbox);
        assert_eq!(control.call(Command::Boot).unwrap_err().status, 503);
    }
}

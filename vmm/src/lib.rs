//! The Cloister VMM core: KVM vCPUs, guest memory, the platform devices and the boot path.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod cpu;
pub mod device_manager;
pub mod devices;
pub mod events;
pub mod exit;
pub mod irqchip;
pub mod kinds;
pub mod layout;
pub mod lifecycle;
pub mod main_loop;
pub mod memory;
pub mod pci;
pub mod signals;
pub mod supervisor;
pub mod terminal;
pub mod test_hooks;
pub mod vhost_user;
pub mod virtio;
pub mod vm;
pub mod vm_ops;

use thiserror::Error;

pub use config::{ConfigError, VmConfig};
pub use exit::ExitReason;
pub use vm::{Vm, VmError};

/// Top-level error: either the user's input is wrong (exit status 2, like clap's usage
/// errors) or the VM could not be built or run (exit status 1).
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => 2,
            Error::Vm(_) => 1,
        }
    }
}

/// `error: source: source ...`, one line, for the top-level message.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        let next = e.to_string();
        // Transparent wrappers repeat their source's text; print it once.
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        source = e.source();
    }
    s
}

/// Validates the command line, builds the VM (or waits for the API to ask for one) and runs
/// it.
pub fn run(cli: &config::Cli) -> Result<ExitReason, Error> {
    main_loop::run(cli)
}

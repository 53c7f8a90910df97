//! The lab harness shared by every integration test: builds the lab and the test guest (via
//! `lab/build.sh`), runs scenarios inside the lab VM (or directly on a hardware-KVM host), streams
//! the console into the test output and hands back structured outcomes.
//!
//! ```no_run
//! use harness::{LabOptions, Scenario, SharedRun};
//! static LAB: SharedRun = SharedRun::new("example", scenarios, LabOptions::default);
//! fn scenarios() -> Vec<Scenario> {
//!     vec![Scenario::new("boot", "run vm $BIN_DIR/cloister --kernel $GUEST_DIR/vmlinux ...")]
//! }
//! #[test]
//! fn boots() {
//!     LAB.scenario("boot").expect_rc(0).expect_console("CLOISTER-GUEST-UP");
//! }
//! ```

pub mod artifacts;
pub mod binaries;
pub mod host;
pub mod lab;
pub mod outcome;
pub mod payload;
pub mod scenario;
pub mod shared;
pub mod watchdog;

use std::path::PathBuf;

pub use lab::{LabOptions, Mode};
pub use outcome::{LabRun, ScenarioOutcome};
pub use scenario::Scenario;
pub use shared::SharedRun;

/// QEMU's microvm on the lab's KVM with the test guest's kernel, for scenario scripts; the
/// caller adds devices, the initramfs and the command line. Legacy virtio-mmio is off:
/// vhost-user devices need 1.0.
pub const QEMU_MICROVM: &str = "-accel kvm -cpu host -M microvm,pit=off,pic=off,rtc=on \\
    -m 512M -smp 1 -nodefaults -no-reboot -nographic -serial stdio \\
    -global virtio-mmio.force-legacy=false -kernel \"$GUEST_DIR/bzImage\"";

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{0} failed: {1}")]
    Tool(String, String),
    #[error("building the lab failed: {0}")]
    LabBuild(String),
    #[error("{0}")]
    Binary(String),
    #[error("cannot find the test executable")]
    CurrentExe(#[source] std::io::Error),
    #[error("{}", .0.display())]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0}")]
    Mode(String),
}

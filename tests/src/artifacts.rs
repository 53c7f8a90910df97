//! The lab's build products: `lab/build.sh` builds them (or finds them in the cache) and says
//! where they are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HarnessError;

/// Where the lab host image (L1), the test guest (L2) and the optional Debian root filesystem are.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `bzImage`, `initrd.cpio` and `root.ext4` of the lab host.
    pub lab_dir: Option<PathBuf>,
    /// `bzImage`, `vmlinux`, `initramfs.cpio`, `initramfs-tools.cpio` and `guest.ext4`.
    pub guest_dir: PathBuf,
    /// `debian.ext4`, when asked for.
    pub rootfs_dir: Option<PathBuf>,
}

/// What to build besides the test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub lab: bool,
    pub rootfs: bool,
}

/// The repository's root (the workspace this crate lives in).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

impl Artifacts {
    /// Runs `lab/build.sh` for what is needed; a warm cache makes this a matter of hashing.
    pub fn build(needs: Needs) -> Result<Self, HarnessError> {
        let script = repo_root().join("lab/build.sh");
        let mut targets = vec!["guest"];
        if needs.lab {
            targets.push("lab");
        }
        if needs.rootfs {
            targets.push("rootfs");
        }
        let output = Command::new(&script)
            .args(&targets)
            .output()
            .map_err(|e| HarnessError::Spawn(script.display().to_string(), e))?;
        if !output.status.success() {
            return Err(HarnessError::LabBuild(format!(
                "{} exited with {}:\n{}",
                script.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let vars: HashMap<String, PathBuf> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect();
        let guest_dir = vars
            .get("GUEST_DIR")
            .cloned()
            .ok_or_else(|| HarnessError::LabBuild("lab/build.sh printed no GUEST_DIR".into()))?;
        Ok(Artifacts {
            lab_dir: vars.get("LAB_DIR").cloned(),
            guest_dir,
            rootfs_dir: vars.get("ROOTFS_DIR").cloned(),
        })
    }
}

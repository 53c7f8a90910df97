//! A private directory for this VM's backend sockets, removed when the VM ends.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// `$XDG_RUNTIME_DIR/cloister-PID`, else `/run/cloister/PID`, else
    /// `$TMPDIR/cloister-UID-PID`: the first one we can create. Mode 0700, so only our user can
    /// reach the sockets in it; created fresh (never reused), so nobody can have planted
    /// anything there.
    pub fn create() -> io::Result<Self> {
        let pid = std::process::id();
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let mut candidates = Vec::with_capacity(3);
        if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(xdg).join(format!("cloister-{pid}")));
        }
        // /run/cloister itself is shared between VMs; only root can usually create it.
        if DirBuilder::new()
            .mode(0o755)
            .create("/run/cloister")
            .is_ok()
            || Path::new("/run/cloister").is_dir()
        {
            candidates.push(PathBuf::from(format!("/run/cloister/{pid}")));
        }
        candidates.push(std::env::temp_dir().join(format!("cloister-{uid}-{pid}")));
        let mut last = io::Error::other("no candidate directory");
        for path in candidates {
            match Self::create_at(&path) {
                Ok(dir) => return Ok(dir),
                Err(e) => last = io::Error::new(e.kind(), format!("{}: {e}", path.display())),
            }
        }
        Err(last)
    }

    /// Creates exactly `path` (not its parents), mode 0700.
    pub fn create_at(path: &Path) -> io::Result<Self> {
        DirBuilder::new().mode(0o700).create(path)?;
        Ok(RuntimeDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        // Sockets left by backends that were killed are removed with it.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_and_removed() {
        let path = {
            let dir = RuntimeDir::create().unwrap();
            let meta = std::fs::metadata(dir.path()).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o700);
            std::fs::write(dir.path().join("x.sock"), b"").unwrap();
            // A second VM with the same name cannot take it over.
            assert!(RuntimeDir::create_at(dir.path()).is_err());
            dir.path().to_path_buf()
        };
        assert!(!path.exists());
    }
}

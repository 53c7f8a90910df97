//! Landlock: what a thread may still reach on the file system, and nothing on the network.
//!
//! [`Rules::new`] allows nothing: no file system access, no TCP or UDP bind or connect, no
//! signals to processes outside the domain and no connecting to abstract unix sockets made
//! outside it. A process then adds exactly what it still needs after set-up:
//!
//! ```no_run
//! # use cloister_seccomp::landlock::Rules;
//! # fn f(image: &std::path::Path, socket_dir: &std::path::Path) {
//! let rules = Rules::new()
//!     .read_write_file(image)
//!     .remove_entries(socket_dir);
//! # }
//! ```
//!
//! The ruleset is built for the newest Landlock ABI this crate knows, in best-effort mode: a
//! kernel with an older ABI enforces what it can, one without Landlock enforces nothing (and
//! [`Outcome`] says so, for a warning).

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// The ABI whose access rights we handle; the kernel may offer less (this host: 7).
const NEWEST: ABI = ABI::V10;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("cannot open {} for a Landlock rule", .0.display())]
    Path(PathBuf, #[source] landlock::PathFdError),
    #[error("cannot apply the Landlock ruleset")]
    Ruleset(#[from] landlock::RulesetError),
}

/// What the kernel enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything asked for.
    Full,
    /// What the kernel's Landlock ABI supports (an older kernel).
    Partial,
    /// Nothing: the kernel has no Landlock (or it is disabled).
    None,
    /// No new layer: the thread keeps the domain of the thread that created it.
    Inherited,
}

impl Outcome {
    /// For the log: "Landlock fully enforced".
    pub fn describe(self) -> &'static str {
        match self {
            Outcome::Full => "Landlock fully enforced",
            Outcome::Partial => "Landlock enforced as far as this kernel's ABI goes",
            Outcome::None => "Landlock not enforced",
            Outcome::Inherited => "Landlock as its creator's",
        }
    }

    /// A warning for the log, if the file system is less restricted than asked.
    pub fn warning(self) -> Option<&'static str> {
        match self {
            Outcome::Full | Outcome::Partial | Outcome::Inherited => None,
            Outcome::None => Some(
                "Landlock is not available in this kernel: file system access is not restricted",
            ),
        }
    }
}

/// The paths a thread may still use, and how.
#[derive(Debug, Clone)]
pub struct Rules {
    paths: Vec<(PathBuf, BitFlags<AccessFs>)>,
}

impl Default for Rules {
    fn default() -> Self {
        Self::new()
    }
}

impl Rules {
    /// Nothing allowed.
    pub fn new() -> Self {
        Self { paths: Vec::new() }
    }

    fn with(mut self, path: &Path, access: BitFlags<AccessFs>) -> Self {
        self.paths.push((path.to_path_buf(), access));
        self
    }

    /// Open `file` for reading.
    pub fn read_file(self, file: &Path) -> Self {
        self.with(file, AccessFs::ReadFile.into())
    }

    /// Open `file` for reading and writing (not truncating).
    pub fn read_write_file(self, file: &Path) -> Self {
        self.with(file, AccessFs::ReadFile | AccessFs::WriteFile)
    }

    /// Remove files (not directories) in `dir`: a socket directory's cleanup.
    pub fn remove_entries(self, dir: &Path) -> Self {
        self.with(dir, AccessFs::RemoveFile.into())
    }

    /// List `dir` and the directories beneath it.
    pub fn read_dir(self, dir: &Path) -> Self {
        self.with(dir, AccessFs::ReadDir.into())
    }

    /// Remove empty directories in `dir` (Landlock checks removal on the parent directory).
    pub fn remove_subdirectories(self, dir: &Path) -> Self {
        self.with(dir, AccessFs::RemoveDir.into())
    }

    /// Connect to the unix socket `path`, or to those beneath it if it is a directory (ABI 9;
    /// older kernels do not restrict connecting to a named socket at all).
    pub fn connect_unix(self, path: &Path) -> Self {
        self.with(path, AccessFs::ResolveUnix.into())
    }

    /// Make a unix socket in `dir` and remove files there: a server-mode device's socket,
    /// listened on again for a restarted backend.
    pub fn listen_unix(self, dir: &Path) -> Self {
        self.with(dir, AccessFs::MakeSock | AccessFs::RemoveFile)
    }

    /// The paths and their access, for messages and tests.
    pub fn paths(&self) -> impl Iterator<Item = (&Path, BitFlags<AccessFs>)> {
        self.paths.iter().map(|(p, a)| (p.as_path(), *a))
    }

    /// Confines the calling thread (and the threads it creates later).
    pub fn restrict_self(&self) -> Result<Outcome, LandlockError> {
        let scopes = Scope::AbstractUnixSocket | Scope::Signal;
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(NEWEST))?
            .handle_access(AccessNet::from_all(NEWEST))?
            .scope(scopes & Scope::from_all(NEWEST))?
            .create()?;
        for (path, access) in &self.paths {
            let fd = PathFd::new(path).map_err(|e| LandlockError::Path(path.clone(), e))?;
            // Access rights that only make sense on directories are dropped for a file by
            // the caller's choice of method; the crate checks the rest.
            ruleset = ruleset.add_rule(PathBeneath::new(fd, *access))?;
        }
        let status = ruleset.restrict_self()?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Outcome::Full,
            RulesetStatus::PartiallyEnforced => Outcome::Partial,
            RulesetStatus::NotEnforced => Outcome::None,
        })
    }
}

/// A short description of `rules`, for the log: "/img (ReadFile|WriteFile), /run/x (RemoveFile)".
pub fn describe(rules: &Rules) -> String {
    let parts: Vec<String> = rules
        .paths()
        .map(|(path, access)| {
            let names: Vec<String> = access.iter().map(|a| format!("{a:?}")).collect();
            format!("{} ({})", path.display(), names.join("|"))
        })
        .collect();
    if parts.is_empty() {
        "no file system access".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cloister-landlock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_the_listed_paths_stay_reachable() {
        let dir = scratch("paths");
        let allowed = dir.join("allowed.img");
        let other = dir.join("other.img");
        std::fs::write(&allowed, b"a").unwrap();
        std::fs::write(&other, b"b").unwrap();
        let rules = Rules::new().read_write_file(&allowed);
        let outcome = std::thread::spawn(move || {
            let outcome = rules.restrict_self().unwrap();
            if outcome != Outcome::None {
                assert!(File::open(&allowed).is_ok());
                let e = File::open(&other).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EACCES));
                assert!(File::open("/etc/hostname").is_err());
                // No TCP either.
                assert!(std::net::TcpListener::bind("127.0.0.1:0").is_err());
            }
            outcome
        })
        .join()
        .unwrap();
        eprintln!("landlock outcome on this kernel: {outcome:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

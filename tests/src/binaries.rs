//! Finds the project's freshly built binaries, so the lab runs exactly what this test run built.

use std::path::PathBuf;

use crate::HarnessError;

/// The binaries a scenario may use; only `cloister` is required.
pub const PROJECT_BINARIES: &[&str] = &[
    "cloister",
    "cloister-remote",
    "vhost-user-blk",
    "vhost-user-net",
    "boot-timer",
    "make-payload",
    "vsock-probe",
    "guest-mem",
];

/// `target/<profile>/`, found from the running executable: a test (`target/<profile>/deps/NAME`)
/// or one of this crate's binaries (`target/<profile>/NAME`).
pub fn profile_dir() -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(HarnessError::CurrentExe)?;
    let mut dir = exe.parent();
    if dir.is_some_and(|d| d.ends_with("deps")) {
        dir = dir.and_then(|d| d.parent());
    }
    dir.map(PathBuf::from)
        .ok_or_else(|| HarnessError::Binary(format!("no target directory above {}", exe.display())))
}

/// The path of one project binary; a clear error says how to build it when it is missing.
pub fn binary(name: &str) -> Result<PathBuf, HarnessError> {
    let path = profile_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::Binary(format!(
            "{} is missing: run `cargo build --workspace` (same profile as the tests) first",
            path.display()
        )))
    }
}

/// Every project binary that exists, `cloister` first (and required).
pub fn all() -> Result<Vec<PathBuf>, HarnessError> {
    let mut found = vec![binary("cloister")?];
    for name in &PROJECT_BINARIES[1..] {
        if let Ok(path) = binary(name) {
            found.push(path);
        }
    }
    Ok(found)
}

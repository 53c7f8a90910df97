//! What the host tests that run cloister on this host's `/dev/kvm` share: whether they can run,
//! fresh scratch directories and disk images.

use std::path::{Path, PathBuf};

use crate::payload;

/// Whether `test` can run here: `/dev/kvm` exists (without it the test fails, unless
/// `CLOISTER_SKIP_KVM=1` says to skip, loudly) and vhost-user-blk is built next to cloister
/// (otherwise skipped, loudly).
pub fn ready(test: &str) -> bool {
    if !Path::new("/dev/kvm").exists() {
        if std::env::var("CLOISTER_SKIP_KVM").is_ok_and(|v| v == "1") {
            eprintln!("SKIP {test}: /dev/kvm is missing and CLOISTER_SKIP_KVM=1");
            return false;
        }
        panic!("/dev/kvm is missing: these tests need KVM (set CLOISTER_SKIP_KVM=1 to skip them)");
    }
    let backend = backend_bin();
    if !backend.is_file() {
        eprintln!("SKIP {test}: {} is not built", backend.display());
        return false;
    }
    true
}

/// Our vhost-user-blk, next to cloister.
pub fn backend_bin() -> PathBuf {
    payload::cloister_bin().with_file_name("vhost-user-blk")
}

/// A fresh directory under the scratch directory.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = payload::scratch_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test directory");
    dir
}

/// A sparse 16 MiB raw image in `dir`; its path.
pub fn image(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create image");
    path.to_str().expect("utf-8 path").to_string()
}

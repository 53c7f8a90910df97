//! What the host tests that run cloister on this host's `/dev/kvm` share: whether they can run,
//! fresh scratch directories and disk images.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::payload::{self, Payload};

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

/// cloister running the halting payload with `args` (and `hook` as `CLOISTER_TEST_HOTPLUG`),
/// its stderr read line by line.
pub struct Vm {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vm {
    pub fn start(runtime: &Path, args: &[String], hook: &str) -> Vm {
        let kernel = payload::write(Payload::Hang, &payload::scratch_dir()).expect("payload");
        let mut child = Command::new(payload::cloister_bin())
            .arg("--kernel")
            .arg(&kernel)
            .arg("--serial")
            .arg("off")
            .args(args)
            .env("XDG_RUNTIME_DIR", runtime)
            .envs((!hook.is_empty()).then_some(("CLOISTER_TEST_HOTPLUG", hook)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cloister");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Vm {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first stderr line containing `needle`, waiting up to `timeout`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!(
            "no '{needle}' on cloister's stderr within {timeout:?}; it said:\n{}",
            self.seen.join("\n")
        );
    }

    /// SIGTERM; the exit code (128 + 15 expected), or what cloister said if it died.
    pub fn stop(mut self) -> Result<i32, String> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = payload::wait_or_kill(&mut self.child, Duration::from_secs(30));
        self.seen.extend(self.lines.try_iter());
        status
            .and_then(|s| s.code())
            .ok_or_else(|| format!("{status:?}; it said:\n{}", self.seen.join("\n")))
    }
}

/// A process named `name` whose command line contains `needle`.
pub fn process_named(name: &str, needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (comm.trim() == name && String::from_utf8_lossy(&cmdline).contains(needle))
                .then_some(pid)
        })
}

/// A field of `/proc/PID/status` (`Seccomp`, `CapEff`, ...), or "" if there is none.
pub fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Moves the calling thread, and so the cloister it starts (and its spawner and backends),
/// into a network namespace of its own, where the taps it makes are its alone; or says loudly
/// why `test` is skipped.
pub fn own_network_namespace(test: &str) -> bool {
    // SAFETY: unshare(2) with a constant flag; affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "SKIP {test}: cannot make a network namespace ({})",
            std::io::Error::last_os_error()
        );
        return false;
    }
    true
}

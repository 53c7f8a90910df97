//! cloister's sandbox on this host's `/dev/kvm`, with our tiny PVH payloads: a forbidden
//! system call in the main thread or a vCPU thread kills cloister with SIGSYS and names the
//! call, `--seccomp=log` names it and runs on, Landlock keeps other files out of reach, and the
//! kernel shows every thread of cloister and of a managed backend filtered, with
//! no-new-privileges and no capabilities. The misbehaviour comes from the debug-only test
//! hook (`CLOISTER_TEST_HOOK`, see `cloister_seccomp::test_hooks`); the backend's own
//! sandbox tests are in `vhost-user-blk/tests/sandbox.rs`.
//!
//! Skipped when `/dev/kvm` is missing and `CLOISTER_SKIP_KVM=1`.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use harness::payload::{self, Payload};

fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CLOISTER_SKIP_KVM").is_ok_and(|v| v == "1") {
        eprintln!("SKIP {test}: /dev/kvm is missing and CLOISTER_SKIP_KVM=1");
        return false;
    }
    panic!("/dev/kvm is missing: these tests need KVM (set CLOISTER_SKIP_KVM=1 to skip them)");
}

/// cloister on `kind` with `args`, the hook (if any) in its environment; stdout and stderr
/// piped. A SIGSYS death would dump core where the limit allows; not from a test.
fn spawn(kind: Payload, hook: Option<&str>, args: &[&str], runtime: Option<&Path>) -> Child {
    let kernel = payload::write(kind, &payload::scratch_dir()).expect("payload");
    let mut cmd = Command::new(payload::cloister_bin());
    cmd.arg("--kernel")
        .arg(&kernel)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(hook) = hook {
        cmd.env("CLOISTER_TEST_HOOK", hook);
    }
    if let Some(dir) = runtime {
        cmd.env("XDG_RUNTIME_DIR", dir);
    }
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn cloister")
}

/// Runs to the end (at most 30 s): (status, stdout, stderr).
fn run(kind: Payload, hook: Option<&str>, args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = spawn(kind, hook, args, None);
    // Killed and reaped at the deadline (a detached killer thread could hit a reused pid).
    // The outputs are a few lines: the pipes cannot fill meanwhile.
    payload::wait_or_kill(&mut child, Duration::from_secs(30));
    let out = child.wait_with_output().expect("wait for cloister");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_forbidden_call_in_the_main_thread_kills_with_sigsys_and_is_named() {
    if !kvm_available("a_forbidden_call_in_the_main_thread_kills_with_sigsys_and_is_named") {
        return;
    }
    let (status, _, stderr) = run(
        Payload::Hang,
        Some("syscall@vmm-main"),
        &["--serial", "off"],
    );
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {stderr}");
    assert!(
        stderr.contains(
            "cloister: seccomp: forbidden system call personality (135) in thread 'cloister' (policy vmm-main); stopping the process"
        ),
        "{stderr}"
    );
}

#[test]
fn a_forbidden_call_in_a_vcpu_thread_kills_with_sigsys_and_is_named() {
    if !kvm_available("a_forbidden_call_in_a_vcpu_thread_kills_with_sigsys_and_is_named") {
        return;
    }
    let (status, stdout, stderr) = run(
        Payload::PowerOff,
        Some("syscall@vmm-vcpu"),
        &["--serial", "tty"],
    );
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {stderr}");
    assert!(
        stderr.contains(
            "forbidden system call personality (135) in thread 'vcpu0' (policy vmm-vcpu)"
        ),
        "{stderr}"
    );
    // Before its first KVM_RUN: the guest never ran.
    assert_eq!(stdout, "");
}

#[test]
fn log_mode_names_the_call_and_the_guest_runs_on() {
    if !kvm_available("log_mode_names_the_call_and_the_guest_runs_on") {
        return;
    }
    let (status, stdout, stderr) = run(
        Payload::PowerOff,
        Some("syscall@vmm-vcpu"),
        &["--seccomp", "log", "--cpus", "boot=2"],
    );
    assert_eq!(status.code(), Some(0), "{status}: {stderr}");
    assert_eq!(stdout, format!("{}\n", payload::MARKER_OK));
    // Each vCPU thread makes the call; the role and call are reported once.
    assert_eq!(
        stderr
            .matches("cloister: seccomp: system call personality (135) in thread 'vcpu")
            .count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("(policy vmm-vcpu) is not in the policy; allowed (--seccomp=log)"),
        "{stderr}"
    );
}

#[test]
fn landlock_keeps_the_main_thread_away_from_other_files() {
    if !kvm_available("landlock_keeps_the_main_thread_away_from_other_files") {
        return;
    }
    // Without a seccomp filter, what stops the open is Landlock.
    let (status, stdout, stderr) = run(
        Payload::PowerOff,
        Some("open@vmm-main=/etc/hostname"),
        &["--seccomp", "false"],
    );
    assert_eq!(status.code(), Some(0), "{status}: {stderr}");
    assert_eq!(stdout, format!("{}\n", payload::MARKER_OK));
    assert!(
        stderr.contains("cloister: warning: --seccomp=false: system calls are not filtered"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cloister: test hook: open /etc/hostname: Permission denied"),
        "{stderr}"
    );
    // A vCPU thread has no file system access at all: not even the kernel it booted.
    let kernel = payload::write(Payload::PowerOff, &payload::scratch_dir()).expect("payload");
    let hook = format!("open@vmm-vcpu={}", kernel.display());
    let (status, _, stderr) = run(Payload::PowerOff, Some(&hook), &["--seccomp", "false"]);
    assert_eq!(status.code(), Some(0), "{status}: {stderr}");
    assert!(stderr.contains(": Permission denied"), "{stderr}");
}

/// `Field:` of `/proc/PID/status` (or of one of its threads).
fn status_field(status_file: &Path, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(status_file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = payload::scratch_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test directory");
    dir
}

#[test]
fn every_thread_of_cloister_and_of_a_managed_backend_is_confined() {
    if !kvm_available("every_thread_of_cloister_and_of_a_managed_backend_is_confined") {
        return;
    }
    let backend_bin = payload::cloister_bin().with_file_name("vhost-user-blk");
    if !backend_bin.is_file() {
        eprintln!("SKIP: {} is not built", backend_bin.display());
        return;
    }
    let dir = fresh_dir("host-sandbox");
    let runtime = fresh_dir("host-sandbox-run");
    let image = dir.join("sandboxed.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create image");
    let disk = format!("path={},num_queues=2", image.display());
    let vm = spawn(
        Payload::Hang,
        None,
        &["--serial", "off", "--cpus", "boot=2", "--disk", &disk],
        Some(&runtime),
    );
    let vm_pid = vm.id();
    let vm_status = PathBuf::from(format!("/proc/{vm_pid}/status"));
    // The main thread enters its sandbox once the VM is built and the backend connected.
    wait_until("cloister's main thread to be filtered", || {
        status_field(&vm_status, "Seccomp").as_deref() == Some("2")
    });
    let backend = harness::host::process_named("vhost-user-blk", &image.display().to_string())
        .expect("backend process");
    let backend_status = PathBuf::from(format!("/proc/{backend}/status"));
    // cloister passed its mode on.
    let cmdline = std::fs::read(format!("/proc/{backend}/cmdline")).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--seccomp=true"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );

    // Every thread of both processes: filtered (mode 2), no new privileges, no capabilities.
    for (name, pid) in [("cloister", vm_pid), ("vhost-user-blk", backend)] {
        let tasks: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("list threads")
            .flatten()
            .map(|t| t.path().join("status"))
            .collect();
        assert!(tasks.len() >= 2, "{name}: {} threads", tasks.len());
        for task in tasks {
            let thread = status_field(&task, "Name").unwrap_or_default();
            for (field, want) in [
                ("Seccomp", "2"),
                ("NoNewPrivs", "1"),
                ("CapEff", "0000000000000000"),
                ("CapPrm", "0000000000000000"),
            ] {
                assert_eq!(
                    status_field(&task, field).as_deref(),
                    Some(want),
                    "{name} thread {thread}: {field}"
                );
            }
        }
    }
    assert_eq!(
        status_field(&backend_status, "Seccomp").as_deref(),
        Some("2")
    );
    assert_eq!(
        status_field(&backend_status, "NoNewPrivs").as_deref(),
        Some("1")
    );
    // The backend has no network: its own network namespace.
    let ns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns");
    assert_ne!(
        ns(backend),
        ns(vm_pid),
        "the backend shares cloister's network"
    );

    // SIGTERM still stops everything cleanly from inside the sandbox, and the runtime
    // directory is removed.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(vm_pid as i32, libc::SIGTERM) };
    let out = vm.wait_with_output().expect("wait for cloister");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert_eq!(stderr.trim_end(), "cloister: terminated by signal SIGTERM");
    wait_until("the backend to exit", || {
        !Path::new(&format!("/proc/{backend}")).exists()
    });
    let left: Vec<_> = std::fs::read_dir(&runtime).expect("runtime dir").collect();
    assert!(
        left.is_empty(),
        "runtime directory not cleaned up: {left:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&runtime);
}

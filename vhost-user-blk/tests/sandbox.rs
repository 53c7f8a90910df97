//! The daemon's sandbox: a forbidden system call in the main thread or in a queue worker kills
//! it with SIGSYS and names the call, `--seccomp=log` names it and serves on, Landlock keeps
//! files other than the image out of reach, and the kernel shows the filter and
//! no-new-privileges. The misbehaviour comes from the debug-only test hook
//! (`CLOISTER_TEST_HOOK`, see `cloister_seccomp::test_hooks`).

mod common;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cloister_backends::test_frontend::blk::features_wanted;
use cloister_backends::test_frontend::blk::TestBlk;
use common::*;

struct Hooked {
    child: Child,
    scratch: Scratch,
}

impl Hooked {
    /// The daemon on a fresh image with `hook` in its environment and `args` added; stderr
    /// goes to `daemon.log`.
    fn start(name: &str, hook: Option<&str>, args: &[&str]) -> Self {
        Self::start_with(name, |_| hook.map(str::to_owned), &[], args)
    }

    /// Same, with the hook made from the image's path, and `env` set.
    fn start_with(
        name: &str,
        hook: impl Fn(&Path) -> Option<String>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        let scratch = Scratch::new(name);
        let image = scratch.image(IMAGE_SIZE);
        let hook = hook(&image);
        let mut cmd = Command::new(BINARY);
        cmd.arg("--socket")
            .arg(scratch.path("blk.sock"))
            .arg("--image")
            .arg(&image)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path("daemon.log")).expect("log"));
        if let Some(hook) = &hook {
            cmd.env("CLOISTER_TEST_HOOK", hook);
        }
        cmd.envs(env.iter().copied());
        // A SIGSYS death dumps core where the limit allows it; not from a test.
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
        let child = cmd.spawn().expect("spawn vhost-user-blk");
        Self { child, scratch }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path("daemon.log")).unwrap_or_default()
    }

    /// The log once it has a line containing `needle` (the socket exists before the thread
    /// that logs it has entered its sandbox), or as it is after 10 s.
    fn log_once(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the socket (or the daemon's end).
    fn wait_for_socket(&mut self) -> bool {
        let socket = self.scratch.path("blk.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if socket.exists() {
                return true;
            }
            if self.child.try_wait().expect("wait").is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn connect(&self) -> TestBlk {
        TestBlk::connect(&self.scratch.path("blk.sock"), 1, 256, features_wanted())
            .unwrap_or_else(|e| panic!("connect: {e:?}; log: {}", self.log()))
    }

    fn status_field(&self, field: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Hooked {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_panic_is_one_line_even_with_backtraces_asked_for() {
    // std's own report would resolve a backtrace, reading /proc/self/exe: outside the policy.
    let mut daemon = Hooked::start_with(
        "panic-main",
        |_| Some("panic@blk-main".into()),
        &[("RUST_BACKTRACE", "1")],
        &[],
    );
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("a panic in the main thread ends the daemon");
    let log = daemon.log();
    assert_eq!(status.signal(), None, "{status}: {log}");
    assert!(!log.contains("forbidden system call"), "{log}");
    assert!(
        log.contains("vhost-user-blk: internal error in thread main: test hook: panic ("),
        "{log}"
    );
}

#[test]
fn a_forbidden_call_in_the_main_thread_kills_with_sigsys_and_is_named() {
    let mut daemon = Hooked::start("sigsys-main", Some("syscall@blk-main"), &[]);
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("the daemon must die");
    let log = daemon.log();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {log}");
    assert!(
        log.contains("vhost-user-blk: seccomp: forbidden system call personality (135)"),
        "{log}"
    );
    assert!(log.contains("(policy blk-main)"), "{log}");
    assert!(!log.contains("test hook: personality returned"), "{log}");
}

#[test]
fn a_forbidden_call_in_a_queue_worker_kills_with_sigsys_and_is_named() {
    let mut daemon = Hooked::start("sigsys-worker", Some("syscall@blk-worker"), &[]);
    assert!(daemon.wait_for_socket(), "{}", daemon.log());
    {
        // The worker confines itself at its first event and then makes the call: the request
        // gets no answer. That first event may be the queue's enabling, before the handshake
        // is even over, so the connection may fail too.
        let socket = daemon.scratch.path("blk.sock");
        if let Ok(mut blk) = TestBlk::connect(&socket, 1, 256, features_wanted()) {
            let _ = blk.read(0, 0, 4096);
        }
    }
    let status = daemon
        .wait(Duration::from_secs(10))
        .expect("the daemon must die");
    let log = daemon.log();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {log}");
    assert!(
        log.contains(
            "forbidden system call personality (135) in thread 'vring_worker' (policy blk-worker)"
        ),
        "{log}"
    );
}

#[test]
fn log_mode_names_the_call_and_serves_on() {
    let mut daemon = Hooked::start("log", Some("syscall@blk-worker"), &["--seccomp", "log"]);
    assert!(daemon.wait_for_socket(), "{}", daemon.log());
    let mut blk = daemon.connect();
    for sector in [0, 8, 16] {
        let reply = blk.read(0, sector, 4096).expect("read");
        assert_eq!(reply.status, 0);
        assert_eq!(reply.data[0], pattern_byte(sector * 512));
    }
    drop(blk);
    assert!(
        daemon.wait(Duration::from_millis(200)).is_none(),
        "{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(
        log.contains("vhost-user-blk: seccomp: system call personality (135) in thread 'vring_worker' (policy blk-worker) is not in the policy; allowed (--seccomp=log)"),
        "{log}"
    );
    assert!(log.contains("test hook: personality returned 0"), "{log}");
}

#[test]
fn landlock_keeps_other_files_out_of_reach() {
    // Without seccomp's refusal of openat, what remains is Landlock's.
    let mut daemon = Hooked::start(
        "landlock",
        Some("open@blk-main=/etc/hostname"),
        &["--seccomp", "false"],
    );
    assert!(daemon.wait_for_socket(), "{}", daemon.log());
    let log = daemon.log_once("test hook: open");
    assert!(
        log.contains("vhost-user-blk: test hook: open /etc/hostname: Permission denied"),
        "{log}"
    );
    assert!(
        log.contains("warning: --seccomp=false: system calls are not filtered"),
        "{log}"
    );
    // The image itself is in the rules.
    let mut daemon = Hooked::start_with(
        "landlock-image",
        |image| Some(format!("open@blk-main={}", image.display())),
        &[],
        &["--seccomp", "false"],
    );
    assert!(daemon.wait_for_socket(), "{}", daemon.log());
    let log = daemon.log_once("test hook: open");
    assert!(log.contains("disk.img: ok"), "{log}");
}

#[test]
fn seccomp_refuses_to_open_files_even_the_image() {
    let mut daemon = Hooked::start_with(
        "refuse",
        |image| Some(format!("open@blk-main={}", image.display())),
        &[],
        &[],
    );
    assert!(daemon.wait_for_socket(), "{}", daemon.log());
    let log = daemon.log_once("test hook: open");
    // EACCES from seccomp, although Landlock would allow the image.
    assert!(log.contains("disk.img: Permission denied"), "{log}");
}

#[test]
fn the_kernel_shows_the_filter_no_new_privs_and_no_capabilities() {
    let mut daemon = Hooked::start("status", None, &[]);
    assert!(daemon.wait_for_socket(), "{}", daemon.log());
    assert_eq!(daemon.status_field("Seccomp"), "2");
    assert_eq!(daemon.status_field("NoNewPrivs"), "1");
    assert_eq!(daemon.status_field("CapEff"), "0000000000000000");
    assert_eq!(daemon.status_field("CapPrm"), "0000000000000000");
    // Root may clear its bounding set; others have nothing to drop.
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(daemon.status_field("CapBnd"), "0000000000000000");
    }
    let log = daemon.log();
    assert!(log.contains("sandbox:"), "{log}");
}

//! The sandbox in a real process: this test binary runs itself again as a child that enters a
//! role and misbehaves, and checks how the child ended and what it said.

use std::process::{Command, Output};

use cloister_seccomp::landlock::Rules;
use cloister_seccomp::{enter, init, SeccompMode, ThreadRole};

const CHILD: &str = "CLOISTER_SECCOMP_TEST_CHILD";

/// Runs `scenario` in a child process (this binary, only the `child` test).
fn run(scenario: &str) -> Output {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD, scenario);
    // A SIGSYS death would dump core where the rlimit allows it; not in a test.
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    cmd.output().expect("run the child")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The child's side: does what `scenario` says, then exits without returning to the test
/// harness (whose own system calls are not in any policy).
#[test]
fn child() {
    let Ok(scenario) = std::env::var(CHILD) else {
        return;
    };
    let mode = if scenario.starts_with("log-") {
        SeccompMode::Log
    } else {
        SeccompMode::True
    };
    init("sandbox-test", mode).unwrap();
    match scenario.as_str() {
        "true-kills" | "log-survives" => {
            enter(ThreadRole::VmmWatchdog, &Rules::new()).unwrap();
            // Not in the watchdog's policy.
            let ppid = unsafe { libc::getppid() };
            let again = unsafe { libc::getppid() };
            eprintln!("child: ppid {ppid} {again}");
        }
        "blk-refuses-open" => {
            enter(ThreadRole::BlkWorker, &Rules::new()).unwrap();
            match std::fs::File::open("/proc/self/status") {
                Ok(_) => eprintln!("open: ok"),
                Err(e) => eprintln!("open: {}", e.raw_os_error().unwrap_or(0)),
            }
        }
        "threads-in-sandbox" => {
            enter(ThreadRole::BlkMain, &Rules::new()).unwrap();
            let worker = std::thread::Builder::new()
                .name("worker".into())
                .spawn(|| {
                    enter(ThreadRole::BlkWorker, &Rules::new()).unwrap();
                    eprintln!("worker sandboxed");
                })
                .unwrap();
            worker.join().unwrap();
            eprintln!("joined");
        }
        other => panic!("unknown scenario {other}"),
    }
    std::process::exit(0);
}

#[test]
fn a_forbidden_call_is_named_and_kills_with_sigsys() {
    use std::os::unix::process::ExitStatusExt;
    let out = run("true-kills");
    let text = stderr(&out);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{text}");
    assert!(
        text.contains("sandbox-test: seccomp: forbidden system call getppid (110)"),
        "{text}"
    );
    assert!(text.contains("(policy vmm-watchdog)"), "{text}");
    assert!(!text.contains("child: ppid"), "{text}");
}

#[test]
fn log_mode_reports_once_and_makes_the_call() {
    let out = run("log-survives");
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let parent = std::process::id();
    assert!(
        text.contains(&format!("child: ppid {parent} {parent}")),
        "{text}"
    );
    assert_eq!(
        text.matches("system call getppid (110) in thread").count(),
        1,
        "{text}"
    );
    assert!(text.contains("allowed (--seccomp=log)"), "{text}");
}

#[test]
fn a_block_backend_cannot_open_files() {
    let out = run("blk-refuses-open");
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains(&format!("open: {}", libc::EACCES)), "{text}");
}

#[test]
fn threads_start_and_narrow_inside_the_sandbox() {
    let out = run("threads-in-sandbox");
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("worker sandboxed"), "{text}");
    assert!(text.contains("joined"), "{text}");
}

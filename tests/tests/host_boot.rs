//! `cloister` on this host's `/dev/kvm` with our own tiny PVH payloads (stock kernels need the
//! lab): every way a guest can end, SMP bring-up, and large memory.
//!
//! Without `/dev/kvm` these tests fail, unless `CLOISTER_SKIP_KVM=1` is set, in which case they
//! print a SKIP line and pass.

use std::path::PathBuf;
use std::time::Duration;

use harness::payload::{self, Payload, Run};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Whether KVM tests can run; panics if KVM is missing and skipping was not asked for.
fn kvm_available(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CLOISTER_SKIP_KVM").is_ok_and(|v| v == "1") {
        eprintln!("SKIP {test}: /dev/kvm is missing and CLOISTER_SKIP_KVM=1");
        return false;
    }
    panic!("/dev/kvm is missing: these tests need KVM (set CLOISTER_SKIP_KVM=1 to skip them)");
}

fn payload_path(kind: Payload) -> PathBuf {
    payload::write(kind, &payload::scratch_dir()).expect("write payload")
}

/// Boots `kind` with extra cloister arguments.
fn boot(kind: Payload, extra: &[&str]) -> Run {
    let kernel = payload_path(kind);
    let mut args = vec!["--kernel", kernel.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    payload::run_cloister(&args, TIMEOUT)
}

fn assert_clean_stderr(run: &Run) {
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("RUST_BACKTRACE"),
        "cloister panicked:\n{}",
        run.stderr
    );
}

#[test]
fn payload_boots_and_powers_off() {
    if !kvm_available("payload_boots_and_powers_off") {
        return;
    }
    let run = boot(Payload::PowerOff, &[]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, format!("{}\n", payload::MARKER_OK));
    assert_eq!(run.stderr, "", "a clean poweroff prints nothing");
}

#[test]
fn triple_fault_is_an_error() {
    if !kvm_available("triple_fault_is_an_error") {
        return;
    }
    let run = boot(Payload::TripleFault, &[]);
    assert_eq!(run.exit_code(), 1, "stderr:\n{}", run.stderr);
    assert!(run.stdout.contains(payload::MARKER_TRIPLE_FAULT));
    assert!(
        run.stderr.contains("triple fault"),
        "stderr:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("vCPU 0"), "stderr:\n{}", run.stderr);
    assert_clean_stderr(&run);
}

#[test]
fn pvpanic_is_an_error() {
    if !kvm_available("pvpanic_is_an_error") {
        return;
    }
    let run = boot(Payload::Panic, &[]);
    assert_eq!(run.exit_code(), 1, "stderr:\n{}", run.stderr);
    assert!(run.stdout.contains(payload::MARKER_PANIC));
    assert_eq!(
        run.stderr.trim_end(),
        "cloister: error: guest kernel panicked"
    );
}

#[test]
fn i8042_reset_exits_zero() {
    if !kvm_available("i8042_reset_exits_zero") {
        return;
    }
    let run = boot(Payload::I8042Reset, &[]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert!(run.stdout.contains(payload::MARKER_RESET));
    assert_eq!(
        run.stderr.trim_end(),
        "cloister: guest requested reboot; exiting"
    );
}

#[test]
fn fetch_from_nowhere_is_a_vcpu_error_not_a_silent_exit() {
    if !kvm_available("fetch_from_nowhere_is_a_vcpu_error_not_a_silent_exit") {
        return;
    }
    let run = boot(Payload::BadFetch, &[]);
    assert!(run.stdout.contains(payload::MARKER_BAD_FETCH));
    assert_ne!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.starts_with("cloister: error: vCPU 0: "),
        "stderr:\n{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "stderr:\n{}", run.stderr);
    assert_clean_stderr(&run);
}

#[test]
fn two_vcpus_boot_and_the_ap_waits_for_sipi() {
    if !kvm_available("two_vcpus_boot_and_the_ap_waits_for_sipi") {
        return;
    }
    // The AP sits in wait-for-SIPI the whole time; stopping must still be clean.
    let run = boot(Payload::PowerOff, &["--cpus", "boot=2"]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, format!("{}\n", payload::MARKER_OK));
}

#[test]
fn ap_starts_through_init_sipi() {
    if !kvm_available("ap_starts_through_init_sipi") {
        return;
    }
    let run = boot(Payload::Smp, &["--cpus", "boot=2"]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert!(
        run.stdout.contains(payload::MARKER_SMP_AP_OK),
        "stdout:\n{}",
        run.stdout
    );
}

#[test]
fn sixteen_gib_of_memory_and_four_vcpus() {
    if !kvm_available("sixteen_gib_of_memory_and_four_vcpus") {
        return;
    }
    let run = boot(
        Payload::PowerOff,
        &["--memory", "size=16G", "--cpus", "boot=4"],
    );
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, format!("{}\n", payload::MARKER_OK));
}

#[test]
fn serial_file_and_off() {
    if !kvm_available("serial_file_and_off") {
        return;
    }
    let log = payload::scratch_dir().join(format!("console-{}.log", std::process::id()));
    let arg = format!("file={}", log.display());
    let run = boot(Payload::PowerOff, &["--serial", &arg]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, "");
    let logged = std::fs::read_to_string(&log).expect("console log");
    let _ = std::fs::remove_file(&log);
    assert_eq!(logged, format!("{}\n", payload::MARKER_OK));

    let run = boot(Payload::PowerOff, &["--serial", "off"]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, "");
}

#[test]
fn sigterm_stops_a_hung_guest() {
    if !kvm_available("sigterm_stops_a_hung_guest") {
        return;
    }
    let kernel = payload_path(Payload::Hang);
    let mut child = std::process::Command::new(payload::cloister_bin())
        .args(["--kernel", kernel.to_str().expect("utf-8 path")])
        .args(["--cpus", "boot=2"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cloister");
    // Wait for the marker, so the guest is running and halted.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains(payload::MARKER_HANG) {
        let n = std::io::Read::read(&mut stdout, &mut buf).expect("read stdout");
        assert!(n > 0, "cloister exited before the marker");
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait for cloister");
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end(), "cloister: terminated by signal SIGTERM");
}

/// An initramfs whose content is a NUL-terminated line, so the payloads can print it.
fn initramfs() -> PathBuf {
    payload::write_scratch("initramfs.txt", b"CLOISTER-INITRAMFS-OK\n\0")
}

const CMDLINE: &str = "console=ttyS0 cloister.test=echo";

#[test]
fn pvh_passes_cmdline_and_initramfs() {
    if !kvm_available("pvh_passes_cmdline_and_initramfs") {
        return;
    }
    let initrd = initramfs();
    let initrd = initrd.to_str().expect("utf-8 path");
    for mem in ["size=512M", "size=16G"] {
        let run = boot(
            Payload::Echo,
            &["--cmdline", CMDLINE, "--initramfs", initrd, "--memory", mem],
        );
        assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
        assert_eq!(run.stdout, format!("{CMDLINE}\nCLOISTER-INITRAMFS-OK\n"));
    }
    // Without an initramfs there is no module.
    let run = boot(Payload::Echo, &["--cmdline", CMDLINE]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, format!("{CMDLINE}\n"));
}

#[test]
fn pvh_takes_a_command_line_of_2047_bytes() {
    if !kvm_available("pvh_takes_a_command_line_of_2047_bytes") {
        return;
    }
    let mut cmdline = String::from(CMDLINE);
    while cmdline.len() < 2047 {
        cmdline.push_str(" x");
    }
    cmdline.truncate(2047);
    let run = boot(Payload::Echo, &["--cmdline", &cmdline]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, format!("{cmdline}\n"));
}

#[test]
fn bzimage_boots_in_long_mode_with_zero_page() {
    if !kvm_available("bzimage_boots_in_long_mode_with_zero_page") {
        return;
    }
    let kernel = payload::write_bzimage(&payload::scratch_dir()).expect("write bzImage");
    let kernel = kernel.to_str().expect("utf-8 path");
    let initrd = initramfs();
    let initrd = initrd.to_str().expect("utf-8 path");
    for (mem, cpus) in [("size=512M", "boot=1"), ("size=16G", "boot=2")] {
        let run = payload::run_cloister(
            &[
                "--kernel",
                kernel,
                "--cmdline",
                CMDLINE,
                "--initramfs",
                initrd,
                "--memory",
                mem,
                "--cpus",
                cpus,
            ],
            TIMEOUT,
        );
        assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
        assert_eq!(
            run.stdout,
            format!(
                "{}\n{CMDLINE}\nCLOISTER-INITRAMFS-OK\n",
                payload::MARKER_BZIMAGE_OK
            )
        );
    }
}

#[test]
fn stdin_reaches_the_guest_uart() {
    if !kvm_available("stdin_reaches_the_guest_uart") {
        return;
    }
    let kernel = payload_path(Payload::EchoInput);
    // Several times the UART's 64-byte FIFO, so input has to wait for the guest to drain it.
    let mut line: Vec<u8> = (0..500).map(|i| b'a' + (i % 26) as u8).collect();
    line.push(b'\n');
    let run = payload::run_cloister_with_input(
        &["--kernel", kernel.to_str().expect("utf-8 path")],
        Some(&line),
        TIMEOUT,
    );
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout.as_bytes(), &line[..]);
}

/// Input that arrives in one burst, bigger than the FIFO, with stdin left open: every byte must
/// reach the guest without more input arriving to wake the pump (input read ahead into a
/// buffer that poll(2) cannot see would sit there).
#[test]
fn a_burst_of_input_reaches_the_guest_with_stdin_still_open() {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    if !kvm_available("a_burst_of_input_reaches_the_guest_with_stdin_still_open") {
        return;
    }
    let kernel = payload_path(Payload::EchoInput);
    let mut line: Vec<u8> = (0..500).map(|i| b'A' + (i % 26) as u8).collect();
    line.push(b'\n');
    let mut child = Command::new(payload::cloister_bin())
        .arg("--kernel")
        .arg(&kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cloister");
    let mut stdin = child.stdin.take().expect("stdin pipe");
    stdin.write_all(&line).expect("write the input");
    let status = payload::wait_or_kill(&mut child, TIMEOUT);
    drop(stdin);
    let mut stdout = Vec::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let echoed = String::from_utf8_lossy(&stdout);
    let status = status.unwrap_or_else(|| {
        panic!(
            "the guest never got all its input (echoed {} bytes: {echoed})",
            stdout.len()
        )
    });
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(stdout, line);
}

#[test]
fn string_and_odd_sized_port_io() {
    if !kvm_available("string_and_odd_sized_port_io") {
        return;
    }
    let run = boot(Payload::StringIo, &[]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, format!("{}\n", payload::MARKER_STRING_IO));
    assert_eq!(run.stderr, "");
}

/// Every byte of a 512 KiB console flood reaches a reader that keeps up, in order.
#[test]
fn a_console_flood_arrives_whole() {
    if !kvm_available("a_console_flood_arrives_whole") {
        return;
    }
    let run = boot(Payload::Flood, &[]);
    assert_eq!(run.exit_code(), 0, "stderr:\n{}", run.stderr);
    assert_eq!(run.stderr, "");
    let page = format!("{}\n", "x".repeat(4095));
    let expected = format!(
        "{}{}\n",
        page.repeat(payload::FLOOD_PAGES as usize),
        payload::MARKER_FLOOD_DONE
    );
    assert!(
        run.stdout == expected,
        "stdout differs ({} bytes)",
        run.stdout.len()
    );
}

/// A reader of our stdout that stops reading (a paused terminal, a pipe nobody drains) must not
/// stall the guest: the UART's output waits in a bounded buffer for its own writer thread, what
/// does not fit is dropped, and cloister says how much when the VM ends.
#[test]
fn a_stalled_stdout_does_not_stall_the_guest() {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::{Command, Stdio};

    if !kvm_available("a_stalled_stdout_does_not_stall_the_guest") {
        return;
    }
    let kernel = payload_path(Payload::Flood);
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills in two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors, owned here only.
    let (never_read, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut child = Command::new(payload::cloister_bin())
        .arg("--kernel")
        .arg(&kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cloister");
    let status = payload::wait_or_kill(&mut child, TIMEOUT);
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    drop(never_read);
    let status = status.unwrap_or_else(|| {
        panic!("the guest stalled behind its unread console (stderr: {stderr})")
    });
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains("bytes of the guest's console output were dropped"),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}

/// `cloister &` from an interactive shell: stdin is the shell's terminal, but another process
/// group owns it. Raw mode or reading stdin would stop cloister with SIGTTOU or SIGTTIN, so
/// the console must be output only, and the guest runs to its end.
#[test]
fn serial_tty_in_the_background_is_output_only() {
    use std::os::unix::process::CommandExt;

    if !kvm_available("serial_tty_in_the_background_is_output_only") {
        return;
    }
    let kernel = payload_path(Payload::PowerOff);
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty fills in two descriptors we then own; no name, termios or size.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (master, slave) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    };
    // A shell with job control, on the pty as its controlling terminal, starts cloister as a
    // background job (its own process group, not the terminal's foreground one).
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "set -m; \"$0\" \"$@\" <&0 & wait $!"])
        .arg(payload::cloister_bin())
        .args(["--kernel", kernel.to_str().expect("utf-8 path")])
        .stdin(slave)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn sh");
    // Hung (stopped by SIGTTOU/SIGTTIN): killed through the shell.
    let status = payload::wait_or_kill(&mut child, TIMEOUT);
    let out = child.wait_with_output().expect("collect output");
    drop(master);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some(),
        "cloister hung (stopped?); stderr:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n", payload::MARKER_OK)
    );
}

/// Not a test: writes every payload to `$CLOISTER_PAYLOAD_DIR` for manual runs and the lab.
/// `CLOISTER_PAYLOAD_DIR=/tmp/p cargo test -p cloister-tests --test host_boot -- --ignored`
#[test]
#[ignore]
fn write_payloads() {
    let dir =
        PathBuf::from(std::env::var_os("CLOISTER_PAYLOAD_DIR").expect("CLOISTER_PAYLOAD_DIR"));
    std::fs::create_dir_all(&dir).expect("create payload dir");
    for kind in [
        Payload::PowerOff,
        Payload::TripleFault,
        Payload::Panic,
        Payload::I8042Reset,
        Payload::Hang,
        Payload::BadFetch,
        Payload::Echo,
        Payload::EchoInput,
        Payload::Smp,
        Payload::StringIo,
        Payload::Flood,
    ] {
        let p = payload::write(kind, &dir).expect("write payload");
        eprintln!("{}", p.display());
    }
    let p = payload::write_bzimage(&dir).expect("write payload");
    eprintln!("{}", p.display());
}

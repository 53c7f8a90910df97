//! Every bad input gets a one-line error that names the option, a non-zero exit status, and
//! no panic or backtrace. None of these reach KVM, so they run anywhere.

use std::path::PathBuf;
use std::time::Duration;

use harness::payload::{self, Payload, Run};

const TIMEOUT: Duration = Duration::from_secs(30);

fn kernel() -> PathBuf {
    payload::write(Payload::PowerOff, &payload::scratch_dir()).expect("write payload")
}

fn run(args: &[&str]) -> Run {
    payload::run_cloister(args, TIMEOUT)
}

/// Runs with a valid kernel plus `args`.
fn run_with_kernel(args: &[&str]) -> Run {
    let k = kernel();
    let mut all = vec!["--kernel", k.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    run(&all)
}

/// Status 2, exactly one line on stderr in our format, naming `option` and containing `what`.
#[track_caller]
fn assert_usage_error(run: &Run, option: &str, what: &str) {
    let code = run.exit_code();
    let stderr = run.stderr.trim_end();
    assert_eq!(code, 2, "stderr:\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    assert!(
        stderr.starts_with(&format!("cloister: error: {option}")),
        "does not name {option}:\n{stderr}"
    );
    assert!(stderr.contains(what), "does not say {what:?}:\n{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"));
    assert_eq!(run.stdout, "", "a usage error must not start the guest");
}

#[test]
fn missing_kernel_file() {
    let r = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_usage_error(
        &r,
        "--kernel /nonexistent/vmlinux",
        "No such file or directory",
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let path = payload::write_scratch("not-a-kernel.txt", b"#!/bin/sh\necho hello\n");
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    assert_usage_error(&r, "--kernel", "not an ELF vmlinux or bzImage");
}

#[test]
fn kernel_that_is_a_directory() {
    let dir = payload::scratch_dir();
    let r = run(&["--kernel", dir.to_str().expect("utf-8 path")]);
    assert_usage_error(&r, "--kernel", "cannot read");
}

#[test]
fn elf_without_pvh_note() {
    // Our payload with its note's type changed from 18 (PHYS32_ENTRY) to 17.
    let mut elf = payload::build(Payload::PowerOff);
    let note_type = 0x100 + 8;
    assert_eq!(elf[note_type], 18);
    elf[note_type] = 17;
    let path = payload::write_scratch("no-pvh-note.elf", &elf);
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    // This one is found while loading, so it needs /dev/kvm to get that far.
    if std::path::Path::new("/dev/kvm").exists() {
        assert_usage_error(&r, "--kernel", "no PVH entry point");
    }
}

#[test]
fn cmdline_longer_than_the_kernel_accepts() {
    // The limit comes from the kernel (our bzImage payload says 2047 bytes), so this is found
    // while loading and needs /dev/kvm to get that far.
    if !std::path::Path::new("/dev/kvm").exists() {
        return;
    }
    let k = payload::write_bzimage(&payload::scratch_dir()).expect("write bzImage");
    let long = "x".repeat(3000);
    let r = run(&[
        "--kernel",
        k.to_str().expect("utf-8 path"),
        "--cmdline",
        &long,
    ]);
    assert_usage_error(
        &r,
        "--cmdline",
        "3000 bytes is longer than the kernel's limit of 2047",
    );
}

#[test]
fn cpus_zero() {
    let r = run_with_kernel(&["--cpus", "boot=0"]);
    assert_usage_error(&r, "--cpus boot=0", "at least 1");
}

#[test]
fn cpus_not_a_number() {
    let r = run_with_kernel(&["--cpus", "boot=x"]);
    assert_usage_error(&r, "--cpus boot=x", "not a vCPU count");
}

#[test]
fn cpus_unknown_key() {
    let r = run_with_kernel(&["--cpus", "max=4"]);
    assert_usage_error(&r, "--cpus max=4", "unknown key 'max'");
}

#[test]
fn cpus_too_many() {
    let r = run_with_kernel(&["--cpus", "boot=100000"]);
    assert_usage_error(&r, "--cpus boot=100000", "at most");
}

#[test]
fn memory_zero() {
    let r = run_with_kernel(&["--memory", "size=0"]);
    assert_usage_error(&r, "--memory size=0", "greater than 0");
}

#[test]
fn memory_beyond_the_host() {
    let r = run_with_kernel(&["--memory", "size=100T"]);
    assert_usage_error(&r, "--memory size=100T", "exceeds the host's total RAM");
}

#[test]
fn memory_not_a_size() {
    let r = run_with_kernel(&["--memory", "size=lots"]);
    assert_usage_error(&r, "--memory size=lots", "not a size");
}

#[test]
fn unknown_option() {
    let r = run_with_kernel(&["--frobnicate"]);
    // clap's own format (several lines, with a usage hint) is fine; it must name the option.
    assert_eq!(r.exit_code(), 2, "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("--frobnicate"), "stderr:\n{}", r.stderr);
    assert!(!r.stderr.contains("panicked"));
}

#[test]
fn missing_kernel_option() {
    let r = run(&[]);
    assert_eq!(r.exit_code(), 2, "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("--kernel"), "stderr:\n{}", r.stderr);
}

#[test]
fn initramfs_missing() {
    let r = run_with_kernel(&["--initramfs", "/nonexistent/initrd.cpio"]);
    assert_usage_error(&r, "--initramfs /nonexistent/initrd.cpio", "cannot open");
}

#[test]
fn initramfs_unreadable() {
    // Root can read any file regardless of its mode, so use something open(2) accepts but
    // that cannot be read as a file.
    let dir = payload::scratch_dir();
    let r = run_with_kernel(&["--initramfs", dir.to_str().expect("utf-8 path")]);
    assert_usage_error(&r, "--initramfs", "not a regular file");
}

#[test]
fn serial_bogus() {
    let r = run_with_kernel(&["--serial", "bogus"]);
    assert_usage_error(&r, "--serial bogus", "expected tty, off or file=PATH");
}

#[test]
fn serial_file_in_missing_directory() {
    let r = run_with_kernel(&["--serial", "file=/nonexistent/dir/console.log"]);
    assert_usage_error(
        &r,
        "--serial file=/nonexistent/dir/console.log",
        "cannot create",
    );
}

#[test]
fn help_and_version() {
    let r = run(&["--help"]);
    assert_eq!(r.exit_code(), 0);
    for opt in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
    ] {
        assert!(r.stdout.contains(opt), "--help lacks {opt}:\n{}", r.stdout);
    }
    let r = run(&["--version"]);
    assert_eq!(r.exit_code(), 0);
    assert!(r.stdout.starts_with("cloister "), "{}", r.stdout);
}

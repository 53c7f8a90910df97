//! Managed disk backends on this host's `/dev/kvm`, with our tiny PVH payload (the guest never
//! touches the disks; the lab's `blk` tests do): cloister starts vhost-user-blk in a private
//! runtime directory, negotiates with it, and stops it and removes the directory when the VM
//! ends; a backend that cannot start is a clear error.
//!
//! Skipped when `/dev/kvm` is missing and `CLOISTER_SKIP_KVM=1`, or when vhost-user-blk has not
//! been built next to cloister (`cargo build --workspace`).

use std::path::Path;
use std::process::{Command, Stdio};

use harness::host::{fresh_dir, image, ready};
use harness::payload::{self, Payload};

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// Runs the power-off payload with `disks`, sockets under `runtime`; (status, stdout, stderr).
fn run(runtime: &Path, disks: &[String]) -> (Option<i32>, String, String) {
    run_payload(Payload::PowerOff, runtime, disks)
}

/// Runs `kind` with `disks` (default sandbox), sockets under `runtime`.
fn run_payload(kind: Payload, runtime: &Path, disks: &[String]) -> (Option<i32>, String, String) {
    let kernel = payload::write(kind, &payload::scratch_dir()).expect("payload");
    let mut cmd = Command::new(payload::cloister_bin());
    cmd.arg("--kernel").arg(&kernel).arg("--serial").arg("tty");
    for d in disks {
        cmd.arg("--disk").arg(d);
    }
    let out = cmd
        .env("XDG_RUNTIME_DIR", runtime)
        .stdin(Stdio::null())
        .output()
        .expect("run cloister");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// No backend serving `image` outlived the VM, and its runtime directory is empty.
fn assert_nothing_left(runtime: &Path, image: &str) {
    let procs = processes_mentioning(image);
    assert!(procs.is_empty(), "backends outlived the VM: {procs:?}");
    let left: Vec<_> = std::fs::read_dir(runtime)
        .expect("read runtime dir")
        .collect();
    assert!(
        left.is_empty(),
        "runtime directory not cleaned up: {left:?}"
    );
}

#[test]
fn managed_backends_start_and_are_stopped_with_the_vm() {
    if !ready("managed_backends_start_and_are_stopped_with_the_vm") {
        return;
    }
    let dir = fresh_dir("host-disks-managed");
    let runtime = fresh_dir("host-disks-managed-run");
    let a = image(&dir, "a.img");
    let b = image(&dir, "b.img");
    let (status, stdout, stderr) = run(
        &runtime,
        &[
            format!("path={a},num_queues=2"),
            format!("path={b},readonly=on,transport=mmio,serial=b"),
        ],
    );
    assert_eq!(status, Some(0), "stderr:\n{stderr}");
    assert_eq!(stdout, format!("{}\n", payload::MARKER_OK));
    assert_eq!(stderr, "", "a clean run prints nothing");
    assert_nothing_left(&runtime, &a);
}

#[test]
fn the_guest_reads_msix_pending_bits_in_the_sandboxed_vcpu() {
    // The PBA is read on the vCPU thread, from the vectors' eventfds, under the vCPU's seccomp
    // filter; through VIRTIO_PCI_CAP_PCI_CFG so that the 32-bit payload needn't map BAR 0.
    if !ready("the_guest_reads_msix_pending_bits_in_the_sandboxed_vcpu") {
        return;
    }
    let dir = fresh_dir("host-disks-pba");
    let runtime = fresh_dir("host-disks-pba-run");
    let a = image(&dir, "a.img");
    let (status, stdout, stderr) = run_payload(Payload::PciPba, &runtime, &[format!("path={a}")]);
    assert_eq!(status, Some(0), "stderr:\n{stderr}");
    // Every vector is masked and nothing was signalled: no bit pending.
    assert_eq!(stdout, format!("{}\n", payload::MARKER_PBA_CLEAR));
    assert_eq!(stderr, "", "a clean run prints nothing");
    assert_nothing_left(&runtime, &a);
}

#[test]
fn a_backend_that_cannot_start_is_named() {
    if !ready("a_backend_that_cannot_start_is_named") {
        return;
    }
    let dir = fresh_dir("host-disks-locked");
    let runtime = fresh_dir("host-disks-locked-run");
    let a = image(&dir, "a.img");
    // Whichever backend comes second finds the image locked by the other and exits 1.
    let (status, stdout, stderr) = run(&runtime, &[format!("path={a}"), format!("path={a}")]);
    assert_eq!(status, Some(1), "stderr:\n{stderr}");
    assert_eq!(stdout, "", "the guest must not start");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        (last.starts_with("cloister: error: _disk0 (vhost-user-blk, pid ")
            || last.starts_with("cloister: error: _disk1 (vhost-user-blk, pid "))
            && last.ends_with("): the backend exited with status 1 before its socket appeared"),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"));
    assert_nothing_left(&runtime, &a);
}

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
    assert_usage_error(&r, "--kernel", "not a regular file");
}

/// A FIFO in the scratch directory, removed when dropped.
struct Fifo(PathBuf);

impl Fifo {
    fn new(name: &str) -> Self {
        let path = payload::scratch_dir().join(format!("{name}-{}.fifo", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.to_str().expect("utf-8 path")).expect("no NUL");
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        Fifo(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn kernel_that_is_a_fifo_is_refused_without_waiting_for_a_writer() {
    let fifo = Fifo::new("kernel");
    let r = run(&["--kernel", fifo.arg()]);
    assert_usage_error(&r, "--kernel", "not a regular file");
}

#[test]
fn initramfs_that_is_a_fifo_is_refused_without_waiting_for_a_writer() {
    let fifo = Fifo::new("initramfs");
    let r = run_with_kernel(&["--initramfs", fifo.arg()]);
    assert_usage_error(&r, "--initramfs", "not a regular file");
}

#[test]
fn truncated_bzimage_header() {
    let mut k = payload::build_bzimage();
    k.truncate(0x220);
    let path = payload::write_scratch("truncated-header.bzimage", &k);
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    assert_usage_error(
        &r,
        "--kernel",
        "truncated: the setup header lies past the end of the 544-byte file",
    );
}

fn kvm() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

/// Byte offset of a field of the payload's PT_LOAD program header (the second one).
fn load_phdr_field(field: usize) -> usize {
    64 + 56 + field
}

fn put_u64(f: &mut [u8], at: usize, v: u64) {
    f[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn elf_segment_past_the_end_of_ram() {
    // Found while loading, so it needs /dev/kvm to get that far.
    if !kvm() {
        return;
    }
    let mut elf = payload::build(Payload::PowerOff);
    put_u64(&mut elf, load_phdr_field(40), 1 << 30); // p_memsz: 1 GiB
    let path = payload::write_scratch("huge-memsz.elf", &elf);
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    assert_usage_error(
        &r,
        "--kernel",
        "segment at 0x100000 (0x40000000 bytes) is outside guest RAM, which ends at \
         0x20000000 (raise --memory)",
    );
    // An end that overflows is the same error, not a crash.
    put_u64(&mut elf, load_phdr_field(40), u64::MAX - 0x1000);
    let path = payload::write_scratch("overflowing-memsz.elf", &elf);
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    assert_usage_error(&r, "--kernel", "is outside guest RAM");
}

#[test]
fn elf_segment_over_the_acpi_tables() {
    if !kvm() {
        return;
    }
    let mut elf = payload::build(Payload::PowerOff);
    put_u64(&mut elf, load_phdr_field(16), 0xe_0000); // p_vaddr
    put_u64(&mut elf, load_phdr_field(24), 0xe_0000); // p_paddr
    let path = payload::write_scratch("segment-in-bios-area.elf", &elf);
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    assert_usage_error(&r, "--kernel", "overlaps the reserved legacy area");
}

#[test]
fn truncated_elf() {
    if !kvm() {
        return;
    }
    let mut elf = payload::build(Payload::PowerOff);
    elf.truncate(0x1100);
    let path = payload::write_scratch("truncated.elf", &elf);
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    assert_usage_error(
        &r,
        "--kernel",
        "truncated: a segment lies past the end of the 4352-byte file",
    );
}

#[test]
fn bzimage_with_bogus_setup_sects() {
    if !kvm() {
        return;
    }
    let mut k = payload::build_bzimage();
    k[0x1f1] = 200;
    let path = payload::write_scratch("bogus-setup-sects.bzimage", &k);
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    assert_usage_error(&r, "--kernel", "(truncated, or setup_sects is bogus)");
}

#[test]
fn bzimage_that_cannot_decompress_in_ram() {
    if !kvm() {
        return;
    }
    let mut k = payload::build_bzimage();
    k[0x260..0x264].copy_from_slice(&0x4000_0000u32.to_le_bytes()); // init_size: 1 GiB
    let path = payload::write_scratch("huge-init-size.bzimage", &k);
    let r = run(&["--kernel", path.to_str().expect("utf-8 path")]);
    assert_usage_error(
        &r,
        "--kernel",
        "decompressing needs 0x40000000 bytes from 0x100000, past guest RAM, which ends at \
         0x20000000 (raise --memory)",
    );
}

#[test]
fn initramfs_larger_than_ram() {
    if !kvm() {
        return;
    }
    // Sparse: costs no disk space.
    let path = payload::scratch_dir().join(format!("huge-initramfs-{}", std::process::id()));
    let f = std::fs::File::create(&path).expect("create");
    f.set_len(600 << 20).expect("set_len");
    let r = run_with_kernel(&["--initramfs", path.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&path);
    assert_usage_error(&r, "--initramfs", "(raise --memory)");
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
fn pvh_cmdline_longer_than_the_kernel_accepts() {
    // x86 kernels take 2047 bytes and the NUL; PVH has no header to say otherwise.
    if !kvm() {
        return;
    }
    let long = "x".repeat(2048);
    let r = run_with_kernel(&["--cmdline", &long]);
    assert_usage_error(
        &r,
        "--cmdline",
        "2048 bytes is longer than the kernel's limit of 2047",
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
        "--disk",
    ] {
        assert!(r.stdout.contains(opt), "--help lacks {opt}:\n{}", r.stdout);
    }
    let r = run(&["--version"]);
    assert_eq!(r.exit_code(), 0);
    assert!(r.stdout.starts_with("cloister "), "{}", r.stdout);
}

/// A raw image in the scratch directory, for `--disk path=` cases that get past the file check.
fn disk_image() -> String {
    let path = payload::write_scratch("cli-errors-disk.img", &[0u8; 4096]);
    path.to_str().expect("utf-8 path").to_string()
}

#[test]
fn disk_image_missing() {
    let r = run_with_kernel(&["--disk", "path=/nonexistent/disk.img"]);
    assert_usage_error(
        &r,
        "--disk path=/nonexistent/disk.img",
        "path: cannot open /nonexistent/disk.img: No such file or directory",
    );
}

#[test]
fn disk_image_is_a_directory() {
    let dir = payload::scratch_dir();
    let spec = format!("path={},readonly=on", dir.display());
    let r = run_with_kernel(&["--disk", &spec]);
    assert_usage_error(&r, "--disk path=", "is not a regular file or block device");
}

#[test]
fn disk_unknown_key() {
    let spec = format!("path={},size=1G", disk_image());
    let r = run_with_kernel(&["--disk", &spec]);
    assert_usage_error(&r, &format!("--disk {spec}"), "unknown key 'size'");
}

#[test]
fn disk_path_and_socket() {
    let spec = format!("path={},socket=/run/x.sock", disk_image());
    let r = run_with_kernel(&["--disk", &spec]);
    assert_usage_error(&r, "--disk path=", "path= and socket= cannot be combined");
}

#[test]
fn disk_bad_numbers() {
    let img = disk_image();
    for (extra, what) in [
        ("num_queues=abc", "num_queues: 'abc' is not a number"),
        ("num_queues=0", "num_queues: 0 is out of range (1 to 64)"),
        (
            "queue_size=100",
            "queue_size: 100 is not a power of two from 2 to 1024",
        ),
        ("readonly=maybe", "readonly: 'maybe' is not on or off"),
        ("transport=usb", "transport: 'usb' is not pci or mmio"),
    ] {
        let spec = format!("path={img},{extra}");
        let r = run_with_kernel(&["--disk", &spec]);
        assert_usage_error(&r, &format!("--disk {spec}"), what);
    }
}

#[test]
fn disk_socket_with_managed_only_keys() {
    let r = run_with_kernel(&["--disk", "socket=/run/x.sock,serial=abc"]);
    assert_usage_error(
        &r,
        "--disk socket=/run/x.sock,serial=abc",
        "serial= only applies when cloister starts the backend",
    );
}

#[test]
fn share_directory_missing() {
    let r = run_with_kernel(&["--fs", "tag=share,path=/nonexistent/dir"]);
    assert_usage_error(
        &r,
        "--fs tag=share,path=/nonexistent/dir",
        "path: cannot open /nonexistent/dir: No such file or directory",
    );
}

#[test]
fn duplicate_tags_and_ids() {
    let r = run_with_kernel(&[
        "--fs",
        "tag=a,socket=/run/a.sock",
        "--fs",
        "tag=a,socket=/run/b.sock",
    ]);
    assert_usage_error(
        &r,
        "--fs tag=a,socket=/run/b.sock",
        "tag=a is taken by another device",
    );
    let r = run_with_kernel(&[
        "--disk",
        "socket=/run/d.sock,id=x",
        "--fs",
        "tag=a,socket=/run/a.sock,id=x",
    ]);
    assert_usage_error(
        &r,
        "--fs tag=a,socket=/run/a.sock,id=x",
        "id 'x' is taken by another device",
    );
}

#[test]
fn net_options_name_their_problem() {
    for (value, what) in [
        ("num_queues=3", "num_queues: 3 is odd"),
        ("tap=t0,mac=01:00:00:00:00:01", "multicast"),
        ("tap=t0,mac=nonsense", "not a MAC address"),
        ("tap=t0,ip=10.0.0.300", "not an IPv4 address"),
        ("tap=t0,mask=255.255.255.0", "mask= needs ip="),
        ("tap=t0,mtu=9", "mtu: 9 is out of range"),
        ("tap=a-much-too-long-name", "not an interface name"),
        ("socket=/run/n.sock,tap=t0", "tap= only applies"),
        ("vhost_user=true", "needs socket=PATH"),
        ("vhost_mode=server", "needs socket=PATH"),
        ("socket=/run/n.sock,vhost_mode=both", "not client or server"),
        ("tap=t0,offload_tso=perhaps", "offload_tso"),
        ("tap=t0,fd=3", "unknown key 'fd'"),
    ] {
        let r = run_with_kernel(&["--net", value]);
        assert_usage_error(&r, &format!("--net {value}"), what);
    }
}

#[test]
fn new_device_options_name_their_problem() {
    for (option, value, what) in [
        ("--fs", "socket=/run/a.sock", "needs tag=TAG"),
        (
            "--generic-vhost-user",
            "device_type=rng,socket=/run/r.sock",
            "needs queue_sizes=[N,...]",
        ),
        (
            "--generic-vhost-user",
            "device_type=toaster,socket=/run/r.sock,queue_sizes=[8]",
            "not a virtio device ID",
        ),
        (
            "--vsock",
            "cid=1,socket=/tmp/v.sock",
            "cid: 1 is not a guest CID",
        ),
        (
            "--rng",
            "src=/nonexistent/entropy",
            "src: cannot open /nonexistent/entropy",
        ),
    ] {
        let r = run_with_kernel(&[option, value]);
        assert_usage_error(&r, &format!("{option} {value}"), what);
    }
}

#[test]
fn disk_problems_are_found_before_any_backend_starts() {
    // The first disk is fine and would start a backend; the second is wrong. The one line on
    // stderr (checked by assert_usage_error) shows no backend ever ran.
    let good = format!("path={}", disk_image());
    let r = run_with_kernel(&["--disk", &good, "--disk", "path=/nonexistent/b.img"]);
    assert_usage_error(
        &r,
        "--disk path=/nonexistent/b.img",
        "No such file or directory",
    );
}

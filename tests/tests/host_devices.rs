//! Devices added to and removed from a running VM, on this host's `/dev/kvm` with our tiny
//! payload (it halts; the guest never sees the devices come and go): a hundred rounds leave
//! no backend process, socket, descriptor, PCI slot or MSI vector behind, for a backend
//! cloister starts and one the operator runs. Driven by the debug-build test hook
//! (`CLOISTER_TEST_HOTPLUG`) through the hot-plug thread, under the default sandbox.
//!
//! Skipped when `/dev/kvm` is missing and `CLOISTER_SKIP_KVM=1`, or when vhost-user-blk has not
//! been built next to cloister (`cargo build --workspace`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::host::{
    backend_bin, fresh_dir, image, own_network_namespace, process_named, ready, status_field, Vm,
};
use harness::payload;

/// "name A -> B" pairs of the hook's report.
fn before_after(line: &str) -> Vec<(String, u64, u64)> {
    let report = line.split_once("rounds: ").map_or("", |(_, r)| r);
    report
        .split(", ")
        .filter_map(|item| {
            let (left, after) = item.split_once(" -> ")?;
            let (name, before) = left.rsplit_once(' ')?;
            Some((
                name.to_string(),
                before.parse().ok()?,
                after.trim().parse().ok()?,
            ))
        })
        .collect()
}

fn expect_nothing_left(line: &str, rounds: usize) {
    assert!(line.contains(&format!("{rounds} rounds")), "{line}");
    let pairs = before_after(line);
    let names: Vec<&str> = pairs.iter().map(|(n, ..)| n.as_str()).collect();
    for want in [
        "devices",
        "pci",
        "gsis",
        "backends",
        "fds",
        "sockets",
        "backend processes",
    ] {
        assert!(names.contains(&want), "no {want} in: {line}");
    }
    for (name, before, after) in pairs {
        assert_eq!(before, after, "{name} changed over {rounds} rounds: {line}");
    }
}

const ROUNDS: usize = 100;

#[test]
fn a_managed_disk_added_and_removed_100_times_leaves_nothing_behind() {
    if !ready("a_managed_disk_added_and_removed_100_times_leaves_nothing_behind") {
        return;
    }
    let dir = fresh_dir("host-devices-managed");
    let runtime = fresh_dir("host-devices-managed-run");
    let boot = image(&dir, "boot.img");
    let hot = image(&dir, "hot.img");
    let mut vm = Vm::start(
        &runtime,
        &["--disk".into(), format!("path={boot}")],
        &format!("--disk path={hot},id=hot*{ROUNDS}"),
    );
    // Its first round shows where it went: the slot after the boot disk's.
    let first = vm.wait_line("test hook: hotplug: added", Duration::from_secs(60));
    assert!(first.ends_with("added hot at 0000:00:02.0"), "{first}");
    let report = vm.wait_line("rounds:", Duration::from_secs(300));
    eprintln!("{report}");
    expect_nothing_left(&report, ROUNDS);
    assert!(report.contains("devices 1 -> 1"), "{report}");
    assert!(report.contains("backends 1 -> 1"), "{report}");
    assert_eq!(vm.stop(), Ok(143));
    // Everything went with the VM: the backends, the spawner, the runtime directory.
    assert_eq!(
        std::fs::read_dir(&runtime).expect("runtime dir").count(),
        0,
        "runtime directory not cleaned up"
    );
}

#[test]
fn an_operator_disk_added_and_removed_100_times_leaves_nothing_behind() {
    if !ready("an_operator_disk_added_and_removed_100_times_leaves_nothing_behind") {
        return;
    }
    let dir = fresh_dir("host-devices-operator");
    let runtime = fresh_dir("host-devices-operator-run");
    let img = image(&dir, "op.img");
    let socket = dir.join("op.sock");
    // The operator's backend serves one frontend at a time and listens again after each.
    let mut backend = Command::new(backend_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&img)
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start vhost-user-blk");
    let mut vm = Vm::start(
        &runtime,
        &[],
        &format!("--disk socket={}*{ROUNDS}", socket.display()),
    );
    let first = vm.wait_line("test hook: hotplug: added", Duration::from_secs(60));
    assert!(first.ends_with("added _disk0 at 0000:00:01.0"), "{first}");
    let report = vm.wait_line("rounds:", Duration::from_secs(300));
    eprintln!("{report}");
    expect_nothing_left(&report, ROUNDS);
    assert_eq!(vm.stop(), Ok(143));
    // The operator's backend is still there for the next frontend.
    assert!(backend.try_wait().expect("try_wait").is_none());
    let _ = backend.kill();
    let _ = backend.wait();
}

#[test]
fn a_managed_disk_added_to_a_vm_that_started_without_one() {
    if !ready("a_managed_disk_added_to_a_vm_that_started_without_one") {
        return;
    }
    let dir = fresh_dir("host-devices-first");
    let runtime = fresh_dir("host-devices-first-run");
    let hot = image(&dir, "hot.img");
    let mut vm = Vm::start(&runtime, &[], &format!("--disk path={hot}*3"));
    let report = vm.wait_line("rounds:", Duration::from_secs(120));
    expect_nothing_left(&report, 3);
    assert_eq!(vm.stop(), Ok(143));
}

#[test]
fn a_device_that_cannot_be_added_is_refused_and_changes_nothing() {
    if !ready("a_device_that_cannot_be_added_is_refused_and_changes_nothing") {
        return;
    }
    let runtime = fresh_dir("host-devices-refused-run");
    let mut vm = Vm::start(&runtime, &[], "--disk socket=/nonexistent/dir/blk.sock*1");
    let line = vm.wait_line("test hook: hotplug:", Duration::from_secs(60));
    assert!(
        line.contains("round 0: add: _disk0 (vhost-user-blk backend, socket /nonexistent/dir/blk.sock): socket /nonexistent/dir/blk.sock did not accept a connection within 10 s"),
        "{line}"
    );
    assert_eq!(vm.stop(), Ok(143));
}

/// The process named `name` whose command line mentions `needle`.
#[test]
fn backends_do_not_outlive_a_killed_vmm() {
    if !ready("backends_do_not_outlive_a_killed_vmm") {
        return;
    }
    let dir = fresh_dir("host-devices-killed");
    let runtime = fresh_dir("host-devices-killed-run");
    let img = image(&dir, "k.img");
    // A device added at run time too: it is the spawner's child like the boot disk.
    let hot = image(&dir, "hot.img");
    let mut vm = Vm::start(
        &runtime,
        &["--disk".into(), format!("path={img}")],
        &format!("--disk path={hot},id=hot*0"),
    );
    vm.wait_line("test hook: hotplug: added hot", Duration::from_secs(60));
    let backend = process_named("vhost-user-blk", &img).expect("the boot disk's backend");
    // SIGKILL: no clean-up of ours runs; the spawner sees its socket close.
    let _ = vm.child.kill();
    let _ = vm.child.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{backend}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        process_named("vhost-user-blk", &img).is_none(),
        "backend {backend} outlived its VM"
    );
}

#[test]
fn the_report_parser_reads_every_pair() {
    let pairs = before_after(
        "cloister: test hook: hotplug: 3 rounds: devices 1 -> 1, backend processes 2 -> 3",
    );
    assert_eq!(
        pairs,
        vec![
            ("devices".to_string(), 1, 1),
            ("backend processes".to_string(), 2, 3)
        ]
    );
}

/// Whether interface `name` exists in this thread's network namespace.
fn link_exists(name: &str) -> bool {
    std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim_start().starts_with(&format!("{name}:")))
}

#[test]
fn a_managed_nic_gets_its_tap_as_descriptors_and_no_privilege() {
    let test = "a_managed_nic_gets_its_tap_as_descriptors_and_no_privilege";
    if !ready(test) || !own_network_namespace(test) {
        return;
    }
    let runtime = fresh_dir("host-net-managed-run");
    let vm = Vm::start(
        &runtime,
        &[
            "--net".into(),
            "tap=hnet0,ip=10.99.0.1,mask=255.255.255.0,mtu=1400,num_queues=4".into(),
        ],
        "",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let backend = loop {
        // This VM's backend (its socket is in the VM's runtime directory), not another
        // test's running at the same time.
        if let Some(pid) = process_named("vhost-user-net", &runtime.to_string_lossy()) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no vhost-user-net with tap queues"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The tap, as asked, in this namespace; the backend holds its two queues.
    let tap = cloister_tap::Interface::new("hnet0").expect("socket");
    assert_eq!(tap.mtu().expect("the tap exists"), 1400);
    let cmdline = std::fs::read(format!("/proc/{backend}/cmdline")).expect("cmdline");
    let fds: Vec<String> = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .filter_map(|a| a.strip_prefix("--tap-fd=").map(str::to_owned))
        .collect();
    assert_eq!(fds.len(), 2, "{fds:?}");
    for fd in fds {
        let target = std::fs::read_link(format!("/proc/{backend}/fd/{fd}")).expect("fd");
        assert_eq!(target, Path::new("/dev/net/tun"), "descriptor {fd}");
    }
    // Once confined (it serves cloister by then: cloister connected before its sandbox).
    assert_eq!(status_field(backend, "CapEff"), "0000000000000000");
    assert_eq!(status_field(backend, "Seccomp"), "2");
    assert_eq!(vm.stop(), Ok(143));
    let deadline = Instant::now() + Duration::from_secs(15);
    while link_exists("hnet0") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!link_exists("hnet0"), "the tap outlived its VM");
}

#[test]
fn a_managed_nic_added_and_removed_20_times_leaves_nothing_behind() {
    let test = "a_managed_nic_added_and_removed_20_times_leaves_nothing_behind";
    if !ready(test) || !own_network_namespace(test) {
        return;
    }
    let runtime = fresh_dir("host-net-hotplug-run");
    let rounds = 20;
    let mut vm = Vm::start(&runtime, &[], &format!("--net tap=hnet1,id=nic*{rounds}"));
    let first = vm.wait_line("test hook: hotplug: added", Duration::from_secs(60));
    assert!(first.ends_with("added nic at 0000:00:01.0"), "{first}");
    let report = vm.wait_line("rounds:", Duration::from_secs(300));
    eprintln!("{report}");
    expect_nothing_left(&report, rounds);
    // The last backend is gone; the kernel lets go of the tap queue its send ring registered
    // a little later (from a work queue), and the tap goes with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while link_exists("hnet1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!link_exists("hnet1"), "the last round's tap is still there");
    assert_eq!(vm.stop(), Ok(143));
}

/// DPDK's `dpdk-testpmd` with a `net_vhost` port (DPDK's vhost library as the backend) on
/// `iface`, its output in `log`.
fn testpmd_vhost(iface: &str, prefix: &str, log: &Path) -> Option<Child> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("dpdk-testpmd").is_file()));
    if !found {
        return None;
    }
    let mut command = Command::new("dpdk-testpmd");
    command
        .args([
            "--no-huge",
            "-m",
            "256",
            "--no-pci",
            "--file-prefix",
            prefix,
        ])
        .arg("--vdev")
        .arg(format!("net_vhost0,iface={iface}"))
        .args([
            "--",
            "--total-num-mbufs=4096",
            "--forward-mode=icmpecho",
            "-a",
        ])
        .args(["--stats-period", "1"]);
    let out = std::fs::File::create(log).expect("log");
    let err = out.try_clone().expect("log");
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .ok()
}

fn wait_for_text(path: &Path, text: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(text)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn stop_testpmd(mut tp: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(tp.id() as libc::pid_t, libc::SIGINT) };
    let _ = payload::wait_or_kill(&mut tp, Duration::from_secs(10));
}

/// The vhost-user handshake with a third-party net backend, both ways: cloister connects to
/// DPDK's vhost library, then listens and DPDK connects (its client=1). The tiny payload never
/// drives the NIC; what is checked is that both sides take each other's connection,
/// negotiation and memory table, and cloister runs on.
#[test]
fn cloister_and_dpdk_vhost_connect_either_way() {
    let test = "cloister_and_dpdk_vhost_connect_either_way";
    if !ready(test) {
        return;
    }
    let dir = fresh_dir("host-net-dpdk");
    let runtime = fresh_dir("host-net-dpdk-run");
    let server_sock = dir.join("dpdk.sock");
    let log = dir.join("testpmd-server.log");
    let prefix = format!("cloister-test-{}", std::process::id());
    let Some(tp) = testpmd_vhost(server_sock.to_str().unwrap(), &prefix, &log) else {
        eprintln!("SKIP {test}: dpdk-testpmd is not installed (apt-get install dpdk-dev)");
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server_sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut vm = Vm::start(
        &runtime,
        &["--net".into(), format!("socket={}", server_sock.display())],
        "",
    );
    let connected = wait_for_text(&log, "new device", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let alive = vm.child.try_wait().expect("try_wait").is_none();
    let stopped = vm.stop();
    stop_testpmd(tp);
    assert!(
        connected,
        "testpmd never saw cloister: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(alive, "cloister did not run on with DPDK's backend");
    assert_eq!(stopped, Ok(143));

    // cloister listens first, DPDK connects.
    let listen_sock = dir.join("cloister.sock");
    let log = dir.join("testpmd-client.log");
    let mut vm = Vm::start(
        &runtime,
        &[
            "--net".into(),
            format!("socket={},vhost_mode=server", listen_sock.display()),
        ],
        "",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listen_sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let iface = format!("{},client=1", listen_sock.display());
    let tp = testpmd_vhost(&iface, &format!("{prefix}-c"), &log).expect("dpdk-testpmd");
    let connected = wait_for_text(&log, "new device", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let alive = vm.child.try_wait().expect("try_wait").is_none();
    let stopped = vm.stop();
    stop_testpmd(tp);
    assert!(
        connected,
        "testpmd never reached cloister: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(alive, "cloister did not run on with DPDK's backend");
    assert_eq!(stopped, Ok(143));
}

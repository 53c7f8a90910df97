//! Backends lost under a running VM, on this host's `/dev/kvm` with the halting payload: what
//! cloister does about it (notices, starts a managed backend again or finds an operator's,
//! waits without spinning, gives up on a crash loop). The payload's guest never starts the
//! devices; what a guest sees (its requests in flight taken up, its transfers intact) is tested
//! in the lab (`tests/tests/blk.rs`, `recover-*`; `tests/tests/network.rs`, `backend-killed`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::host::{
    backend_bin, fresh_dir, image, own_network_namespace, process_named, ready, status_field, Vm,
};

/// The backend whose command line names `needle`, once a frontend is connected to it (its
/// relay threads run only then).
fn connected_backend(needle: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = process_named("vhost-user-blk", needle) {
            let relaying = std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "relay-up")
                });
            if relaying {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no connected backend for {needle}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until cloister's main thread has confined itself: it has connected to its boot-time
/// backends by then, and the VM runs.
fn vm_running(vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_field(vm.child.id(), "Seccomp") != "2" {
        assert!(Instant::now() < deadline, "cloister never confined itself");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (10 s at most) for `text` in the file at `path`.
fn wait_text(path: &Path, text: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(text)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

#[test]
fn a_killed_managed_disk_backend_is_started_again() {
    let test = "a_killed_managed_disk_backend_is_started_again";
    if !ready(test) {
        return;
    }
    let dir = fresh_dir("host-recovery-managed");
    let runtime = fresh_dir("host-recovery-managed-run");
    let img = image(&dir, "m.img");
    let events = dir.join("events.jsonl");
    let mut vm = Vm::start(
        &runtime,
        &[
            "--disk".into(),
            format!("path={img},id=d0"),
            "--event-monitor".into(),
            events.display().to_string(),
        ],
        "",
    );
    vm_running(&vm);
    for round in 1..=3 {
        let backend = connected_backend(&img);
        // SAFETY: kill(2) on a process this test found by name.
        unsafe { libc::kill(backend as libc::pid_t, libc::SIGKILL) };
        let lost = vm.wait_line("waiting for the backend", Duration::from_secs(10));
        assert!(
            lost.contains("backend exited with signal 9 (SIGKILL)"),
            "{lost}"
        );
        let back = vm.wait_line("backend back after", Duration::from_secs(10));
        eprintln!("{back}");
        assert!(
            back.contains(&format!("(recovery {round} of {round})")),
            "{back}"
        );
        let again = connected_backend(&img);
        assert_ne!(again, backend, "the same process");
        // Not a crash loop: the next kill is more than a second after this recovery.
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(vm.stop(), Ok(143));
    // The event monitor says the same, one JSON object a line.
    let text = std::fs::read_to_string(&events).expect("events");
    let lost = text.matches(r#""event":"backend-lost""#).count();
    let back = text.matches(r#""event":"backend-recovered""#).count();
    assert_eq!((lost, back), (3, 3), "{text}");
    assert!(
        text.contains(
            r#""properties":{"id":"d0","reason":"backend exited with signal 9 (SIGKILL)"}"#
        ),
        "{text}"
    );
}

/// Our vhost-user-blk on `socket`, as an operator runs it, its log in `log`.
fn operator_backend(socket: &Path, img: &str, log: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(backend_bin())
        .arg("--socket")
        .arg(socket)
        .args(["--image", img])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("backend log"))
        .spawn()
        .expect("start vhost-user-blk");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket from vhost-user-blk");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn an_operator_backend_away_costs_no_cpu_and_a_crash_loop_is_given_up() {
    let test = "an_operator_backend_away_costs_no_cpu_and_a_crash_loop_is_given_up";
    if !ready(test) {
        return;
    }
    let dir = fresh_dir("host-recovery-operator");
    let runtime = fresh_dir("host-recovery-operator-run");
    let img = image(&dir, "o.img");
    let socket = dir.join("op.sock");
    let log = dir.join("op.log");
    let mut backend = operator_backend(&socket, &img, &log);
    let mut vm = Vm::start(
        &runtime,
        &[
            "--disk".into(),
            format!("socket={}", socket.display()),
            "--backend-restarts".into(),
            "3".into(),
        ],
        "",
    );
    assert!(
        wait_text(&log, "frontend connected"),
        "cloister never connected"
    );
    vm_running(&vm);
    // Away for 3 s: cloister tries again at once, then every 0.1 s doubling to 2 s, and
    // spends next to nothing meanwhile.
    let _ = backend.kill();
    let _ = backend.wait();
    vm.wait_line(
        "backend disconnected; waiting for the backend to come back",
        Duration::from_secs(10),
    );
    let vmm = vm.child.id();
    let before = cpu_ticks(vmm);
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_ticks(vmm) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        spent * 100 <= hz * 3 * 5,
        "cloister used {spent} ticks ({hz}/s) in 3 s while its backend was away"
    );
    // Back, then lost within a second, three times in a row: a crash loop, given up.
    for round in 1..=3 {
        backend = operator_backend(&socket, &img, &log);
        let back = vm.wait_line("backend back after", Duration::from_secs(10));
        assert!(
            back.contains(&format!("(recovery {round} of {round})")),
            "{back}"
        );
        std::thread::sleep(Duration::from_millis(100));
        let _ = backend.kill();
        let _ = backend.wait();
    }
    let given_up = vm.wait_line("given up", Duration::from_secs(10));
    assert!(
        given_up.contains("lost 4 times in a row within 1 s of coming back (--backend-restarts 3)"),
        "{given_up}"
    );
    // No more attempts: a backend started now is never connected to.
    backend = operator_backend(&socket, &img, &log);
    std::thread::sleep(Duration::from_millis(1500));
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !said.contains("frontend connected"),
        "cloister connected to a backend it had given up on: {said}"
    );
    let _ = backend.kill();
    let _ = backend.wait();
    assert_eq!(vm.stop(), Ok(143));
}

#[test]
fn a_backend_in_server_mode_is_listened_for_again() {
    let test = "a_backend_in_server_mode_is_listened_for_again";
    if !ready(test) || !own_network_namespace(test) {
        return;
    }
    let dir = fresh_dir("host-recovery-server");
    let runtime = fresh_dir("host-recovery-server-run");
    let socket = dir.join("sv.sock");
    let log = dir.join("sv.log");
    // Our network backend as a client of cloister's socket, on a tap of its own.
    let client = || {
        Command::new(backend_bin().with_file_name("vhost-user-net"))
            .args(["--client", "--tap", "hsrv0", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("backend log"),
            )
            .spawn()
            .expect("start vhost-user-net")
    };
    let mut backend = client();
    let mut vm = Vm::start(
        &runtime,
        &[
            "--net".into(),
            format!("socket={},vhost_mode=server", socket.display()),
        ],
        "",
    );
    assert!(
        wait_text(&log, "frontend connected"),
        "cloister never took the backend"
    );
    vm_running(&vm);
    let _ = backend.kill();
    let _ = backend.wait();
    vm.wait_line(
        "backend disconnected; waiting for the backend to come back",
        Duration::from_secs(10),
    );
    backend = client();
    let back = vm.wait_line("backend back after", Duration::from_secs(10));
    assert!(back.contains("(recovery 1 of 1)"), "{back}");
    let _ = backend.kill();
    let _ = backend.wait();
    assert_eq!(vm.stop(), Ok(143));
}

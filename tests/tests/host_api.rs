//! The REST API on this host's `/dev/kvm`, with the halting payload as the guest: the flow an
//! orchestrator follows (start with only `--api-socket`, create, boot, inspect, hot-plug a
//! disk, remove it, shut down), and requests that are wrong in every way a client can be
//! wrong, none of which may stop the VMM.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::host::{fresh_dir, image, ready};
use harness::payload::{self, Payload};
use serde_json::{json, Value};

/// cloister with only `--api-socket` (and `extra`), its stderr in a file.
struct Vmm {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, extra: &[&str]) -> Vmm {
        let socket = dir.join("api.sock");
        let log = dir.join("cloister.log");
        let child = Command::new(payload::cloister_bin())
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .args(extra)
            .env("XDG_RUNTIME_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("run cloister");
        let vmm = Vmm { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&vmm.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "no API socket after 10 s: {}",
                vmm.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on a connection of its own: (status, body).
    fn call(&self, method: &str, endpoint: &str, body: Option<&Value>) -> (u16, String) {
        let body = body.map(Value::to_string).unwrap_or_default();
        let request = format!(
            "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: \
             application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        self.raw(request.as_bytes())
    }

    /// `bytes` as they are; the reply's status and body.
    fn raw(&self, bytes: &[u8]) -> (u16, String) {
        let mut stream = UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect: {e}; cloister said: {}", self.log()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(bytes).unwrap();
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        parse_reply(&reply).unwrap_or_else(|| {
            panic!(
                "no HTTP reply to {:?}: {reply:?}; cloister said: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(80)]),
                self.log()
            )
        })
    }

    fn json(&self, method: &str, endpoint: &str, body: Option<&Value>) -> Value {
        let (status, text) = self.call(method, endpoint, body);
        assert_eq!(status, 200, "{endpoint}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{endpoint}: {e}: {text}"))
    }

    fn expect(&self, method: &str, endpoint: &str, body: Option<&Value>, status: u16) -> String {
        let (got, text) = self.call(method, endpoint, body);
        assert_eq!(got, status, "{method} {endpoint}: {text}");
        text
    }

    fn wait_exit(&mut self) -> i32 {
        let status = payload::wait_or_kill(&mut self.child, Duration::from_secs(30));
        status
            .and_then(|s| s.code())
            .unwrap_or_else(|| panic!("cloister did not exit: {}", self.log()))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_reply(reply: &str) -> Option<(u16, String)> {
    let status = reply.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// A `VmConfig` as Cloud Hypervisor's clients send it, every field given.
fn vm_config(kernel: &Path, disk: &str) -> Value {
    json!({
        "payload": {"kernel": kernel, "cmdline": "console=ttyS0", "initramfs": null,
                    "firmware": null},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "max_phys_bits": 46,
                 "topology": null, "affinity": null},
        "memory": {"size": 268435456u64, "shared": true, "hugepages": false, "mergeable": false,
                   "hotplug_method": "Acpi", "hotplug_size": null, "prefault": false,
                   "thp": true, "zones": null},
        "disks": [{"path": disk, "readonly": false, "direct": false, "iommu": false,
                   "num_queues": 1, "queue_size": 128, "vhost_user": false,
                   "vhost_socket": null, "rate_limiter_config": null, "pci_segment": 0,
                   "id": "root", "serial": null}],
        "serial": {"mode": "Null"},
        "console": {"mode": "Tty"},
        "iommu": false, "watchdog": false, "pvpanic": false, "numa": null,
        "platform": null, "rng": null, "net": null, "fs": null, "vsock": null
    })
}

#[test]
fn the_orchestrators_flow_from_an_empty_vmm_to_its_exit() {
    if !ready("the_orchestrators_flow_from_an_empty_vmm_to_its_exit") {
        return;
    }
    let dir = fresh_dir("api-flow");
    let kernel = payload::write(Payload::Hang, &dir).expect("payload");
    let root = image(&dir, "root.img");
    let hot = image(&dir, "hot.img");
    let events = dir.join("events.jsonl");
    let mut vmm = Vmm::start(&dir, &["--event-monitor", events.to_str().unwrap()]);
    let mode = std::fs::metadata(&vmm.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the API socket is the owner's alone");

    let ping = vmm.json("GET", "vmm.ping", None);
    assert_eq!(ping["pid"], json!(vmm.child.id()));
    assert!(ping["version"].is_string());
    vmm.expect("GET", "vm.info", None, 404);
    vmm.expect("PUT", "vm.boot", None, 404);

    vmm.expect("PUT", "vm.create", Some(&vm_config(&kernel, &root)), 204);
    vmm.expect("PUT", "vm.create", Some(&vm_config(&kernel, &root)), 409);
    let info = vmm.json("GET", "vm.info", None);
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["disks"][0]["path"], json!(root));
    assert_eq!(info["config"]["memory"]["size"], json!(268435456u64));

    vmm.expect("PUT", "vm.boot", None, 204);
    let info = vmm.json("GET", "vm.info", None);
    assert_eq!(info["state"], "Running", "{info}");
    let bdf = info["device_tree"]["root"]["pci_bdf"]
        .as_str()
        .unwrap_or_default();
    assert!(bdf.starts_with("0000:00:"), "{info}");

    // A disk hot-plugged by path gets a managed backend; its reply names it.
    let added = vmm.json(
        "PUT",
        "vm.add-disk",
        Some(
            &json!({"path": hot, "id": "hot", "readonly": false, "iommu": false,
                     "num_queues": 1, "queue_size": 128, "pci_segment": 0}),
        ),
    );
    assert_eq!(added["id"], "hot");
    let hot_bdf = added["bdf"].as_str().unwrap_or_default().to_string();
    assert!(hot_bdf.starts_with("0000:00:") && hot_bdf != bdf, "{added}");
    vmm.expect(
        "PUT",
        "vm.add-disk",
        Some(&json!({"path": hot, "id": "hot"})),
        409,
    );
    let info = vmm.json("GET", "vm.info", None);
    assert_eq!(info["device_tree"]["hot"]["pci_bdf"], json!(hot_bdf));
    assert_eq!(info["config"]["disks"][1]["id"], "hot", "{info}");
    let counters = vmm.json("GET", "vm.counters", None);
    assert_eq!(counters["hot"]["backend_losses"], json!(0), "{counters}");
    assert_eq!(
        counters["root"]["backend_recoveries"],
        json!(0),
        "{counters}"
    );
    // Removal asks the guest to eject the device (ACPI); this guest has no ACPI, so the disk
    // stays, as it would with Cloud Hypervisor. (The lab's Linux guest ejects it: devices.rs.)
    vmm.expect("PUT", "vm.remove-device", Some(&json!({"id": "hot"})), 204);
    vmm.expect("PUT", "vm.remove-device", Some(&json!({"id": "nope"})), 404);
    let info = vmm.json("GET", "vm.info", None);
    assert!(info["device_tree"].get("hot").is_some(), "{info}");
    vmm.expect("PUT", "vm.power-button", None, 204);

    vmm.expect("PUT", "vm.shutdown", None, 204);
    let info = vmm.json("GET", "vm.info", None);
    assert_eq!(info["state"], "Shutdown");
    vmm.expect("GET", "vm.counters", None, 405);
    let refused = vmm.expect("PUT", "vm.boot", None, 500);
    assert!(refused.contains("start a new cloister"), "{refused}");
    vmm.expect("PUT", "vmm.shutdown", None, 204);
    assert_eq!(vmm.wait_exit(), 0, "{}", vmm.log());
    assert_eq!(
        event_names(&events),
        [
            "vmm starting",
            "vm booting",
            "vm booted",
            "device added hot",
            "device ejecting hot",
            "vm power-button",
            "vm shutdown",
            "vmm shutdown"
        ]
    );
    // A VM ran, so the socket file stays (the sandbox may not remove it); the next cloister
    // on that path takes its place.
    let again = Vmm::start(&dir, &[]);
    again.expect("PUT", "vmm.shutdown", None, 204);
}

#[test]
fn a_vm_given_on_the_command_line_is_driven_by_the_api_too() {
    if !ready("a_vm_given_on_the_command_line_is_driven_by_the_api_too") {
        return;
    }
    let dir = fresh_dir("api-cli");
    let kernel = payload::write(Payload::Hang, &dir).expect("payload");
    let root = image(&dir, "root.img");
    let mut vmm = Vmm::start(
        &dir,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--serial",
            "off",
            "--disk",
            &format!("path={root},id=root"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = vmm.call("GET", "vm.info", None);
        if status == 200 && text.contains("\"Running\"") {
            let info: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(info["config"]["disks"][0]["id"], "root");
            break;
        }
        assert!(Instant::now() < deadline, "not running: {status} {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    vmm.expect("PUT", "vmm.shutdown", None, 204);
    assert_eq!(vmm.wait_exit(), 0, "{}", vmm.log());
}

#[test]
fn wrong_requests_get_named_errors_and_the_vmm_lives_on() {
    if !ready("wrong_requests_get_named_errors_and_the_vmm_lives_on") {
        return;
    }
    let dir = fresh_dir("api-bad");
    let vmm = Vmm::start(&dir, &[]);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GET /api/v1/vm.nothing HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(), 404, "no endpoint"),
        (b"GET /elsewhere HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(), 404, "no endpoint"),
        (b"PUT /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(), 405, "takes GET"),
        (b"PUT /api/v1/vm.reboot HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(), 501, "not implemented"),
        (b"\x00\x01garbage\r\n\r\n".to_vec(), 400, "malformed"),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n".to_vec(),
            413,
            "larger than",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            411,
            "Content-Length",
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nConnection: close\r\nContent-Length: 5\r\n\r\n{nope".to_vec(),
            400,
            "not JSON",
        ),
    ];
    let mut vmm = vmm;
    for (request, status, says) in &cases {
        let (got, text) = vmm.raw(request);
        assert_eq!(
            got,
            *status,
            "{:?}: {text}",
            String::from_utf8_lossy(request)
        );
        assert!(text.contains(says), "{text}");
    }
    let bad_config = |v: Value, says: &str| {
        let text = vmm.expect("PUT", "vm.create", Some(&v), 400);
        assert!(text.contains(says), "{text}");
    };
    bad_config(json!({"payload": {}}), "VmConfig.payload.kernel: required");
    bad_config(
        json!({"payload": {"kernel": "/k"}, "memory": {"size": 1 << 28, "hugepages": true}}),
        "VmConfig.memory.hugepages: not supported",
    );
    bad_config(
        json!({"payload": {"kernel": "/nonexistent"}, "disks": [{"path": "/a", "iommu": true}]}),
        "VmConfig.disks[0].iommu: not supported",
    );
    bad_config(
        json!({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 0}}),
        "--cpus boot=0",
    );
    // No VM: nothing to add to, info, or shut down.
    vmm.expect("PUT", "vm.add-disk", Some(&json!({"path": "/a"})), 404);
    vmm.expect("PUT", "vm.shutdown", None, 404);

    // A client that stops in the middle of its request, and one that never sends: neither
    // holds the VMM, which serves the next client once they are dropped.
    {
        let mut half = UnixStream::connect(&vmm.socket).unwrap();
        half.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
            .unwrap();
    }
    let _silent = UnixStream::connect(&vmm.socket).unwrap();
    let asked = Instant::now();
    let ping = vmm.json("GET", "vmm.ping", None);
    assert!(ping["pid"].is_number());
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "a silent client held the API for {:?}",
        asked.elapsed()
    );
    let log = vmm.log();
    assert!(!log.contains("panicked"), "{log}");
    // No VM ran: cloister removes its socket on the way out.
    vmm.expect("PUT", "vmm.shutdown", None, 204);
    assert_eq!(vmm.wait_exit(), 0, "{}", vmm.log());
    assert!(!vmm.socket.exists(), "the API socket outlived cloister");
}

#[test]
fn a_wrong_api_socket_is_named() {
    let dir = fresh_dir("api-wrong");
    let cases = [
        (
            format!("path={}/no/such/dir/api.sock", dir.display()),
            "cannot listen there",
        ),
        ("fd=x".to_string(), "'x' is not a descriptor number"),
        ("fd=0".to_string(), "not a Unix socket"),
    ];
    for (value, says) in cases {
        let run = payload::run_cloister(&["--api-socket", &value], Duration::from_secs(10));
        assert_eq!(run.exit_code(), 2, "{value}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("--api-socket {value}: ")) && run.stderr.contains(says),
            "{value}: {}",
            run.stderr
        );
    }
    for (value, says) in [
        (
            "fd=x",
            "--event-monitor fd=x: 'x' is not a descriptor number",
        ),
        (
            "fd=999",
            "--event-monitor fd=999: descriptor 999 is not open",
        ),
        (
            "/no/such/dir/events",
            "--event-monitor /no/such/dir/events: cannot open",
        ),
    ] {
        let socket = dir.join("ev.sock");
        let run = payload::run_cloister(
            &[
                "--api-socket",
                socket.to_str().unwrap(),
                "--event-monitor",
                value,
            ],
            Duration::from_secs(10),
        );
        assert_eq!(run.exit_code(), 2, "{value}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{value}: {}", run.stderr);
    }
    let plain = dir.join("a-file");
    std::fs::write(&plain, b"mine").unwrap();
    let run = payload::run_cloister(
        &["--api-socket", plain.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(run.exit_code(), 2, "{}", run.stderr);
    assert!(run.stderr.contains("not a socket"), "{}", run.stderr);
    assert_eq!(std::fs::read(&plain).unwrap(), b"mine");
}

/// The events in an `--event-monitor` file, as "SOURCE EVENT [ID]"; each line must be a JSON
/// object with a timestamp.
fn event_names(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("event file");
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(v["timestamp"]["secs"].is_u64(), "{line}");
            let mut name = format!(
                "{} {}",
                v["source"].as_str().unwrap(),
                v["event"].as_str().unwrap()
            );
            if let Some(id) = v["properties"]["id"].as_str() {
                name.push(' ');
                name.push_str(id);
            }
            name
        })
        .collect()
}

/// `cloister-remote`, built next to cloister.
fn remote_bin() -> PathBuf {
    let cloister = payload::cloister_bin();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args([
        "build",
        "--quiet",
        "-p",
        "cloister",
        "--bin",
        "cloister-remote",
    ]);
    if cloister.parent().and_then(Path::file_name) == Some("release".as_ref()) {
        build.arg("--release");
    }
    assert!(build.status().expect("run cargo").success());
    cloister.with_file_name("cloister-remote")
}

/// `cloister-remote --api-socket SOCKET args…`: (exit code, stdout, stderr).
fn remote(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(remote_bin())
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run cloister-remote");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cloister_remote_speaks_ch_remotes_verbs() {
    if !ready("cloister_remote_speaks_ch_remotes_verbs") {
        return;
    }
    let dir = fresh_dir("api-remote");
    let kernel = payload::write(Payload::Hang, &dir).expect("payload");
    let root = image(&dir, "root.img");
    let hot = image(&dir, "hot.img");
    let config = dir.join("vm.json");
    std::fs::write(&config, vm_config(&kernel, &root).to_string()).unwrap();
    let mut vmm = Vmm::start(&dir, &[]);
    let socket = vmm.socket.clone();
    let ok = |args: &[&str]| {
        let (code, out, err) = remote(&socket, args);
        assert_eq!(code, 0, "cloister-remote {args:?}: {err}");
        out
    };
    let ping: Value = serde_json::from_str(&ok(&["ping"])).unwrap();
    assert_eq!(ping["pid"], json!(vmm.child.id()));
    ok(&["create", config.to_str().unwrap()]);
    ok(&["boot"]);
    let added: Value = serde_json::from_str(&ok(&[
        "add-disk",
        &format!("path={hot},readonly=on,id=hot"),
    ]))
    .unwrap();
    assert_eq!(added["id"], "hot");
    let info: Value = serde_json::from_str(&ok(&["info"])).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(
        info["config"]["disks"][1]["readonly"],
        json!(true),
        "{info}"
    );
    let counters: Value = serde_json::from_str(&ok(&["counters"])).unwrap();
    assert!(counters.get("hot").is_some(), "{counters}");
    ok(&["remove-device", "hot"]);
    ok(&["power-button"]);
    let (code, _, err) = remote(&socket, &["remove-device", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("vm.remove-device: HTTP 404: no device with id 'nope'"),
        "{err}"
    );
    let (code, _, err) = remote(&socket, &["add-disk", "path=/x,iommu=on"]);
    assert_eq!(code, 1);
    assert!(err.contains("HTTP 400"), "{err}");
    ok(&["pause"]);
    assert_eq!(
        serde_json::from_str::<Value>(&ok(&["info"])).unwrap()["state"],
        "Paused"
    );
    ok(&["resume"]);
    let (code, _, err) = remote(&socket, &["reboot"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTP 501: vm.reboot is not implemented"),
        "{err}"
    );
    ok(&["shutdown-vmm"]);
    assert_eq!(vmm.wait_exit(), 0, "{}", vmm.log());
    let (code, _, err) = remote(&socket, &["ping"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot connect to"), "{err}");
}

/// The dword at guest physical address `gpa` of cloister `pid`'s guest, read through
/// /proc/PID/mem at the low RAM mapping of its guest-memory memfd; 0 until that exists.
fn guest_u32(pid: u32, gpa: u64) -> u32 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    if !maps.contains("cloister-guest-ram") {
        return 0;
    }
    let start = maps
        .lines()
        .find(|l| {
            l.contains("cloister-guest-ram") && l.split_whitespace().nth(2) == Some("00000000")
        })
        .and_then(|l| l.split('-').next())
        .and_then(|a| u64::from_str_radix(a, 16).ok())
        .unwrap_or_else(|| panic!("no guest RAM mapping in:\n{maps}"));
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut bytes = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, start + gpa)
        .expect("read guest memory");
    u32::from_le_bytes(bytes)
}

#[test]
fn a_paused_vm_runs_nothing_and_its_memory_stays_as_it_was() {
    if !ready("a_paused_vm_runs_nothing_and_its_memory_stays_as_it_was") {
        return;
    }
    let dir = fresh_dir("api-pause");
    let kernel = payload::write(Payload::Spin, &dir).expect("payload");
    let root = image(&dir, "root.img");
    let events = dir.join("events.jsonl");
    let mut vmm = Vmm::start(
        &dir,
        &[
            "--event-monitor",
            &format!("path={}", events.display()),
            "--kernel",
            kernel.to_str().unwrap(),
            "--serial",
            "off",
            "--cpus",
            "boot=2",
            "--disk",
            &format!("path={root}"),
        ],
    );
    let pid = vmm.child.id();
    let counter = || guest_u32(pid, payload::SPIN_COUNTER);
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter() == 0 {
        assert!(
            Instant::now() < deadline,
            "the guest never counted: {}",
            vmm.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vmm.expect("PUT", "vm.resume", None, 405);
    for round in 0..3 {
        vmm.expect("PUT", "vm.pause", None, 204);
        assert_eq!(vmm.json("GET", "vm.info", None)["state"], "Paused");
        vmm.expect("PUT", "vm.pause", None, 405);
        let paused = counter();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            counter(),
            paused,
            "round {round}: the guest ran while paused"
        );
        vmm.expect("PUT", "vm.resume", None, 204);
        assert_eq!(vmm.json("GET", "vm.info", None)["state"], "Running");
        let deadline = Instant::now() + Duration::from_secs(5);
        while counter() == paused {
            assert!(
                Instant::now() < deadline,
                "round {round}: the guest did not resume"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Paused, it still stops on request.
    vmm.expect("PUT", "vm.pause", None, 204);
    vmm.expect("PUT", "vmm.shutdown", None, 204);
    assert_eq!(vmm.wait_exit(), 0, "{}", vmm.log());
    let names = event_names(&events);
    let round = ["vm pausing", "vm paused", "vm resuming", "vm resumed"];
    let mut want = vec!["vmm starting", "vm booting", "vm booted"];
    for _ in 0..3 {
        want.extend(round);
    }
    want.extend(["vm pausing", "vm paused", "vm shutdown", "vmm shutdown"]);
    assert_eq!(names, want);
}

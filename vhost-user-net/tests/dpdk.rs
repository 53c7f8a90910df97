//! A third-party frontend: DPDK's `dpdk-testpmd` with a `net_virtio_user` port drives our
//! backend natively, sending (txonly) and receiving (rxonly) through the tap. Skipped, loudly,
//! where `dpdk-testpmd` is not installed (Debian's `dpdk-dev`; `scripts/install-deps.sh`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const TESTPMD: &str = "dpdk-testpmd";

fn testpmd_available(test: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(TESTPMD).is_file()));
    if !found {
        eprintln!("SKIPPED {test}: {TESTPMD} is not installed (apt-get install dpdk-dev)");
    }
    found
}

/// Runs testpmd in `mode` against `socket` with `pairs` queue pairs for `seconds`, while
/// `during` runs; returns testpmd's (RX-packets, TX-packets) and its output.
fn testpmd(
    socket: &Path,
    pairs: usize,
    mode: &str,
    seconds: u64,
    during: impl FnOnce(),
) -> (u64, u64, String) {
    let vdev = format!(
        "net_virtio_user0,path={},queues={pairs},queue_size=256",
        socket.display()
    );
    // One at a time: two testpmd instances polling on a 2-CPU machine starve each other.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let prefix = format!("cloister-{}-{mode}", std::process::id());
    let log = socket.with_extension(format!("{mode}.log"));
    let out = std::fs::File::create(&log).expect("testpmd log");
    let err = out.try_clone().expect("testpmd log");
    let mut child = Command::new("timeout")
        .args(["-s", "INT", &seconds.to_string(), TESTPMD])
        .args([
            "--no-huge",
            "-m",
            "256",
            "--no-pci",
            "--file-prefix",
            &prefix,
        ])
        .args(["--vdev", &vdev, "--"])
        .args(["--total-num-mbufs=8192", "-a", "--stats-period", "1"])
        .arg(format!("--forward-mode={mode}"))
        .arg(format!("--rxq={pairs}"))
        .arg(format!("--txq={pairs}"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start dpdk-testpmd");
    // The caller's traffic once testpmd forwards (its first statistics come a second after).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("Port statistics"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    during();
    child.wait().expect("wait for dpdk-testpmd");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let total = text
        .split("Accumulated forward statistics")
        .nth(1)
        .unwrap_or_else(|| panic!("no statistics from testpmd:\n{text}"));
    let count = |key: &str| -> u64 {
        total
            .split(key)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (count("RX-packets:"), count("TX-packets:"), text)
}

/// The tap's counters in this thread's network namespace: (rx packets, tx packets).
fn tap_counters() -> (u64, u64) {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{TAP}:")))
        .unwrap_or_else(|| panic!("no {TAP} in /proc/thread-self/net/dev:\n{dev}"));
    let fields: Vec<u64> = line
        .split_once(':')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (
        fields.get(1).copied().unwrap_or(0),
        fields.get(9).copied().unwrap_or(0),
    )
}

#[test]
fn testpmd_sends_through_our_backend_to_the_tap() {
    let test = "testpmd_sends_through_our_backend_to_the_tap";
    if !testpmd_available(test) || !own_network_namespace(test) {
        return;
    }
    let daemon = Daemon::start("testpmd-tx", &["--queues", "2"]);
    let before = tap_counters().0;
    let (_, sent, text) = testpmd(&daemon.socket, 2, "txonly", 8, || {
        std::thread::sleep(Duration::from_secs(3))
    });
    let reached = tap_counters().0 - before;
    assert!(sent > 10_000, "testpmd sent only {sent} frames:\n{text}");
    // What testpmd counts as sent is what it put in the rings: when it stops, up to a ring's
    // worth per queue may not have been taken yet.
    let in_rings = 2 * 256;
    assert!(
        reached + in_rings >= sent,
        "testpmd sent {sent} frames, the tap got {reached}:\n{}",
        daemon.log_text()
    );
}

#[test]
fn testpmd_receives_through_our_backend_from_the_tap() {
    let test = "testpmd_receives_through_our_backend_from_the_tap";
    if !testpmd_available(test) || !own_network_namespace(test) {
        return;
    }
    let daemon = Daemon::start("testpmd-rx", &["--queues", "2"]);
    let host = HostSide::open(TAP);
    let frames = 2000;
    let (received, _, text) = testpmd(&daemon.socket, 2, "rxonly", 8, || {
        // In batches the tap's queue (1000 frames) holds, each once the backend has read the
        // one before (the tap's transmit counter), so none is dropped on a busy machine.
        let start = tap_counters().1;
        for batch in 0..frames / 100 {
            for i in 0..100 {
                host.send(&test_frame([0xff; 6], PEER_MAC, 64, batch * 100 + i));
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while tap_counters().1 - start < (batch + 1) * 100
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    assert!(
        received >= frames,
        "testpmd received {received} of {frames} frames:\n{text}\n{}",
        daemon.log_text()
    );
}

//! Busy-polling of the queues: a polling worker takes requests without being kicked, its
//! window closes when the guest goes quiet (an idle disk costs no CPU), and the control thread
//! still gets the worker's queue while it polls.

mod common;

use std::time::{Duration, Instant};

use cloister_backends::test_frontend::blk::*;
use common::*;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const REQUESTS: u64 = 400;

/// Back-to-back 4 KiB reads, one at a time; returns how many kicks the driver had to send.
fn reads_one_at_a_time(blk: &mut TestBlk) -> u64 {
    let before = blk.queue(0).kicks;
    for i in 0..REQUESTS {
        let reply = blk.read(0, (i * 8) % 2048, 4096).unwrap();
        assert_eq!(reply.status, OK);
    }
    blk.queue(0).kicks - before
}

/// utime + stime of the whole process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_polling_worker_needs_no_kicks_and_an_idle_one_no_cpu() {
    // A 10 ms window: whatever the machine's load, the driver's next request comes within it.
    let mut daemon = Daemon::start("poll-kicks", &["--poll-max-us", "10000"]);
    let mut blk = daemon.connect(1);
    let kicks = reads_one_at_a_time(&mut blk);
    // The window starts closed and opens over the first few requests; after that the worker
    // sees each request while it polls, with avail_event left behind, so the driver doesn't
    // kick.
    assert!(
        kicks <= REQUESTS / 4,
        "{kicks} kicks for {REQUESTS} requests: the worker did not poll"
    );

    // Quiet now: at most one window of spinning, then the worker sleeps.
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(daemon.pid()) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        spent * 100 <= hz * 3,
        "an idle backend used {spent} ticks ({hz}/s) in 1 s"
    );

    // And it wakes up again on a kick.
    assert_eq!(blk.read(0, 0, 4096).unwrap().status, OK);
    daemon.assert_serves();
}

#[test]
fn a_polling_worker_is_not_kicked_after_sleeping_on_direct_io() {
    // Each O_DIRECT read is in flight when the worker sleeps, so it re-arms notifications
    // first; once the read completes and it polls for the next one, the driver must not kick.
    let daemon = Daemon::start("poll-direct", &["--direct", "--poll-max-us", "10000"]);
    let mut blk = daemon.connect(1);
    let kicks = reads_one_at_a_time(&mut blk);
    assert!(
        kicks <= REQUESTS / 4,
        "{kicks} kicks for {REQUESTS} requests: kicks were not suppressed while polling"
    );
}

#[test]
fn without_polling_every_request_is_kicked() {
    let daemon = Daemon::start("poll-off", &["--poll-max-us", "0"]);
    let mut blk = daemon.connect(1);
    // Nearly every one: a request the driver adds while the worker is still re-arming is
    // picked up by the worker's look after re-arming, without a kick.
    let kicks = reads_one_at_a_time(&mut blk);
    assert!(
        kicks >= REQUESTS * 9 / 10,
        "{kicks} kicks for {REQUESTS} requests"
    );
}

#[test]
fn a_queue_is_stopped_while_its_worker_polls() {
    let daemon = Daemon::start("poll-stop", &["--poll-max-us", "10000"]);
    let mut blk = daemon.connect(1);
    let kicks = reads_one_at_a_time(&mut blk);
    assert!(kicks < REQUESTS, "the worker never polled");
    // The worker is spinning in its window (10 ms) right now; GET_VRING_BASE must get the
    // queue from it, with every request accounted for.
    let asked = Instant::now();
    let base = blk.connection().stop_queue(0).unwrap();
    assert_eq!(u64::from(base), REQUESTS);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "GET_VRING_BASE took {:?}",
        asked.elapsed()
    );
    drop(blk);
    let mut blk = daemon.connect(1);
    assert_eq!(blk.read(0, 8, 4096).unwrap().status, OK);
}

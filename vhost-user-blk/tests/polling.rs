//! Busy-polling of the queues: a polling worker holds off the driver's kicks (avail_event one
//! behind the ring) until it sleeps, an idle one costs no CPU, and the control thread still gets
//! the worker's queue while it polls.
//!
//! The checks look at avail_event a while after each completion rather than at kick totals:
//! whether a driver kicks also depends on how soon the worker gets the CPU back, which a busy
//! machine changes in either direction.

mod common;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cloister_backends::test_frontend::blk::*;
use common::*;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Longer than any pause below, so a polling worker is still polling when the test looks.
const WINDOW: &str = "10000";
const PAUSE: Duration = Duration::from_millis(1);
/// Paused reads that open the window: it doubles per wait from 4 µs up to one that covers the
/// pause (about 9 waits).
const WARM_UP: u32 = 15;
const SAMPLES: u32 = 20;

/// One test at a time: a test's daemon spinning on one of the 2 CPUs would slow the others.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What `count` reads, one at a time with a pause after each, showed.
#[derive(Debug, Default)]
struct Seen {
    /// avail_event one behind the ring after the pause: the worker was polling, and the
    /// driver's next request would not kick it.
    polling: u32,
    /// avail_event at the ring: the worker had re-armed notifications and gone to sleep.
    armed: u32,
    kicks: u64,
}

fn paused_reads(blk: &mut TestBlk, done_before: &mut u16, count: u32) -> Seen {
    let mut seen = Seen::default();
    let kicks_before = blk.queue(0).kicks;
    for i in 0..count {
        let reply = blk.read(0, u64::from(i % 256) * 8, 4096).unwrap();
        assert_eq!(reply.status, OK);
        *done_before = done_before.wrapping_add(1);
        std::thread::sleep(PAUSE);
        let avail_event = blk.queue(0).device_avail_event().unwrap();
        if avail_event == done_before.wrapping_sub(1) {
            seen.polling += 1;
        } else if avail_event == *done_before {
            seen.armed += 1;
        }
    }
    seen.kicks = blk.queue(0).kicks - kicks_before;
    seen
}

/// `rounds` times, 8 reads in flight on each of `queues` queues at once.
fn concurrent_reads(blk: &mut TestBlk, queues: usize, rounds: u32) {
    const DEPTH: u64 = 8;
    let mut slots = Vec::new();
    for queue in 0..queues {
        for i in 0..DEPTH {
            let sector = (queue as u64 * DEPTH + i) * 8;
            slots.push((queue, Slot::new(blk, VIRTIO_BLK_T_IN, sector, 4096)));
        }
    }
    for _ in 0..rounds {
        for (queue, slot) in &slots {
            slot.add(blk, *queue);
        }
        for queue in 0..queues {
            blk.queue(queue).notify().unwrap();
        }
        for queue in 0..queues {
            for _ in 0..DEPTH {
                blk.queue(queue).wait_used(Duration::from_secs(5)).unwrap();
            }
        }
        for (_, slot) in &slots {
            assert_eq!(slot.status(blk), OK);
        }
    }
}

/// A polling worker: after warming up, nearly every sample finds it polling, and the requests
/// that follow them are not kicked.
fn assert_polls(blk: &mut TestBlk) {
    let mut done = 0;
    paused_reads(blk, &mut done, WARM_UP);
    let seen = paused_reads(blk, &mut done, SAMPLES);
    assert!(
        seen.polling >= SAMPLES * 3 / 4 && seen.kicks <= u64::from(SAMPLES / 4),
        "the worker did not hold off kicks while polling: {seen:?} of {SAMPLES}"
    );
}

#[test]
fn a_polling_worker_holds_off_kicks_and_an_idle_one_costs_no_cpu() {
    let _alone = one_at_a_time();
    let mut daemon = Daemon::start("poll", &["--poll-max-us", WINDOW]);
    let mut blk = daemon.connect(1);
    assert_polls(&mut blk);

    // Quiet now: at most one window of spinning, then the worker sleeps.
    assert_goes_idle(&daemon, "an idle backend");

    // And a kick wakes it again.
    assert_eq!(blk.read(0, 0, 4096).unwrap().status, OK);
    daemon.assert_serves();
}

#[test]
fn a_polling_queue_does_not_hold_up_another_on_its_thread() {
    // Queues 0 and 1 share one thread. Queue 0's worker polls for up to a few milliseconds
    // after each of its reads; a read on queue 1 meanwhile must not wait for that poll to end.
    let _alone = one_at_a_time();
    let daemon = Daemon::start(
        "poll-shared",
        &["--queues", "2", "--threads", "1", "--poll-max-us", WINDOW],
    );
    let mut blk = daemon.connect(2);
    let mut done = 0;
    paused_reads(&mut blk, &mut done, WARM_UP);
    let mut waits = Vec::new();
    let mut polling = 0;
    for i in 0..SAMPLES {
        assert_eq!(blk.read(0, u64::from(i) * 8, 4096).unwrap().status, OK);
        done = done.wrapping_add(1);
        std::thread::sleep(PAUSE / 10);
        // Queue 0's window covers the pauses: it is polling now, and a read that had to wait
        // for that poll to end would take about a pause.
        if blk.queue(0).device_avail_event().unwrap() == done.wrapping_sub(1) {
            polling += 1;
        }
        let asked = Instant::now();
        assert_eq!(blk.read(1, u64::from(i) * 8, 4096).unwrap().status, OK);
        waits.push(asked.elapsed());
        std::thread::sleep(PAUSE);
    }
    assert!(
        polling >= SAMPLES / 2,
        "queue 0 polled in only {polling} of {SAMPLES} samples: the test shows nothing"
    );
    waits.sort();
    let median = waits[waits.len() / 2];
    assert!(
        median < PAUSE / 2,
        "queue 1 waited for queue 0's poll: median {median:?}, all {waits:?}"
    );

    // Both queues busy at once (each finds the other's events waiting), then quiet: the two
    // must not keep handing the thread to each other.
    concurrent_reads(&mut blk, 2, 200);
    assert_goes_idle(&daemon, "an idle backend with a shared thread");
}

#[test]
fn a_polling_worker_holds_off_kicks_after_sleeping_on_direct_io() {
    // Each O_DIRECT read is in flight when the worker sleeps, so it re-arms notifications
    // first; once the read completes and it polls for the next one it must move avail_event
    // back, or the driver kicks it anyway.
    let _alone = one_at_a_time();
    let daemon = Daemon::start("poll-direct", &["--direct", "--poll-max-us", WINDOW]);
    let mut blk = daemon.connect(1);
    assert_polls(&mut blk);
}

#[test]
fn without_polling_the_worker_rearms_and_is_kicked() {
    let _alone = one_at_a_time();
    let daemon = Daemon::start("poll-off", &["--poll-max-us", "0"]);
    let mut blk = daemon.connect(1);
    let mut done = 0;
    let seen = paused_reads(&mut blk, &mut done, WARM_UP + SAMPLES);
    assert!(
        seen.armed >= (WARM_UP + SAMPLES) * 3 / 4 && seen.kicks >= u64::from(SAMPLES),
        "the worker did not re-arm and sleep: {seen:?} of {}",
        WARM_UP + SAMPLES
    );
}

#[test]
fn a_queue_is_stopped_while_its_worker_polls() {
    let _alone = one_at_a_time();
    let daemon = Daemon::start("poll-stop", &["--poll-max-us", WINDOW]);
    let mut blk = daemon.connect(1);
    let mut done = 0;
    paused_reads(&mut blk, &mut done, WARM_UP);
    assert_eq!(blk.read(0, 0, 4096).unwrap().status, OK);
    // The worker is spinning in its window right now; GET_VRING_BASE must get the queue from
    // it, with every request accounted for.
    let asked = Instant::now();
    let base = blk.connection().stop_queue(0).unwrap();
    assert_eq!(base, u32::from(done) + 1);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "GET_VRING_BASE took {:?}",
        asked.elapsed()
    );
    drop(blk);
    let mut blk = daemon.connect(1);
    assert_eq!(blk.read(0, 8, 4096).unwrap().status, OK);
}

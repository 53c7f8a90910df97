//! Early returns: buffered reads complete inside their submission, and with a CPU to spare for
//! the guest the worker returns them a few at a time rather than after the whole ring.
//!
//! These checks look at timing, so they live in their own test binary (cargo runs binaries one
//! after another) and run one at a time: beside other tests on a 2-CPU machine the backend
//! may not get its spare CPU at all.

mod common;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cloister_backends::test_frontend::blk::*;
use common::*;
use vm_memory::Bytes;

const OK: u8 = VIRTIO_BLK_S_OK as u8;

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Buffered reads complete inside their submission; with a CPU to spare for the guest, the
/// worker returns them every 4 requests or 128 KiB instead of after the whole ring, so the
/// guest gets the first while the worker copies the rest.
#[test]
fn large_buffered_reads_come_back_before_the_whole_batch() {
    assert_reads_come_back_early(
        "large_buffered_reads_come_back_before_the_whole_batch",
        12,
        1 << 20,
    );
}

#[test]
fn small_buffered_reads_come_back_before_the_whole_batch() {
    // The early returns count requests too: 80 reads of 1 KiB stay below the 128 KiB share of
    // data, yet go back a few at a time. (3 descriptors each: 240 of the ring's 256.)
    assert_reads_come_back_early(
        "small_buffered_reads_come_back_before_the_whole_batch",
        80,
        1024,
    );
}

/// `requests` reads of `len` bytes each from the page cache, all in the ring at once: on at
/// least one of 20 tries (other tests may keep this thread off the CPU), the first interrupt
/// must find fewer than all of them returned (the backend has a CPU to spare, so it returns
/// finished requests while it copies the rest).
fn assert_reads_come_back_early(test: &str, requests: u64, len: u32) {
    let _alone = one_at_a_time();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("SKIPPED {test}: needs 2 CPUs, this host offers {cpus}");
        return;
    }
    let daemon = Daemon::start("early-returns", &[]);
    let mut blk = daemon.connect(1);
    let slots: Vec<Slot> = (0..requests)
        .map(|i| Slot::new(&blk, VIRTIO_BLK_T_IN, i * u64::from(len) / 512, len))
        .collect();
    let mut first_wake = Vec::new();
    for _ in 0..20 {
        // All of it in the page cache, so every read is a copy inside its submission.
        std::fs::read(&daemon.image).unwrap();
        assert!(!blk.queue(0).enable_interrupts().unwrap());
        for slot in &slots {
            slot.add(&mut blk, 0);
        }
        let queue = blk.queue(0);
        queue.notify().unwrap();
        assert!(
            queue.wait_call(Duration::from_secs(5)).unwrap(),
            "no interrupt"
        );
        let mut returned = 0;
        while queue.pop_used().unwrap().is_some() {
            returned += 1;
        }
        first_wake.push(returned);
        while returned < requests {
            queue.wait_used(Duration::from_secs(5)).unwrap();
            returned += 1;
        }
        for (i, slot) in slots.iter().enumerate() {
            assert_eq!(slot.status(&blk), OK);
            let mut got = vec![0u8; len.min(4096) as usize];
            blk.ram().memory().read_slice(&mut got, slot.data).unwrap();
            let offset = i as u64 * u64::from(len);
            assert!(got
                .iter()
                .enumerate()
                .all(|(j, &b)| b == pattern_byte(offset + j as u64)));
        }
        if first_wake.last().is_some_and(|&n| n < requests) {
            return;
        }
    }
    panic!("every batch of {requests} reads of {len} bytes came back at once: {first_wake:?} at the first interrupt");
}

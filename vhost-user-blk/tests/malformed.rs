//! Hostile or broken descriptor chains: each gets an error status or is dropped, and the
//! device keeps serving the next request.

mod common;

use std::time::Duration;

use cloister_backends::test_frontend::blk::*;
use cloister_backends::test_frontend::Buffer;
use common::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// A good read must still work, and the daemon must be alive.
fn still_serves(daemon: &mut Daemon, blk: &mut TestBlk) {
    daemon.assert_serves();
    let reply = blk.read(0, 0, 4096).unwrap();
    assert_eq!(
        reply.status,
        OK,
        "device stopped serving: {}",
        daemon.log_text()
    );
    assert_eq!(reply.data, read_file_range(&daemon.image, 0, 4096));
}

fn prepare_header(
    blk: &TestBlk,
    kind: u32,
    sector: u64,
) -> (GuestAddress, GuestAddress, GuestAddress) {
    let (header_addr, data, status) = blk.buffers();
    let mem = blk.ram().memory();
    mem.write_slice(&header(kind, sector), header_addr).unwrap();
    mem.write_obj(STATUS_UNTOUCHED, status).unwrap();
    (header_addr, data, status)
}

fn status(blk: &TestBlk, at: GuestAddress) -> u8 {
    blk.ram().memory().read_obj(at).unwrap()
}

#[test]
fn data_outside_guest_memory_is_an_error() {
    let mut daemon = Daemon::start("outside", &[]);
    let mut blk = daemon.connect(1);
    let end = blk.ram().end();
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let (header_addr, _, status_addr) = prepare_header(&blk, kind, 0);
        let data = Buffer {
            addr: end,
            len: 4096,
            writable: kind == VIRTIO_BLK_T_IN,
        };
        let (_, used) = blk
            .submit(
                0,
                &[
                    Buffer::readable(header_addr, 16),
                    data,
                    Buffer::writable(status_addr, 1),
                ],
            )
            .unwrap();
        assert_eq!(status(&blk, status_addr), IOERR);
        assert_eq!(used, 1);
        // Straddling the end of memory.
        let (header_addr, _, status_addr) = prepare_header(&blk, kind, 0);
        let data = Buffer {
            addr: GuestAddress(end.0 - 2048),
            len: 4096,
            writable: kind == VIRTIO_BLK_T_IN,
        };
        blk.submit(
            0,
            &[
                Buffer::readable(header_addr, 16),
                data,
                Buffer::writable(status_addr, 1),
            ],
        )
        .unwrap();
        assert_eq!(status(&blk, status_addr), IOERR);
    }
    // Header outside memory: the status byte is still reachable, so IOERR.
    let (_, _, status_addr) = prepare_header(&blk, VIRTIO_BLK_T_IN, 0);
    blk.submit(
        0,
        &[Buffer::readable(end, 16), Buffer::writable(status_addr, 1)],
    )
    .unwrap();
    assert_eq!(status(&blk, status_addr), IOERR);
    still_serves(&mut daemon, &mut blk);
}

#[test]
fn status_not_writable_or_missing_is_dropped() {
    let mut daemon = Daemon::start("status", &[]);
    let mut blk = daemon.connect(1);
    let (header_addr, data, status_addr) = prepare_header(&blk, VIRTIO_BLK_T_IN, 0);
    // Status descriptor device-readable.
    let (_, used) = blk
        .submit(
            0,
            &[
                Buffer::readable(header_addr, 16),
                Buffer::writable(data, 512),
                Buffer::readable(status_addr, 1),
            ],
        )
        .unwrap();
    assert_eq!(used, 0);
    assert_eq!(status(&blk, status_addr), STATUS_UNTOUCHED);
    // Status byte outside guest memory.
    let end = blk.ram().end();
    let (_, used) = blk
        .submit(
            0,
            &[Buffer::readable(header_addr, 16), Buffer::writable(end, 1)],
        )
        .unwrap();
    assert_eq!(used, 0);
    // Header only.
    let (_, used) = blk.submit(0, &[Buffer::readable(header_addr, 16)]).unwrap();
    assert_eq!(used, 0);
    still_serves(&mut daemon, &mut blk);
}

#[test]
fn looping_and_dangling_chains_are_dropped() {
    let mut daemon = Daemon::start("loop", &[]);
    let mut blk = daemon.connect(1);
    let (header_addr, data, status_addr) = prepare_header(&blk, VIRTIO_BLK_T_IN, 0);
    let size = blk.queue(0).size();
    let queue = blk.queue(0);
    // d0 -> d1 -> d2 -> d1 -> ...: the backend must stop after the queue size.
    let ids = queue.reserve(3).unwrap();
    queue
        .write_descriptor(ids[0], header_addr, 16, NEXT, ids[1])
        .unwrap();
    queue
        .write_descriptor(ids[1], data, 512, WRITE | NEXT, ids[2])
        .unwrap();
    queue
        .write_descriptor(ids[2], status_addr, 1, WRITE | NEXT, ids[1])
        .unwrap();
    queue.push_avail(ids[0]).unwrap();
    queue.notify().unwrap();
    let (head, used) = queue.wait_used(Duration::from_secs(5)).unwrap();
    assert_eq!((head, used), (ids[0], 0));

    // A `next` beyond the descriptor table.
    let ids = queue.reserve(2).unwrap();
    queue
        .write_descriptor(ids[0], header_addr, 16, NEXT, ids[1])
        .unwrap();
    queue
        .write_descriptor(ids[1], status_addr, 1, WRITE | NEXT, size + 5)
        .unwrap();
    queue.push_avail(ids[0]).unwrap();
    queue.notify().unwrap();
    let (head, used) = queue.wait_used(Duration::from_secs(5)).unwrap();
    assert_eq!((head, used), (ids[0], 0));
    still_serves(&mut daemon, &mut blk);
}

#[test]
fn head_index_outside_the_ring_is_ignored() {
    let mut daemon = Daemon::start("head", &[]);
    let mut blk = daemon.connect(1);
    let size = blk.queue(0).size();
    // An avail entry naming a descriptor that doesn't exist cannot even be returned; the
    // device skips it and serves the request behind it.
    blk.queue(0).push_avail(size + 3).unwrap();
    still_serves(&mut daemon, &mut blk);
}

#[test]
fn bad_requests_get_status_codes() {
    let mut daemon = Daemon::start("codes", &[]);
    let mut blk = daemon.connect(1);
    assert_eq!(
        blk.request(0, 0x7777, 0, Data::None).unwrap().status,
        UNSUPP
    );
    // Reads of a length that isn't a multiple of 512.
    assert_eq!(blk.read(0, 0, 100).unwrap().status, IOERR);
    // Discard segments: too many, bad flags, wrong payload length.
    let ranges: Vec<(u64, u32)> = (0..100).map(|i| (i * 8, 8)).collect();
    assert_eq!(
        blk.discard(0, VIRTIO_BLK_T_DISCARD, &ranges, 0)
            .unwrap()
            .status,
        UNSUPP
    );
    assert_eq!(
        blk.discard(0, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8)], 0x80)
            .unwrap()
            .status,
        UNSUPP
    );
    assert_eq!(
        blk.request(0, VIRTIO_BLK_T_DISCARD, 0, Data::Out(&[0u8; 7]))
            .unwrap()
            .status,
        UNSUPP
    );
    // Header shorter than 16 bytes.
    let (header_addr, _, status_addr) = prepare_header(&blk, VIRTIO_BLK_T_IN, 0);
    blk.submit(
        0,
        &[
            Buffer::readable(header_addr, 8),
            Buffer::writable(status_addr, 1),
        ],
    )
    .unwrap();
    assert_eq!(status(&blk, status_addr), IOERR);
    still_serves(&mut daemon, &mut blk);
}

#[test]
fn garbage_descriptor_table_does_not_kill_the_device() {
    let mut daemon = Daemon::start("garbage", &[]);
    let mut blk = daemon.connect(1);
    let size = blk.queue(0).size();
    // Pseudo-random descriptors; any outcome but a hang or a crash is fine.
    let bytes = random_bytes(42, 16);
    for round in 0..200u64 {
        let queue = blk.queue(0);
        let ids = queue.reserve(2).unwrap();
        let r = random_bytes(round, 16);
        // The second RAM region and beyond: nothing the test relies on lives there.
        let addr = (16 << 20) + u64::from_le_bytes(r[0..8].try_into().unwrap()) % (48 << 20);
        let len = u32::from_le_bytes(r[8..12].try_into().unwrap()) % 70_000;
        let flags = u16::from_le_bytes(r[12..14].try_into().unwrap()) & 0x7;
        let next = u16::from_le_bytes(r[14..16].try_into().unwrap()) % (size + 4);
        queue
            .write_descriptor(ids[0], GuestAddress(addr), len, flags, next)
            .unwrap();
        queue
            .write_descriptor(
                ids[1],
                GuestAddress(addr ^ u64::from(bytes[round as usize % 16])),
                len / 2,
                flags ^ 2,
                ids[0],
            )
            .unwrap();
        queue.push_avail(ids[0]).unwrap();
        queue.notify().unwrap();
        queue.wait_used(Duration::from_secs(5)).unwrap();
    }
    still_serves(&mut daemon, &mut blk);
}

#[test]
fn an_avail_index_too_far_ahead_costs_no_cpu() {
    // More entries published than the ring has: virtio-queue refuses to pop, and the worker
    // must then sleep like one with nothing to do, not go round for ever.
    let daemon = Daemon::start("avail-ahead", &[]);
    let mut blk = daemon.connect(1);
    let queue = blk.queue(0);
    for _ in 0..=queue.size() {
        queue.push_avail(0).unwrap();
    }
    queue.kick_now().unwrap();
    assert_goes_idle(&daemon, "a backend whose ring says more than it holds");
}

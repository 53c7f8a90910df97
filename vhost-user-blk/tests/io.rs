//! Data path: reads, writes, flush, GET_ID, discard and write-zeroes, against the image file.

mod common;

use cloister_backends::test_frontend::blk::*;
use cloister_backends::test_frontend::Buffer;
use common::*;
use std::time::Duration;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};

use vm_memory::{Bytes, GuestAddress};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

#[test]
fn write_then_read_back_at_several_offsets() {
    let daemon = Daemon::start("rw", &[]);
    let mut blk = daemon.connect(1);
    let cases: [(u64, u32); 5] = [
        (0, 4096),
        (3 * 8, 8192),
        (1001, 512),
        ((IMAGE_SIZE / 512) - 128, 65536),
        (20_000, 1 << 20),
    ];
    for (i, &(sector, len)) in cases.iter().enumerate() {
        let data = random_bytes(i as u64 + 1, len as usize);
        let reply = blk.write(0, sector, &data).unwrap();
        assert_eq!(reply.status, OK, "write at sector {sector}");
        assert_eq!(reply.used_len, 1);
        let reply = blk.read(0, sector, len).unwrap();
        assert_eq!(reply.status, OK, "read at sector {sector}");
        assert_eq!(reply.used_len, len + 1);
        assert_eq!(
            checksum(&reply.data),
            checksum(&data),
            "read back at sector {sector}"
        );
        let on_disk = read_file_range(&daemon.image, sector * 512, len as usize);
        assert_eq!(
            checksum(&on_disk),
            checksum(&data),
            "image file at sector {sector}"
        );
    }
    // Untouched areas still hold the original pattern.
    let reply = blk.read(0, 100, 1024).unwrap();
    assert!(reply.data[..512]
        .iter()
        .all(|&b| b == pattern_byte(100 * 512)));
    assert!(reply.data[512..]
        .iter()
        .all(|&b| b == pattern_byte(101 * 512)));
}

#[test]
fn flush_and_get_id() {
    let daemon = Daemon::start("id", &["--serial", "cloister-disk-0001"]);
    let mut blk = daemon.connect(1);
    let reply = blk.flush(0).unwrap();
    assert_eq!(reply.status, OK);
    let reply = blk.get_id(0).unwrap();
    assert_eq!(reply.status, OK);
    assert_eq!(reply.used_len, 21);
    assert_eq!(&reply.data[..18], b"cloister-disk-0001");
    assert!(reply.data[18..].iter().all(|&b| b == 0));
}

#[test]
fn discard_and_write_zeroes_zero_the_range() {
    let daemon = Daemon::start("zero", &[]);
    let mut blk = daemon.connect(1);
    let cases = [
        (VIRTIO_BLK_T_DISCARD, 0u32, 64u64),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0, 256),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            512,
        ),
    ];
    for &(kind, flags, sector) in &cases {
        assert_eq!(blk.write(0, sector, &[0x77u8; 16384]).unwrap().status, OK);
        // Two ranges in one request: sectors [s, s+8) and [s+16, s+24).
        let reply = blk
            .discard(0, kind, &[(sector, 8), (sector + 16, 8)], flags)
            .unwrap();
        assert_eq!(reply.status, OK, "kind {kind} flags {flags}");
        let data = blk.read(0, sector, 16384).unwrap().data;
        assert!(
            data[..4096].iter().all(|&b| b == 0),
            "first range zeroed (kind {kind})"
        );
        assert!(
            data[4096..8192].iter().all(|&b| b == 0x77),
            "gap kept (kind {kind})"
        );
        assert!(
            data[8192..12288].iter().all(|&b| b == 0),
            "second range zeroed (kind {kind})"
        );
        assert!(
            data[12288..].iter().all(|&b| b == 0x77),
            "tail kept (kind {kind})"
        );
        let on_disk = read_file_range(&daemon.image, sector * 512, 4096);
        assert!(
            on_disk.iter().all(|&b| b == 0),
            "image file zeroed (kind {kind})"
        );
    }
}

#[test]
fn every_legal_ring_size_is_accepted() {
    // QEMU's microvm sets up 1024-entry rings; --queue-size is the depth in flight, not a
    // limit on the ring. A ring larger than the depth carries more requests than the depth at
    // once: they wait in the ring, and all complete.
    let daemon = Daemon::start("rings", &["--queue-size", "128"]);
    let features = features_wanted();
    for size in [1024u16, 32768] {
        let mut blk = daemon.connect_with(1, size, features);
        assert_eq!(
            blk.config().unwrap().seg_max,
            126,
            "the segment limit follows --queue-size"
        );
        let ram = blk.ram().clone();
        let mem = ram.memory();
        // More than the depth, and light: the early-return tests in this binary run beside it
        // and measure timing.
        let n = 150u64;
        let mut statuses = Vec::new();
        for i in 0..n {
            let hdr = ram.alloc(u64::from(HEADER_LEN), 16).unwrap();
            mem.write_slice(&header(VIRTIO_BLK_T_OUT, i * 8), hdr)
                .unwrap();
            let data = ram.alloc(4096, 4096).unwrap();
            mem.write_slice(&[i as u8; 4096], data).unwrap();
            let status = ram.alloc(1, 1).unwrap();
            mem.write_obj(STATUS_UNTOUCHED, status).unwrap();
            statuses.push(status);
            blk.queue(0)
                .add(&[
                    Buffer::readable(hdr, HEADER_LEN),
                    Buffer::readable(data, 4096),
                    Buffer::writable(status, 1),
                ])
                .unwrap();
        }
        blk.queue(0).notify().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut done = 0;
        while done < n && std::time::Instant::now() < deadline {
            match blk.queue(0).pop_used().unwrap() {
                Some(_) => done += 1,
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        assert_eq!(done, n, "requests completed on a ring of {size}");
        for status in statuses {
            assert_eq!(mem.read_obj::<u8>(status).unwrap(), OK, "ring of {size}");
        }
        let on_disk = read_file_range(&daemon.image, (n - 1) * 8 * 512, 4096);
        assert!(on_disk.iter().all(|&b| b == (n - 1) as u8));
    }
}

#[test]
fn config_space_reports_the_disk() {
    let daemon = Daemon::start("config", &["--queues", "4", "--queue-size", "128"]);
    let features = features_wanted();
    let mut blk = daemon.connect_with(1, 128, features);
    let config = blk.config().unwrap();
    assert_eq!(config.capacity_bytes(), IMAGE_SIZE);
    assert_eq!(config.num_queues, 4);
    assert_eq!(config.blk_size, 512);
    assert_eq!(config.seg_max, 126);
    assert!(config.max_discard_seg >= 1 && config.max_discard_sectors > 0);
    assert!(config.max_write_zeroes_seg >= 1 && config.max_write_zeroes_sectors > 0);
    assert_eq!(config.write_zeroes_may_unmap, 1);
    let negotiation = blk.connection().negotiation();
    assert!(negotiation.has(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1));
    assert!(negotiation.has(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX));
    assert!(negotiation.has(VIRTIO_BLK_F_FLUSH));
    assert!(!negotiation.has(VIRTIO_BLK_F_RO));
    assert_eq!(negotiation.queues, 4);
}

#[test]
fn readonly_rejects_writes_and_keeps_the_file() {
    let daemon = Daemon::start("ro", &["--readonly"]);
    let before = std::fs::read(&daemon.image).unwrap();
    let mut blk = daemon.connect(1);
    assert!(blk.connection().negotiation().has(VIRTIO_BLK_F_RO));
    let reply = blk.write(0, 8, &[0xeeu8; 4096]).unwrap();
    assert_eq!(reply.status, IOERR);
    let reply = blk
        .discard(0, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8)], 0)
        .unwrap();
    assert_ne!(reply.status, OK);
    assert_eq!(blk.flush(0).unwrap().status, OK);
    let reply = blk.read(0, 8, 4096).unwrap();
    assert_eq!(reply.status, OK);
    assert_eq!(reply.data, read_file_range(&daemon.image, 8 * 512, 4096));
    assert_eq!(
        std::fs::read(&daemon.image).unwrap(),
        before,
        "image changed"
    );
}

#[test]
fn four_queues_all_serve() {
    let daemon = Daemon::start("mq", &["--queues", "4"]);
    let mut blk = daemon.connect(4);
    for queue in 0..4 {
        let data = random_bytes(100 + queue as u64, 8192);
        assert_eq!(
            blk.write(queue, 1000 + 16 * queue as u64, &data)
                .unwrap()
                .status,
            OK
        );
    }
    for queue in 0..4 {
        // Read each queue's data through another queue.
        let reply = blk
            .read((queue + 1) % 4, 1000 + 16 * queue as u64, 8192)
            .unwrap();
        assert_eq!(reply.status, OK);
        assert_eq!(
            checksum(&reply.data),
            checksum(&random_bytes(100 + queue as u64, 8192))
        );
    }
}

/// Queues sharing worker threads (queue i on thread i mod N): all of them serve at once.
#[test]
fn queues_sharing_threads_all_serve_at_once() {
    for threads in ["1", "3"] {
        let daemon = Daemon::start("mq-threads", &["--queues", "4", "--threads", threads]);
        let mut blk = daemon.connect(4);
        let ram = blk.ram().clone();
        // 16 writes in flight on every queue before any is waited for.
        let mut requests = Vec::new();
        for queue in 0..4 {
            for i in 0..16u64 {
                let block = queue as u64 * 16 + i;
                let slot = Slot::new(&blk, VIRTIO_BLK_T_OUT, block * 8, 4096);
                ram.memory()
                    .write_slice(&random_bytes(block, 4096), slot.data)
                    .unwrap();
                slot.add(&mut blk, queue);
                requests.push(slot);
            }
        }
        for queue in 0..4 {
            blk.queue(queue).notify().unwrap();
        }
        for queue in 0..4 {
            for _ in 0..16 {
                blk.queue(queue)
                    .wait_used(std::time::Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("--threads {threads}: queue {queue}: {e}"));
            }
        }
        for slot in &requests {
            assert_eq!(slot.status(&blk), OK);
        }
        for block in 0..64u64 {
            let on_disk = read_file_range(&daemon.image, block * 4096, 4096);
            assert_eq!(checksum(&on_disk), checksum(&random_bytes(block, 4096)));
        }
        // Each queue reads back another's blocks.
        for queue in 0..4 {
            let block = ((queue + 1) % 4) as u64 * 16;
            let reply = blk.read(queue, block * 8, 4096).unwrap();
            assert_eq!(reply.status, OK);
            assert_eq!(checksum(&reply.data), checksum(&random_bytes(block, 4096)));
        }
    }
}

#[test]
fn discards_that_overflow_the_completion_queue_all_finish() {
    // Every range of a discard is one io_uring completion: a ring full of 32-range discards
    // (85 requests of 3 descriptors) is 2720 completions, several times what the completion
    // queue holds. The kernel keeps the rest, and hands them over only when asked.
    const RANGES: u64 = 32;
    let daemon = Daemon::start("discard-flood", &[]);
    let mut blk = daemon.connect(1);
    let ram = blk.ram().clone();
    let mem = ram.memory();
    let requests = blk.queue(0).free_descriptors() as u64 / 3;
    let mut statuses = Vec::new();
    for i in 0..requests {
        let header_addr = ram.alloc(u64::from(HEADER_LEN), 16).unwrap();
        mem.write_slice(&header(VIRTIO_BLK_T_DISCARD, 0), header_addr)
            .unwrap();
        let ranges: Vec<u8> = (0..RANGES)
            .flat_map(|j| discard_segment((i * RANGES + j) * 8, 8, 0))
            .collect();
        let ranges_addr = ram.alloc(ranges.len() as u64, 16).unwrap();
        mem.write_slice(&ranges, ranges_addr).unwrap();
        let status = ram.alloc(1, 1).unwrap();
        mem.write_obj(STATUS_UNTOUCHED, status).unwrap();
        blk.queue(0)
            .add(&[
                Buffer::readable(header_addr, HEADER_LEN),
                Buffer::readable(ranges_addr, ranges.len() as u32),
                Buffer::writable(status, 1),
            ])
            .unwrap();
        statuses.push(status);
    }
    let queue = blk.queue(0);
    queue.notify().unwrap();
    for done in 0..requests {
        if let Err(e) = queue.wait_used(Duration::from_secs(10)) {
            panic!("{done} of {requests} discards finished, then none for 10 s: {e:?}");
        }
    }
    for status in statuses {
        assert_eq!(mem.read_obj::<u8>(status).unwrap(), OK);
    }
    // Punched: the ranges read back as zeroes.
    let discarded = read_file_range(&daemon.image, 0, (requests * RANGES * 8 * 512) as usize);
    assert!(discarded.iter().all(|&b| b == 0));
}

#[test]
fn beyond_capacity_is_an_error_and_the_device_goes_on() {
    let daemon = Daemon::start("range", &[]);
    let mut blk = daemon.connect(1);
    let last = IMAGE_SIZE / 512;
    assert_eq!(blk.read(0, last, 512).unwrap().status, IOERR);
    assert_eq!(blk.read(0, last - 1, 1024).unwrap().status, IOERR);
    assert_eq!(
        blk.write(0, u64::MAX / 512, &[1u8; 512]).unwrap().status,
        IOERR
    );
    assert_eq!(
        blk.discard(0, VIRTIO_BLK_T_DISCARD, &[(last - 4, 8)], 0)
            .unwrap()
            .status,
        IOERR
    );
    assert_eq!(blk.read(0, last - 1, 512).unwrap().status, OK);
}

#[test]
fn indirect_descriptors_and_buffers_across_regions() {
    let daemon = Daemon::start("layout", &[]);
    let mut blk = daemon.connect(1);
    let data = random_bytes(7, 8192);
    assert_eq!(blk.write(0, 64, &data).unwrap().status, OK);

    // A read into a buffer straddling the boundary between the two guest RAM regions, through
    // an indirect table, split over three descriptors.
    let ram = blk.ram().clone();
    let (header_addr, _, status_addr) = blk.buffers();
    ram.memory()
        .write_slice(&header(VIRTIO_BLK_T_IN, 64), header_addr)
        .unwrap();
    let boundary = GuestAddress(16 << 20);
    let buffers = [
        Buffer::readable(header_addr, 16),
        Buffer::writable(GuestAddress(boundary.0 - 1024), 2048),
        Buffer::writable(GuestAddress(boundary.0 + 4096), 6144),
        Buffer::writable(status_addr, 1),
    ];
    let queue = blk.queue(0);
    queue.add_indirect(&buffers).unwrap();
    queue.notify().unwrap();
    let (_, used_len) = queue.wait_used(std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(used_len, 8193);
    assert_eq!(ram.memory().read_obj::<u8>(status_addr).unwrap(), OK);
    let mut got = vec![0u8; 8192];
    ram.memory()
        .read_slice(&mut got[..2048], GuestAddress(boundary.0 - 1024))
        .unwrap();
    ram.memory()
        .read_slice(&mut got[2048..], GuestAddress(boundary.0 + 4096))
        .unwrap();
    assert_eq!(checksum(&got), checksum(&data));
}

#[test]
fn many_requests_in_flight_complete() {
    let daemon = Daemon::start("inflight", &[]);
    let mut blk = daemon.connect(1);
    // 64 writes of 4 KiB at once, each with its own header, data and status.
    let mut requests = Vec::new();
    for i in 0..64u64 {
        let slot = Slot::new(&blk, VIRTIO_BLK_T_OUT, i * 8, 4096);
        blk.ram()
            .memory()
            .write_slice(&random_bytes(1000 + i, 4096), slot.data)
            .unwrap();
        let head = slot.add(&mut blk, 0);
        requests.push((head, slot));
    }
    blk.queue(0).notify().unwrap();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < requests.len() {
        let (head, _) = blk
            .queue(0)
            .wait_used(std::time::Duration::from_secs(5))
            .unwrap();
        assert!(seen.insert(head), "head {head} returned twice");
    }
    for (_, slot) in &requests {
        assert_eq!(slot.status(&blk), OK);
    }
    for i in 0..64u64 {
        let on_disk = read_file_range(&daemon.image, i * 4096, 4096);
        assert_eq!(checksum(&on_disk), checksum(&random_bytes(1000 + i, 4096)));
    }
}

/// One read or write with the data buffer at `data_addr` (possibly misaligned).
fn transfer_at(
    blk: &mut TestBlk,
    kind: u32,
    sector: u64,
    data_addr: GuestAddress,
    len: u32,
) -> (u8, u32) {
    let ram = blk.ram().clone();
    let (header_addr, _, status_addr) = blk.buffers();
    ram.memory()
        .write_slice(&header(kind, sector), header_addr)
        .unwrap();
    ram.memory()
        .write_obj(STATUS_UNTOUCHED, status_addr)
        .unwrap();
    let data = Buffer {
        addr: data_addr,
        len,
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
    (ram.memory().read_obj(status_addr).unwrap(), used)
}

#[test]
fn direct_io_with_aligned_and_misaligned_buffers() {
    for engine in ["io-uring", "sync"] {
        let daemon = Daemon::start("direct", &["--direct", "--io-engine", engine]);
        let mut blk = daemon.connect(1);
        let ram = blk.ram().clone();
        let mem = ram.memory();
        let (_, data_addr, _) = blk.buffers();
        // Aligned: the O_DIRECT descriptor. Misaligned by one byte: the buffered fallback.
        for (i, offset_in_page) in [0u64, 1, 512 + 3].into_iter().enumerate() {
            let addr = GuestAddress(data_addr.0 + offset_in_page);
            let data = random_bytes(500 + i as u64, 4096);
            let sector = 64 + 16 * i as u64;
            mem.write_slice(&data, addr).unwrap();
            assert_eq!(
                transfer_at(&mut blk, VIRTIO_BLK_T_OUT, sector, addr, 4096),
                (OK, 1),
                "{engine}"
            );
            assert_eq!(
                read_file_range(&daemon.image, sector * 512, 4096),
                data,
                "{engine} file"
            );
            mem.write_slice(&[0u8; 4096], addr).unwrap();
            assert_eq!(
                transfer_at(&mut blk, VIRTIO_BLK_T_IN, sector, addr, 4096),
                (OK, 4097),
                "{engine}"
            );
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, addr).unwrap();
            assert_eq!(
                checksum(&got),
                checksum(&data),
                "{engine} offset {offset_in_page}"
            );
        }
        assert_eq!(blk.flush(0).unwrap().status, OK);
        assert_eq!(
            blk.discard(0, VIRTIO_BLK_T_WRITE_ZEROES, &[(64, 8)], 0)
                .unwrap()
                .status,
            OK
        );
        assert!(
            blk.read(0, 64, 4096).unwrap().data.iter().all(|&b| b == 0),
            "{engine}"
        );
    }
}

#[test]
fn sync_engine_reads_and_writes() {
    let daemon = Daemon::start("sync", &["--io-engine", "sync", "--queues", "2"]);
    let mut blk = daemon.connect(2);
    let data = random_bytes(77, 65536);
    assert_eq!(blk.write(1, 300, &data).unwrap().status, OK);
    assert_eq!(
        checksum(&blk.read(0, 300, 65536).unwrap().data),
        checksum(&data)
    );
    assert_eq!(read_file_range(&daemon.image, 300 * 512, 65536), data);
    assert_eq!(
        blk.discard(0, VIRTIO_BLK_T_DISCARD, &[(300, 16)], 0)
            .unwrap()
            .status,
        OK
    );
    assert!(blk.read(1, 300, 8192).unwrap().data.iter().all(|&b| b == 0));
    assert_eq!(blk.read(0, IMAGE_SIZE / 512, 512).unwrap().status, IOERR);
}

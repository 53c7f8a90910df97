//! A backend started in place of one that died takes up what the frontend's in-flight region
//! (`INFLIGHT_SHMFD`) says the last one had not finished: those requests first, in the order
//! they were taken, then the ring from the used index plus their number; a completion the
//! dead one had published is not done again.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloister_backends::inflight::{InflightQueue, InflightRegion};
use cloister_backends::test_frontend::blk::*;
use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Address, Bytes};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const QUEUE_SIZE: u16 = 64;

#[test]
fn a_new_backend_takes_up_what_the_dead_one_left_in_flight() {
    // The sync engine finishes requests in the order it is given them, so the used ring shows
    // the order they were taken up in.
    let mut a = Daemon::start("recovery-a", &["--io-engine", "sync"]);
    let mut blk = a.connect_with(1, QUEUE_SIZE, features_wanted());
    let asked = vhost::vhost_user::message::VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QUEUE_SIZE,
    };
    let (info, region_file) = blk
        .connection()
        .frontend()
        .get_inflight_fd(&asked)
        .expect("the backend offers in-flight tracking");
    assert!(info.mmap_size > 0);
    let first = random_bytes(1, 4096);
    assert_eq!(blk.write(0, 8, &first).unwrap().status, OK);

    // Backend A dies. Three writes were in the ring; say A had taken R3, R2 and R1 in that
    // order, and had put R2's completion in the used ring when it died (before it could clear
    // R2's mark). The test writes A's marks with the region's own code.
    a.signal_and_wait(libc::SIGKILL);
    let datas: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(10 + i, 4096)).collect();
    let sectors = [64u64, 128, 192];
    let slots: Vec<Slot> = sectors
        .iter()
        .map(|&s| Slot::new(&blk, VIRTIO_BLK_T_OUT, s, 4096))
        .collect();
    let mem = blk.ram().memory().clone();
    let mut heads = Vec::new();
    for (slot, data) in slots.iter().zip(&datas) {
        mem.write_slice(data, slot.data).unwrap();
        heads.push(slot.add(&mut blk, 0));
    }
    blk.queue(0).notify().unwrap();
    let fd = std::os::fd::OwnedFd::from(region_file.try_clone().unwrap());
    let region = Arc::new(InflightRegion::adopt(&fd, info.mmap_size, 0, 1, QUEUE_SIZE).unwrap());
    let mut dead = InflightQueue::new(Arc::clone(&region), 0, QUEUE_SIZE).unwrap();
    for i in [2, 1, 0] {
        dead.begin(heads[i]);
    }
    dead.completing(heads[1]);
    mem.write_obj(OK, slots[1].status).unwrap();
    let (_, _, used) = blk.queue(0).addresses();
    mem.write_obj(u32::from(heads[1]), used.unchecked_add(4 + 8))
        .unwrap();
    mem.write_obj(1u32, used.unchecked_add(4 + 8 + 4)).unwrap();
    mem.write_obj(2u16, used.unchecked_add(2)).unwrap();
    drop(dead);
    drop(region);

    // Backend B, on the same image, gets the region and the ring at the used index (what
    // QEMU hands over; B works out the rest from the region).
    let b = Daemon::start_with(
        Scratch::new("recovery-b"),
        a.image.clone(),
        &["--io-engine", "sync"],
    );
    blk.take_over(
        &b.socket,
        features_wanted(),
        Some((&info, region_file.as_raw_fd())),
        2,
    )
    .unwrap();
    blk.queue(0).kick_now().unwrap();
    let mut completed = Vec::new();
    for _ in 0..3 {
        let timeout = blk.timeout;
        completed.push(blk.queue(0).wait_used(timeout).unwrap().0);
    }
    assert_eq!(
        completed,
        [heads[1], heads[2], heads[0]],
        "R2 (completed by A), then R3 and R1 in the order A took them"
    );
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(slot.status(&blk), OK, "request {i}");
    }
    let image = &a.image;
    assert_eq!(read_file_range(image, 64 * 512, 4096), datas[0]);
    assert_eq!(read_file_range(image, 192 * 512, 4096), datas[2]);
    // R2 was done by A as far as the guest knows; B did not write it again (here A never
    // did, so the image still has its pattern there).
    let r2 = read_file_range(image, 128 * 512, 4096);
    assert!(
        r2.iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(128 * 512 + i as u64)),
        "B redid a request whose completion the guest had seen"
    );
    assert_eq!(read_file_range(image, 8 * 512, 4096), first);
    // The ring goes on after the three.
    let next = random_bytes(20, 4096);
    assert_eq!(blk.write(0, 256, &next).unwrap().status, OK);
    assert_eq!(read_file_range(image, 256 * 512, 4096), next);
    let log = b.log_text();
    assert!(
        log.contains("taking up 2 request(s) left in flight, then the ring from 4"),
        "{log}"
    );
}

/// One write slot of the load: its buffers and the blocks it writes in turn.
struct Writer {
    slot: Slot,
    /// Its blocks are `index, index + stride, …`: writes in flight never share a block, so the
    /// image ends up with each block's last write whatever order the backends did them in.
    index: u64,
    stride: u64,
    /// How many of its writes have completed.
    turn: u64,
    /// Head of its request in the ring while one is outstanding.
    head: Option<u16>,
}

const BLOCK: u32 = 4096;
const BLOCKS_PER_WRITER: u64 = 8;
/// Nothing completing for this long, with writes outstanding, is a stalled ring.
const STALL: Duration = Duration::from_secs(5);

fn content(block: u64, turn: u64) -> Vec<u8> {
    random_bytes(block << 32 | turn, BLOCK as usize)
}

impl Writer {
    /// `count` writers, each with its first write queued and published.
    fn start(blk: &mut TestBlk, count: u64) -> Vec<Writer> {
        let mut writers: Vec<Writer> = (0..count)
            .map(|index| Writer {
                slot: Slot::new(blk, VIRTIO_BLK_T_OUT, 0, BLOCK),
                index,
                stride: count,
                turn: 0,
                head: None,
            })
            .collect();
        for writer in &mut writers {
            writer.submit(blk);
        }
        blk.queue(0).notify().unwrap();
        writers
    }

    fn block(&self, turn: u64) -> u64 {
        self.index + self.stride * (turn % BLOCKS_PER_WRITER)
    }

    /// Queues this writer's next write (published by the caller's `notify`).
    fn submit(&mut self, blk: &mut TestBlk) {
        let block = self.block(self.turn);
        let sector = block * u64::from(BLOCK) / SECTOR;
        blk.ram()
            .memory()
            .write_slice(&header(VIRTIO_BLK_T_OUT, sector), self.slot.header)
            .unwrap();
        blk.ram()
            .memory()
            .write_slice(&content(block, self.turn), self.slot.data)
            .unwrap();
        self.head = Some(self.slot.add(blk, 0));
    }

    /// Each of its blocks holds the last write made to it, or the image's pattern if none.
    fn check(&self, image: &std::path::Path) {
        for back in 1..=BLOCKS_PER_WRITER.min(self.turn) {
            let turn = self.turn - back;
            let block = self.block(turn);
            let got = read_file_range(image, block * u64::from(BLOCK), BLOCK as usize);
            assert_eq!(
                checksum(&got),
                checksum(&content(block, turn)),
                "block {block} lacks writer {}'s write {turn} of {}",
                self.index,
                self.turn
            );
        }
    }
}

/// The used index the device last published (what a VMM hands the next backend).
fn device_used_index(blk: &mut TestBlk) -> u16 {
    let (_, _, used) = blk.queue(0).addresses();
    blk.ram()
        .memory()
        .read_obj::<u16>(used.unchecked_add(2))
        .unwrap()
}

/// How long [`run_load`] goes on.
enum Until {
    /// This long, refilling each writer as its write completes.
    Elapsed(Duration),
    /// The first completion (refilled).
    Completion,
    /// No write outstanding, refilling none.
    Drained,
}

/// Reaps completions, refilling each writer as its write completes, `until` …; fails if nothing
/// completes for [`STALL`] while writes are outstanding.
fn run_load(blk: &mut TestBlk, writers: &mut [Writer], until: Until) {
    let start = Instant::now();
    let mut progress = start;
    let mut completed = 0;
    loop {
        let outstanding = writers.iter().filter(|w| w.head.is_some()).count();
        let done = match until {
            Until::Elapsed(duration) => start.elapsed() >= duration,
            Until::Completion => completed > 0,
            Until::Drained => outstanding == 0,
        };
        if done {
            return;
        }
        match blk.queue(0).wait_used(Duration::from_millis(2)) {
            Ok((head, _)) => {
                progress = Instant::now();
                completed += 1;
                let writer = writers
                    .iter_mut()
                    .find(|w| w.head == Some(head))
                    .unwrap_or_else(|| panic!("completion of head {head}, which is not ours"));
                let status: u8 = writer.slot.status(blk);
                assert_eq!(
                    status, OK,
                    "writer {}'s write {}",
                    writer.index, writer.turn
                );
                writer.head = None;
                writer.turn += 1;
                if !matches!(until, Until::Drained) {
                    writer.submit(blk);
                    blk.queue(0).notify().unwrap();
                }
            }
            Err(cloister_backends::test_frontend::Error::Timeout(_)) => {
                if outstanding > 0 && progress.elapsed() > STALL {
                    let used = device_used_index(blk);
                    let avail_event = blk.queue(0).device_avail_event().unwrap();
                    panic!(
                        "the ring stalled: {outstanding} writes outstanding, nothing completed \
                         for {:?} (device used index {used}, avail_event {avail_event})",
                        progress.elapsed()
                    );
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// `rounds` times, after some load (from none to 20 ms, so the kill finds the backend in
/// every state: polling, sleeping, mid-completion), `restart` kills the backend and starts
/// another, whose socket it returns; the new one gets what a VMM hands it: the memory, the
/// in-flight region if any, the ring at the used index, one kick. The last one finishes
/// everything. Returns how many writes completed.
fn load_through_restarts(
    blk: &mut TestBlk,
    writers: &mut [Writer],
    rounds: u64,
    inflight: Option<(
        &vhost::vhost_user::message::VhostUserInflight,
        std::os::fd::RawFd,
    )>,
    mut restart: impl FnMut(u64) -> std::path::PathBuf,
) -> u64 {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..rounds {
        // The last backend must have made progress before this one dies: a ring it left
        // stalled shows here, not hidden by the next take-over's kick.
        run_load(blk, writers, Until::Completion);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        run_load(
            blk,
            writers,
            Until::Elapsed(Duration::from_micros(seed % 20_000)),
        );
        let socket = restart(round);
        let base = device_used_index(blk);
        blk.take_over(&socket, features_wanted(), inflight, base)
            .unwrap_or_else(|e| panic!("round {round}: take-over: {e}"));
        // The VMM's one kick once the rings are handed over; the frontend's own state is
        // untouched, as a guest's is.
        blk.queue(0).kick.write(1).unwrap();
    }
    run_load(blk, writers, Until::Drained);
    let writes: u64 = writers.iter().map(|w| w.turn).sum();
    assert!(writes > rounds, "only {writes} writes completed");
    writes
}

/// What the VMM does for a lost disk backend, thirty times, under 16 writes in flight, with a
/// frontend that kicks only when EVENT_IDX says so: every write must complete and the image
/// must hold each block's last write.
#[test]
fn killed_thirty_times_under_load_the_ring_goes_on_and_no_write_is_lost() {
    const ROUNDS: u64 = 30;
    let first = Daemon::start("recovery-load", &[]);
    let image = first.image.clone();
    let mut blk = first.connect_with(1, 128, features_wanted());
    let asked = vhost::vhost_user::message::VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 128,
    };
    let (info, region_file) = blk
        .connection()
        .frontend()
        .get_inflight_fd(&asked)
        .expect("the backend offers in-flight tracking");
    let mut writers = Writer::start(&mut blk, 16);
    let mut current = first;
    let mut backends = Vec::new();
    let writes = load_through_restarts(
        &mut blk,
        &mut writers,
        ROUNDS,
        Some((&info, region_file.as_raw_fd())),
        |round| {
            current.signal_and_wait(libc::SIGKILL);
            let next = Daemon::start_with(
                Scratch::new(&format!("recovery-load-{round}")),
                image.clone(),
                &[],
            );
            let socket = next.socket.clone();
            // The first daemon's scratch directory holds the image: keep them all.
            backends.push(std::mem::replace(&mut current, next));
            socket
        },
    );
    for writer in &writers {
        writer.check(&image);
    }
    eprintln!("{writes} writes over {ROUNDS} backends, none lost");
}

/// qemu-storage-daemon, a standard backend that tracks nothing in flight, on `image`.
struct StorageDaemon {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl StorageDaemon {
    fn start(image: &std::path::Path, socket: &std::path::Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = std::process::Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon is installed (scripts/install-deps.sh)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon made no socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        StorageDaemon {
            child,
            socket: socket.to_path_buf(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The same take-over with qemu-storage-daemon killed and started again twenty times. It
/// offers no in-flight tracking, so the ring resumes at the used index, which is exact for
/// one request at a time: at queue depth 1 every write completes, once, and lands.
#[test]
fn qemu_storage_daemon_killed_twenty_times_at_queue_depth_one_loses_no_write() {
    const ROUNDS: u64 = 20;
    let scratch = Scratch::new("recovery-qsd");
    let image = scratch.image(IMAGE_SIZE);
    let socket = scratch.path("qsd.sock");
    let mut qsd = StorageDaemon::start(&image, &socket);
    let mut blk = TestBlk::connect(&qsd.socket, 1, 128, features_wanted())
        .unwrap_or_else(|e| panic!("connect to qemu-storage-daemon: {e}"));
    let mut writers = Writer::start(&mut blk, 1);
    let writes = load_through_restarts(&mut blk, &mut writers, ROUNDS, None, |_| {
        qsd.kill();
        qsd = StorageDaemon::start(&image, &socket);
        qsd.socket.clone()
    });
    writers[0].check(&image);
    eprintln!("{writes} writes over {ROUNDS} qemu-storage-daemons, none lost");
}

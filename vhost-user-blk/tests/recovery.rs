//! A backend started in place of one that died takes up what the frontend's in-flight region
//! (`INFLIGHT_SHMFD`) says the last one had not finished: those requests first, in the order
//! they were taken, then the ring from the used index plus their number; a completion the
//! dead one had published is not done again.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;

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

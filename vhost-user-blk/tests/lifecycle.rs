//! The daemon's life: reconnecting frontends, stopping queues, signals, the socket file and the
//! command line.

mod common;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use cloister_backends::test_frontend::blk::*;
use common::*;
use vm_memory::Bytes;

const OK: u8 = VIRTIO_BLK_S_OK as u8;

#[test]
fn serves_a_second_frontend_after_the_first_disconnects() {
    let mut daemon = Daemon::start("reconnect", &["--queues", "2"]);
    let data = random_bytes(9, 8192);
    {
        let mut blk = daemon.connect(2);
        assert_eq!(blk.write(1, 40, &data).unwrap().status, OK);
    }
    for round in 0..3 {
        let mut blk = daemon.connect(2);
        let reply = blk.read(round % 2, 40, 8192).unwrap();
        assert_eq!(reply.status, OK);
        assert_eq!(checksum(&reply.data), checksum(&data));
    }
    daemon.assert_serves();
    let log = daemon.log_text();
    assert!(log.contains("connection 4"), "{log}");
}

#[test]
fn stopping_a_queue_reports_its_position_and_it_can_restart() {
    let daemon = Daemon::start("stop", &[]);
    let mut blk = daemon.connect(1);
    for i in 0..5 {
        assert_eq!(blk.read(0, i * 8, 4096).unwrap().status, OK);
    }
    let base = blk.connection().stop_queue(0).unwrap();
    assert_eq!(base, 5);
    drop(blk);
    // A fresh connection starts from a fresh ring.
    let mut blk = daemon.connect(1);
    assert_eq!(blk.read(0, 0, 4096).unwrap().status, OK);
}

#[test]
fn stopping_a_queue_finishes_requests_in_flight() {
    // O_DIRECT reads take the device's time, so they are still in flight when GET_VRING_BASE
    // arrives right after the kick.
    let daemon = Daemon::start("stop-inflight", &["--direct"]);
    let mut blk = daemon.connect(1);
    let ram = blk.ram().clone();
    let mem = ram.memory();
    let mut statuses = Vec::new();
    for i in 0..32u64 {
        let header_addr = ram.alloc(16, 16).unwrap();
        let data = ram.alloc(65536, 4096).unwrap();
        let status = ram.alloc(1, 1).unwrap();
        mem.write_slice(&header(VIRTIO_BLK_T_IN, i * 128), header_addr)
            .unwrap();
        mem.write_obj(STATUS_UNTOUCHED, status).unwrap();
        blk.queue(0)
            .add(&[
                cloister_backends::test_frontend::Buffer::readable(header_addr, 16),
                cloister_backends::test_frontend::Buffer::writable(data, 65536),
                cloister_backends::test_frontend::Buffer::writable(status, 1),
            ])
            .unwrap();
        statuses.push(status);
    }
    blk.queue(0).kick_now().unwrap();
    // Stop the queue as soon as the backend has taken requests (it moves avail_event past
    // them once they are submitted), however busy the machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while blk.queue(0).device_avail_event().unwrap() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backend took nothing in 10 s"
        );
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    let base = blk.connection().stop_queue(0).unwrap();
    assert!(base > 0, "GET_VRING_BASE says the backend took nothing");
    // Whatever the backend took, it finished and returned before answering.
    let mut used = 0;
    while blk.queue(0).pop_used().unwrap().is_some() {
        used += 1;
    }
    assert_eq!(
        used, base,
        "every request taken was completed before GET_VRING_BASE returned"
    );
    for status in &statuses[..used as usize] {
        assert_eq!(mem.read_obj::<u8>(*status).unwrap(), OK);
    }
}

#[test]
fn stopping_a_queue_the_guest_keeps_full() {
    // Buffered reads from the page cache complete inline, and with a CPU to spare the worker
    // returns them while more wait in the ring (each 8 MiB read exceeds the 128 KiB share).
    // A guest that puts each one straight back keeps the ring from running dry: GET_VRING_BASE
    // must still get its answer while that goes on. (8 MiB reads take the worker far longer
    // than the test takes to put one back, even in a debug build.)
    use cloister_backends::test_frontend::{Buffer, SplitQueue};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    const READ_LEN: u32 = 8 << 20;

    let daemon = Daemon::start("stop-busy", &[]);
    let mut blk = daemon.connect(1);
    let ram = blk.ram().clone();
    let mem = ram.memory();
    // The data all goes to one buffer: only the ring's traffic matters here.
    let data = ram.alloc(READ_LEN.into(), 4096).unwrap();
    let requests: Vec<[Buffer; 3]> = (0..16)
        .map(|_| {
            let header_addr = ram.alloc(16, 16).unwrap();
            mem.write_slice(&header(VIRTIO_BLK_T_IN, 0), header_addr)
                .unwrap();
            [
                Buffer::readable(header_addr, 16),
                Buffer::writable(data, READ_LEN),
                Buffer::writable(ram.alloc(1, 1).unwrap(), 1),
            ]
        })
        .collect();
    let (connection, queue) = blk.connection_and_queue(0);
    let mut request_of_head = HashMap::new();
    for (i, buffers) in requests.iter().enumerate() {
        request_of_head.insert(queue.add(buffers).unwrap(), i);
    }
    queue.kick_now().unwrap();
    // Puts every returned request straight back; returns how many.
    let mut refill = |queue: &mut SplitQueue| {
        let mut count = 0;
        while let Some((head, _)) = queue.pop_used().unwrap() {
            let request = request_of_head.remove(&head).unwrap();
            request_of_head.insert(queue.add(&requests[request]).unwrap(), request);
            count += 1;
        }
        queue.notify().unwrap();
        count
    };
    let mut refilled = 0u64;
    // Streaming first, so that the stop finds the worker in the middle of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while refilled < 32 {
        assert!(
            Instant::now() < deadline,
            "only {refilled} reads done in 10 s"
        );
        refilled += refill(queue);
    }
    let limit = Duration::from_secs(10);
    let (stopped_after, base) = std::thread::scope(|scope| {
        let start = Instant::now();
        let stopper = scope.spawn(move || (connection.stop_queue(0), start.elapsed()));
        while !stopper.is_finished() && start.elapsed() < limit {
            refilled += refill(queue);
        }
        let (base, stopped_after) = stopper.join().unwrap();
        (stopped_after, base.unwrap())
    });
    assert!(
        stopped_after < limit,
        "GET_VRING_BASE took {stopped_after:?} while the ring was kept full ({refilled} \
         requests put back); it was answered only once the guest stopped refilling"
    );
    // Everything the backend took was finished before it answered.
    let mut used = refilled;
    while queue.pop_used().unwrap().is_some() {
        used += 1;
    }
    // The ring position is 16 bits.
    assert_eq!(
        base,
        (used % 65536) as u32,
        "GET_VRING_BASE vs requests returned"
    );
    for request in &requests {
        assert_eq!(mem.read_obj::<u8>(request[2].addr).unwrap(), OK);
    }
}

#[test]
fn a_frontend_handing_over_a_socket_loses_only_its_connection() {
    // BACKEND_REQ is not offered, but vhost-user-backend takes the frontend's ack of it anyway,
    // and then SET_BACKEND_REQ_FD's socket, which it checks (getsockopt) before anything else.
    use std::os::unix::net::UnixStream;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::VhostUserFrontend;

    let mut daemon = Daemon::start("backend-req", &[]);
    {
        let mut blk = daemon.connect(1);
        let frontend = blk.connection().frontend();
        let offered = frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(offered | VhostUserProtocolFeatures::BACKEND_REQ)
            .unwrap();
        let (socket, _peer) = UnixStream::pair().unwrap();
        // Refused, or the connection ends: either way, only this connection is affected.
        let _ = frontend.set_backend_request_fd(&socket);
    }
    daemon.assert_serves();
    let mut blk = daemon.connect(1);
    let reply = blk.read(0, 0, 4096).unwrap();
    assert_eq!(reply.status, OK, "{}", daemon.log_text());
    assert_eq!(reply.data, read_file_range(&daemon.image, 0, 4096));
}

#[test]
fn a_memory_region_past_the_end_of_its_file_is_refused() {
    // Mapped as it is, the first access past the file's end would be SIGBUS for the daemon.
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use vhost::VhostBackend;

    // No polling, and the worker left time to go idle: vhost-user-backend installs a table
    // before the backend can check it, so a worker busy at that moment could still touch the
    // bad mapping (a frontend can crash its own daemon that way; see docs/threat-model.md).
    // What this tests is the table's check, with the queues idle.
    let mut daemon = Daemon::start("short-memfd", &["--poll-max-us", "0"]);
    {
        let mut blk = daemon.connect(1);
        std::thread::sleep(Duration::from_millis(50));
        let mut regions = blk.ram().regions().unwrap();
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned at once.
        let short = unsafe {
            OwnedFd::from_raw_fd(libc::memfd_create(c"short".as_ptr(), libc::MFD_CLOEXEC))
        };
        // SAFETY: ftruncate on the descriptor we own.
        assert_eq!(unsafe { libc::ftruncate(short.as_raw_fd(), 4096) }, 0);
        // The region holding the rings, now claimed to live in a 4 KiB file.
        regions[0].mmap_handle = short.as_raw_fd();
        regions[0].mmap_offset = 0;
        let frontend = blk.connection().frontend();
        assert!(
            frontend.set_mem_table(&regions).is_err(),
            "the backend took a region larger than its file"
        );
        // The queue goes on looking at its rings; they must not be read through that mapping.
        blk.queue(0).kick_now().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        daemon.assert_serves();
    }
    let mut blk = daemon.connect(1);
    let reply = blk.read(0, 0, 4096).unwrap();
    assert_eq!(reply.status, OK, "{}", daemon.log_text());
}

#[test]
fn sigterm_and_sigint_stop_cleanly_and_remove_the_socket() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut daemon = Daemon::start("signal", &[]);
        let status = daemon.signal_and_wait(signal);
        assert!(status.success(), "exit {status}: {}", daemon.log_text());
        assert!(!daemon.socket.exists(), "socket left behind");
    }
    // Also while a frontend is connected.
    let mut daemon = Daemon::start("signal-connected", &[]);
    let mut blk = daemon.connect(1);
    assert_eq!(blk.read(0, 0, 512).unwrap().status, OK);
    let status = daemon.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "exit {status}: {}", daemon.log_text());
    assert!(!daemon.socket.exists(), "socket left behind");
}

#[test]
fn stale_socket_is_replaced_and_live_one_is_refused() {
    let scratch = Scratch::new("stale");
    let image = scratch.image(1 << 20);
    let socket = scratch.path("blk.sock");
    drop(UnixListener::bind(&socket).unwrap());
    let daemon = Daemon::start_with(scratch, image.clone(), &[]);
    let mut blk = daemon.connect(1);
    assert_eq!(blk.read(0, 0, 512).unwrap().status, OK);

    // A second daemon on the same (live) socket refuses to start.
    let (status, stderr) = run_cli(&[
        "--socket",
        daemon.socket.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--readonly",
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
}

#[test]
fn second_writer_on_one_image_is_refused() {
    let daemon = Daemon::start("lock", &[]);
    let socket = daemon.scratch.path("other.sock");
    let (status, stderr) = run_cli(&[
        "--socket",
        socket.to_str().unwrap(),
        "--image",
        daemon.image.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("locked"), "{stderr}");
}

fn assert_usage_error(args: &[&str], names: &str) {
    let (status, stderr) = run_cli(args);
    assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: not one line: {stderr}"
    );
    assert!(stderr.starts_with("vhost-user-blk: error: "), "{stderr}");
    assert!(
        stderr.contains(names),
        "{args:?}: {stderr} does not name {names}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_command_lines_are_one_line_errors() {
    assert_usage_error(&["--socket", "/tmp/x.sock"], "--image");
    assert_usage_error(&["--image", "/tmp/x.img"], "--socket");
    assert_usage_error(
        &[
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/tmp/x",
            "--queues",
            "0",
        ],
        "--queues",
    );
    assert_usage_error(
        &[
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/tmp/x",
            "--queues",
            "many",
        ],
        "--queues",
    );
    assert_usage_error(
        &[
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/tmp/x",
            "--queue-size",
            "1000",
        ],
        "--queue-size",
    );
    assert_usage_error(
        &[
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/tmp/x",
            "--frobnicate",
        ],
        "--frobnicate",
    );
    assert_usage_error(
        &[
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/tmp/x",
            "--serial",
            "a-serial-that-is-too-long",
        ],
        "--serial",
    );
    assert_usage_error(
        &[
            "--socket",
            "/tmp/x.sock",
            "--image",
            "/tmp/x",
            "--seccomp",
            "maybe",
        ],
        "--seccomp",
    );

    // A missing image file is not a usage error but names the file.
    let scratch = Scratch::new("cli");
    let missing = scratch.path("missing.img");
    let socket = scratch.path("s.sock");
    let (status, stderr) = run_cli(&[
        "--socket",
        socket.to_str().unwrap(),
        "--image",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing.img") && stderr.contains("No such file"),
        "{stderr}"
    );
    assert!(!socket.exists());

    let (status, _) = run_cli(&["--help"]);
    assert!(status.success());
}

/// A frontend that hands over a full, blocking pipe as a queue's call descriptor stalls that
/// queue's worker for good in its interrupt write (vhost-user-backend writes the descriptor
/// blocking). One SIGTERM must still end the daemon, after its grace period, and remove the
/// socket.
#[test]
fn sigterm_ends_a_daemon_whose_worker_is_stuck_in_a_call_write() {
    use std::os::fd::FromRawFd;
    use vhost::VhostBackend;
    use vmm_sys_util::eventfd::EventFd;

    let mut daemon = Daemon::start("stuck-call", &[]);
    let mut blk = daemon.connect(1);
    let mut fds = [0; 2];
    // SAFETY: a valid array for pipe2's two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let [read_end, write_end] = fds;
    // SAFETY: pipe2 just returned it; owned here alone, closed when the test ends.
    let _read_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(read_end) };
    // Fill the pipe through a non-blocking descriptor of its own (O_NONBLOCK belongs to the
    // open file, so the write end itself stays blocking for the daemon).
    let filler = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{write_end}"))
        .unwrap();
    let chunk = [0u8; 4096];
    while (&filler).write(&chunk).is_ok() {}
    // SAFETY: the descriptor is ours and owned by nothing else from here on.
    let call = unsafe { EventFd::from_raw_fd(write_end) };
    blk.connection()
        .frontend()
        .set_vring_call(0, &call)
        .unwrap();

    let slot = Slot::new(&blk, VIRTIO_BLK_T_IN, 0, 4096);
    assert!(!blk.queue(0).enable_interrupts().unwrap());
    slot.add(&mut blk, 0);
    blk.queue(0).notify().unwrap();
    // The read completes; the interrupt that follows blocks the worker.
    let deadline = Instant::now() + Duration::from_secs(5);
    while slot.status(&blk) != OK {
        assert!(Instant::now() < deadline, "the read never completed");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    let status = daemon.signal_and_wait(libc::SIGTERM);
    assert!(
        !status.success(),
        "a forced stop must not look clean: {status}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "stopped before the grace period: the worker was not stuck"
    );
    let log = daemon.log_text();
    assert!(
        !daemon.socket.exists(),
        "socket left behind ({status}): {log}"
    );
    assert!(log.contains("did not stop"), "{log}");
}

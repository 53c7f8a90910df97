//! The control queue (receive filter, MAC, queue pairs), multi-queue, tap descriptors handed
//! over, client mode, the sandbox and the command line.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use cloister_backends::test_frontend::net::virtio_net::*;
use cloister_backends::test_frontend::net::{features_wanted, plain_header, TestNet};
use cloister_tap::TapQueue;
use common::*;
use vhost::vhost_user::VhostUserFrontend;

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;
const QUIET: Duration = Duration::from_millis(300);

fn arrives(net: &mut TestNet, host: &HostSide, frame: &[u8]) -> bool {
    host.send(frame);
    match net.receive_within(0, QUIET).unwrap() {
        Some(got) => {
            assert_eq!(got.frame, frame);
            true
        }
        None => false,
    }
}

#[test]
fn the_receive_filter_acts_like_a_nic() {
    if !own_network_namespace("the_receive_filter_acts_like_a_nic") {
        return;
    }
    let daemon = Daemon::start("filter", &[]);
    let host = HostSide::open(TAP);
    let mut net = daemon.connect(1);
    net.post_rx(0, 64, 2048).unwrap();
    let other = [0x02, 0xcc, 0, 0, 0, 3];
    let multicast = [0x01, 0x00, 0x5e, 0, 0, 9];
    // Promiscuous until the driver says otherwise.
    assert!(arrives(
        &mut net,
        &host,
        &test_frame(other, PEER_MAC, 100, 1)
    ));
    let promisc = VIRTIO_NET_CTRL_RX_PROMISC as u8;
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_RX as u8, promisc, &[0])
            .unwrap(),
        OK
    );
    assert!(!arrives(
        &mut net,
        &host,
        &test_frame(other, PEER_MAC, 100, 2)
    ));
    assert!(arrives(
        &mut net,
        &host,
        &test_frame(GUEST_MAC, PEER_MAC, 100, 3)
    ));
    assert!(arrives(
        &mut net,
        &host,
        &test_frame([0xff; 6], PEER_MAC, 100, 4)
    ));
    assert!(!arrives(
        &mut net,
        &host,
        &test_frame(multicast, PEER_MAC, 100, 5)
    ));
    // A MAC table: one more unicast address and one multicast group.
    let mut tables = 1u32.to_le_bytes().to_vec();
    tables.extend_from_slice(&other);
    tables.extend_from_slice(&1u32.to_le_bytes());
    tables.extend_from_slice(&multicast);
    let table_set = VIRTIO_NET_CTRL_MAC_TABLE_SET as u8;
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_MAC as u8, table_set, &tables)
            .unwrap(),
        OK
    );
    assert!(arrives(
        &mut net,
        &host,
        &test_frame(other, PEER_MAC, 100, 6)
    ));
    assert!(arrives(
        &mut net,
        &host,
        &test_frame(multicast, PEER_MAC, 100, 7)
    ));
    // A new address for the guest, in the config space too.
    let new_mac = [0x02, 0xdd, 0, 0, 0, 4];
    let addr_set = VIRTIO_NET_CTRL_MAC_ADDR_SET as u8;
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_MAC as u8, addr_set, &new_mac)
            .unwrap(),
        OK
    );
    assert_eq!(net.config().unwrap().0, new_mac);
    assert!(arrives(
        &mut net,
        &host,
        &test_frame(new_mac, PEER_MAC, 100, 8)
    ));
    assert!(!arrives(
        &mut net,
        &host,
        &test_frame(GUEST_MAC, PEER_MAC, 100, 9)
    ));
    // Broadcasts off.
    let no_bcast = VIRTIO_NET_CTRL_RX_NOBCAST as u8;
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_RX as u8, no_bcast, &[1])
            .unwrap(),
        OK
    );
    assert!(!arrives(
        &mut net,
        &host,
        &test_frame([0xff; 6], PEER_MAC, 100, 10)
    ));
    // What makes no sense is refused, and the queue goes on.
    assert_eq!(net.control(99, 0, &[]).unwrap(), ERR);
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_MAC as u8, addr_set, &[1, 0, 0, 0, 0, 1])
            .unwrap(),
        ERR
    );
    assert_eq!(
        net.control(
            VIRTIO_NET_CTRL_MAC as u8,
            table_set,
            &u32::MAX.to_le_bytes()
        )
        .unwrap(),
        ERR
    );
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_RX as u8, promisc, &[]).unwrap(),
        ERR
    );
    assert!(arrives(
        &mut net,
        &host,
        &test_frame(new_mac, PEER_MAC, 100, 11)
    ));
}

/// A UDP frame for the guest from source port `port` (a flow of its own for the tap's
/// steering).
fn flow_frame(port: u16) -> Vec<u8> {
    let mut f = ipv4_frame(GUEST_MAC, 17, port, 64);
    f[6..12].copy_from_slice(&PEER_MAC);
    f
}

/// Sends 64 flows from the host; how many frames each of two pairs received.
fn count_by_pair(net: &mut TestNet, host: &HostSide) -> [usize; 2] {
    let mut counts = [0; 2];
    for port in 1000..1064 {
        host.send(&flow_frame(port));
    }
    for (pair, count) in counts.iter_mut().enumerate() {
        while net.receive_within(pair, QUIET).unwrap().is_some() {
            *count += 1;
        }
    }
    counts
}

#[test]
fn queue_pairs_serve_as_the_driver_enables_them() {
    if !own_network_namespace("queue_pairs_serve_as_the_driver_enables_them") {
        return;
    }
    let daemon = Daemon::start("mq", &["--queues", "2"]);
    let host = HostSide::open(TAP);
    let mut net = daemon.connect(2);
    net.post_rx(0, 128, 2048).unwrap();
    net.post_rx(1, 128, 2048).unwrap();
    let count_by_pair = |net: &mut TestNet| count_by_pair(net, &host);
    // Until the driver sets the pairs, only the first is used (virtio 1.2, 5.1.6.5.5).
    assert_eq!(count_by_pair(&mut net), [64, 0]);
    let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_MQ as u8, set, &2u16.to_le_bytes())
            .unwrap(),
        OK
    );
    let both = count_by_pair(&mut net);
    assert_eq!(both[0] + both[1], 64, "{both:?}");
    assert!(
        both[0] > 0 && both[1] > 0,
        "the tap used one queue only: {both:?}"
    );
    // Both transmit queues send.
    for pair in 0..2 {
        let out = test_frame(PEER_MAC, GUEST_MAC, 200, pair as u64);
        net.send(pair, &plain_header(), &out).unwrap();
        assert_eq!(
            host.receive(TEST_ETHERTYPE, Duration::from_secs(5)),
            Some(out)
        );
    }
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_MQ as u8, set, &3u16.to_le_bytes())
            .unwrap(),
        ERR
    );
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_MQ as u8, set, &0u16.to_le_bytes())
            .unwrap(),
        ERR
    );
    assert_eq!(
        net.control(VIRTIO_NET_CTRL_MQ as u8, set, &1u16.to_le_bytes())
            .unwrap(),
        OK
    );
    assert_eq!(count_by_pair(&mut net), [64, 0]);
}

#[test]
fn without_our_control_queue_the_frontend_picks_pairs_by_enabling_rings() {
    if !own_network_namespace("without_our_control_queue_the_frontend_picks_pairs") {
        return;
    }
    let daemon = Daemon::start("mq-no-ctrl", &["--queues", "2"]);
    let host = HostSide::open(TAP);
    // As QEMU does: it handles the control queue itself and enables the rings of the pairs
    // the driver asked for.
    let bit = |feature: u32| 1u64 << feature;
    let own_control = bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
        | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        | bit(VIRTIO_NET_F_MQ);
    let mut net = daemon.connect_with(2, features_wanted() & !own_control);
    net.post_rx(0, 128, 2048).unwrap();
    net.post_rx(1, 128, 2048).unwrap();
    // The test frontend enabled every ring it started.
    let both = count_by_pair(&mut net, &host);
    assert_eq!(both[0] + both[1], 64, "{both:?}");
    assert!(
        both[0] > 0 && both[1] > 0,
        "the tap used one queue only: {both:?}: {}",
        daemon.log_text()
    );
    let frontend = net.connection().frontend();
    frontend.set_vring_enable(2, false).unwrap();
    frontend.set_vring_enable(3, false).unwrap();
    assert_eq!(count_by_pair(&mut net, &host), [64, 0]);
    let frontend = net.connection().frontend();
    frontend.set_vring_enable(2, true).unwrap();
    frontend.set_vring_enable(3, true).unwrap();
    let again = count_by_pair(&mut net, &host);
    assert!(again[0] > 0 && again[1] > 0, "{again:?}");
}

#[test]
fn tap_descriptors_handed_over_need_no_privilege() {
    if !own_network_namespace("tap_descriptors_handed_over_need_no_privilege") {
        return;
    }
    // What cloister's managed mode does: open the tap itself and hand the queues over.
    let queues = TapQueue::open_queues(TAP, 2).unwrap();
    cloister_tap::Interface::new(TAP).unwrap().up().unwrap();
    let fds: Vec<i32> = queues.iter().map(|q| q.as_raw_fd()).collect();
    let (a, b) = (fds[0].to_string(), fds[1].to_string());
    let mac = format_mac(GUEST_MAC);
    let args = [
        "--tap-fd", &a, "--tap-fd", &b, "--queues", "2", "--mac", &mac,
    ];
    let daemon = Daemon::start_raw("tap-fd", &args, Some(fds.clone()));
    let host = HostSide::open(TAP);
    let mut net = daemon.connect(1);
    net.post_rx(0, 16, 2048).unwrap();
    assert!(arrives(
        &mut net,
        &host,
        &test_frame(GUEST_MAC, PEER_MAC, 300, 1)
    ));
    let out = test_frame(PEER_MAC, GUEST_MAC, 300, 2);
    net.send(0, &plain_header(), &out).unwrap();
    assert_eq!(
        host.receive(TEST_ETHERTYPE, Duration::from_secs(5)),
        Some(out)
    );
    assert_eq!(proc_status(daemon.pid(), "CapEff"), "0000000000000000");
    assert_eq!(proc_status(daemon.pid(), "Seccomp"), "2");
    drop(queues);
}

#[test]
fn a_client_backend_connects_and_comes_back() {
    if !own_network_namespace("a_client_backend_connects_and_comes_back") {
        return;
    }
    let scratch = Scratch::new("client");
    let socket = scratch.path("vmm.sock");
    let socket_arg = socket.to_str().unwrap().to_owned();
    // The backend starts first and waits for the frontend to listen.
    let mac = format_mac(GUEST_MAC);
    let mut backend = std::process::Command::new(BINARY)
        .args([
            "--socket",
            &socket_arg,
            "--client",
            "--tap",
            TAP,
            "--mac",
            &mac,
        ])
        .stderr(std::fs::File::create(scratch.path("log")).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let listener = UnixListener::bind(&socket).unwrap();
    let host = HostSide::open(TAP);
    for round in 0..2u64 {
        let (stream, _) = listener.accept().unwrap();
        let mut net = TestNet::from_stream(stream, 1, 256, features_wanted()).unwrap();
        net.post_rx(0, 16, 2048).unwrap();
        assert!(arrives(
            &mut net,
            &host,
            &test_frame(GUEST_MAC, PEER_MAC, 300, round)
        ));
        // Dropping the connection: the backend connects again.
    }
    let _ = backend.kill();
    let _ = backend.wait();
}

#[test]
fn bad_command_lines_name_the_problem() {
    let cases: &[(&[&str], &str)] = &[
        (&["--socket", "/tmp/x"], "--tap"),
        (
            &["--socket", "/tmp/x", "--tap", "t", "--tap-fd", "3"],
            "--tap-fd",
        ),
        (
            &["--socket", "/tmp/x", "--tap-fd", "3", "--queues", "2"],
            "one tap queue per queue pair",
        ),
        (
            &["--socket", "/tmp/x", "--tap", "t", "--mac", "zz"],
            "not a MAC address",
        ),
        (
            &["--socket", "/tmp/x", "--tap", "t", "--queues", "99"],
            "--queues",
        ),
        (
            &["--socket", "/tmp/x", "--tap-fd", "987"],
            "--tap-fd 987: not an open descriptor",
        ),
        (
            &[
                "--socket",
                "/tmp/x",
                "--tap",
                "a-name-far-too-long-for-linux",
            ],
            "longer than 15 bytes",
        ),
    ];
    for (args, expected) in cases {
        let (status, stderr) = run_cli(args);
        assert!(!status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    // A descriptor that is not a tap.
    let file = std::fs::File::open("/dev/null").unwrap();
    let fd = file.as_raw_fd();
    let output = std::process::Command::new(BINARY)
        .args(["--socket", "/tmp/x", "--tap-fd", &fd.to_string()])
        .output()
        .unwrap();
    // /dev/null is close-on-exec here, so the daemon sees a closed descriptor or, if a
    // descriptor with that number is open in it, not a tap: either way it says so.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("--tap-fd {fd}"))
            || stderr.contains(&format!("tap descriptor {fd}")),
        "{stderr}"
    );
}

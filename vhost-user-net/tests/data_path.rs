//! Frames between the guest (the test frontend) and the tap's host side (a packet socket), in
//! a network namespace of each test's own.

mod common;

use std::time::Duration;

use cloister_backends::test_frontend::net::virtio_net::*;
use cloister_backends::test_frontend::net::{features_wanted, plain_header, HEADER_LEN};
use common::*;

const WAIT: Duration = Duration::from_secs(5);

fn bit(feature: u32) -> u64 {
    1u64 << feature
}

#[test]
fn frames_cross_both_ways_intact() {
    if !own_network_namespace("frames_cross_both_ways_intact") {
        return;
    }
    let daemon = Daemon::start("both-ways", &[]);
    let host = HostSide::open(TAP);
    let mut net = daemon.connect(1);
    net.post_rx(0, 256, 2048).unwrap();
    for i in 0..500u64 {
        let len = 60 + (i as usize * 37) % 1455;
        let out = test_frame(PEER_MAC, GUEST_MAC, len, i);
        net.send(0, &plain_header(), &out).unwrap();
        let seen = host
            .receive(TEST_ETHERTYPE, WAIT)
            .unwrap_or_else(|| panic!("frame {i} never reached the tap: {}", daemon.log_text()));
        assert_eq!(seen, out, "frame {i} changed on its way to the tap");

        let back = test_frame(GUEST_MAC, PEER_MAC, len, 1000 + i);
        host.send(&back);
        let got = receive_test_frame(&mut net, 0)
            .unwrap_or_else(|e| panic!("frame {i} never reached the guest: {e}"));
        assert_eq!(got.frame, back, "frame {i} changed on its way to the guest");
        assert_eq!(got.num_buffers(), 1);
        assert_eq!(
            got.header[..10],
            [0; 10],
            "a plain frame needs nothing done"
        );
    }
}

#[test]
fn a_burst_from_the_guest_goes_out_in_order() {
    if !own_network_namespace("a_burst_from_the_guest_goes_out_in_order") {
        return;
    }
    bursts_go_out_in_order(&Daemon::start("burst", &[]));
}

#[test]
fn a_polling_worker_sends_bursts_in_order() {
    if !own_network_namespace("a_polling_worker_sends_bursts_in_order") {
        return;
    }
    // Bursts come back sooner than the window: the worker polls the queue between them (in
    // its sandbox: the poll and sched_yield it needs are allowed).
    let daemon = Daemon::start("burst-poll", &["--poll-max-us", "2000"]);
    bursts_go_out_in_order(&daemon);
    assert!(
        !daemon.log_text().contains("panicked"),
        "{}",
        daemon.log_text()
    );
}

fn bursts_go_out_in_order(daemon: &Daemon) {
    let host = HostSide::open(TAP);
    let mut net = daemon.connect(1);
    for round in 0..20u64 {
        let frames: Vec<Vec<u8>> = (0..64)
            .map(|i| test_frame(PEER_MAC, GUEST_MAC, 1514, round * 64 + i))
            .collect();
        net.send_batch(0, &frames).unwrap();
        for (i, frame) in frames.iter().enumerate() {
            let seen = host
                .receive(TEST_ETHERTYPE, WAIT)
                .unwrap_or_else(|| panic!("round {round}: frame {i} lost: {}", daemon.log_text()));
            assert_eq!(&seen, frame, "round {round}: frame {i}");
        }
    }
}

#[test]
fn a_jumbo_frame_spans_mergeable_buffers() {
    if !own_network_namespace("a_jumbo_frame_spans_mergeable_buffers") {
        return;
    }
    let daemon = Daemon::start("jumbo", &["--mtu", "9000"]);
    let host = HostSide::open(TAP);
    let mut net = daemon.connect(1);
    let (_, _, _, mtu) = net.config().unwrap();
    assert_eq!(mtu, 9000);
    net.post_rx(0, 64, 1024).unwrap();
    let frame = test_frame(GUEST_MAC, PEER_MAC, 9014, 7);
    host.send(&frame);
    let got = receive_test_frame(&mut net, 0).unwrap();
    assert_eq!(got.frame.len(), frame.len());
    assert_eq!(got.frame, frame);
    let expected = (frame.len() + HEADER_LEN).div_ceil(1024);
    assert_eq!(got.buffers, expected);
    assert_eq!(usize::from(got.num_buffers()), expected);
    // And from the guest: a 9014-byte frame goes out whole.
    let out = test_frame(PEER_MAC, GUEST_MAC, 9014, 8);
    net.send(0, &plain_header(), &out).unwrap();
    assert_eq!(host.receive(TEST_ETHERTYPE, WAIT), Some(out));
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_buffer() {
    if !own_network_namespace("without_mergeable_buffers_a_frame_takes_one_buffer") {
        return;
    }
    let daemon = Daemon::start("no-mrg", &[]);
    let host = HostSide::open(TAP);
    let mut net = daemon.connect_with(1, features_wanted() & !bit(VIRTIO_NET_F_MRG_RXBUF));
    // Too small for the frame: the frame is dropped, not split, and the buffer comes back
    // empty (a driver counts a length error and posts it again).
    net.post_rx(0, 1, 512).unwrap();
    host.send(&test_frame(GUEST_MAC, PEER_MAC, 1000, 1));
    let small = net.receive(0).unwrap_err().to_string();
    assert!(small.contains("a 0-byte receive"), "{small}");
    // The test frontend posted that buffer again; a frame that fits takes it.
    net.post_rx(0, 8, 1600).unwrap();
    let fits = test_frame(GUEST_MAC, PEER_MAC, 400, 3);
    host.send(&fits);
    assert_eq!(receive_test_frame(&mut net, 0).unwrap().frame, fits);
    let frame = test_frame(GUEST_MAC, PEER_MAC, 1500, 2);
    host.send(&frame);
    let got = receive_test_frame(&mut net, 0).unwrap();
    assert_eq!(got.frame, frame);
    assert_eq!(got.buffers, 1);
    assert_eq!(got.num_buffers(), 1);
}

#[test]
fn a_burst_fills_mergeable_buffers_in_order_however_many_are_posted() {
    if !own_network_namespace("a_burst_fills_mergeable_buffers_in_order") {
        return;
    }
    let daemon = Daemon::start("burst-rx", &["--mtu", "9000"]);
    let host = HostSide::open(TAP);
    let mut net = daemon.connect(1);
    // Room for the longest (64 KiB) frame and a few more: the first frames are read straight
    // into these buffers; as they run short, frames go through the worker's own buffer, and
    // once none are left they wait for the buffers `receive` posts again.
    net.post_rx(0, 100, 1024).unwrap();
    let frames: Vec<Vec<u8>> = (0..60u64)
        .map(|i| {
            let len = [60, 1514, 4000, 9014][i as usize % 4];
            test_frame(GUEST_MAC, PEER_MAC, len, i)
        })
        .collect();
    for frame in &frames {
        host.send(frame);
    }
    for (i, frame) in frames.iter().enumerate() {
        let got = receive_test_frame(&mut net, 0)
            .unwrap_or_else(|e| panic!("frame {i}: {e}: {}", daemon.log_text()));
        assert_eq!(&got.frame, frame, "frame {i} changed or came out of order");
        let expected = (frame.len() + HEADER_LEN).div_ceil(1024);
        assert_eq!(got.buffers, expected, "frame {i}");
        assert_eq!(usize::from(got.num_buffers()), expected, "frame {i}");
    }
}

#[test]
fn without_mergeable_buffers_or_segmentation_a_frame_lands_in_one_buffer() {
    if !own_network_namespace("without_mergeable_buffers_or_segmentation") {
        return;
    }
    let daemon = Daemon::start("no-mrg-no-gso", &[]);
    let host = HostSide::open(TAP);
    let without = bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN);
    let mut net = daemon.connect_with(1, features_wanted() & !without);
    // Without segmentation offloads the longest frame is the MTU's: a 1600-byte buffer holds
    // it, so frames are read straight into one buffer each.
    net.post_rx(0, 8, 1600).unwrap();
    for i in 0..40u64 {
        let frame = test_frame(GUEST_MAC, PEER_MAC, 60 + (i as usize * 97) % 1455, i);
        host.send(&frame);
        let got = receive_test_frame(&mut net, 0)
            .unwrap_or_else(|e| panic!("frame {i}: {e}: {}", daemon.log_text()));
        assert_eq!(got.frame, frame, "frame {i}");
        assert_eq!((got.buffers, got.num_buffers()), (1, 1), "frame {i}");
    }
}

#[test]
fn large_segments_from_the_guest_reach_the_tap_unsplit() {
    if !own_network_namespace("large_segments_from_the_guest_reach_the_tap_unsplit") {
        return;
    }
    let daemon = Daemon::start("tso", &[]);
    let host = HostSide::open(TAP);
    let mut net = daemon.connect(1);
    // A 20000-byte TCP segment with a partial checksum, as a driver with HOST_TSO4 sends it.
    let frame = ipv4_frame(PEER_MAC, 6, 4000, 20000);
    let mut header = plain_header();
    header[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    header[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    header[2..4].copy_from_slice(&(14u16 + 20 + 20).to_le_bytes()); // hdr_len
    header[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
    header[6..8].copy_from_slice(&(14u16 + 20).to_le_bytes()); // csum_start
    header[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    net.send(0, &header, &frame).unwrap();
    let seen = host
        .receive(0x0800, WAIT)
        .unwrap_or_else(|| panic!("the segment never reached the tap: {}", daemon.log_text()));
    assert_eq!(seen.len(), frame.len(), "the tap got it as one segment");
    assert_eq!(seen[54..], frame[54..], "payload intact");
}

#[test]
fn the_config_space_describes_the_device() {
    if !own_network_namespace("the_config_space_describes_the_device") {
        return;
    }
    let daemon = Daemon::start("config", &["--queues", "2", "--mtu", "1400"]);
    let mut net = daemon.connect(1);
    let (mac, status, pairs, mtu) = net.config().unwrap();
    assert_eq!(mac, GUEST_MAC);
    assert_eq!(u32::from(status), VIRTIO_NET_S_LINK_UP);
    assert_eq!(pairs, 2);
    assert_eq!(mtu, 1400);
    let offered = net.connection().negotiation().offered;
    for feature in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        // Every kernel this runs on has tap checksum and TSO offloads.
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_ne!(offered & bit(feature), 0, "feature {feature} not offered");
    }
}

//! `net-tap`: the host's side of bench/net, and its ceilings.
//!
//! ```text
//! net-tap feed IFACE SIZE SECONDS    send SIZE-byte frames into interface IFACE (a tap's host
//!                                    side: they come out of its descriptor, to the guest) with
//!                                    a packet socket, batches of 64 per sendmmsg
//! net-tap write TAP SIZE SECONDS     the guest-to-host ceiling: write SIZE-byte frames (with a
//!                                    virtio-net header) straight to a queue of tap TAP
//! net-tap write-batched TAP SIZE SECONDS
//!                                    the same, 64 writes per io_uring_enter (as our backend
//!                                    sends): what the tap takes without a system call a frame
//! net-tap read TAP SECONDS           the host-to-guest ceiling: read TAP's queue as fast as it
//!                                    gives frames (while `feed` sends)
//! ```
//! Each prints `frames=N seconds=S pps=P`. Frames are IPv4/UDP to a made-up host, so the
//! host's stack drops them at once.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cloister_tap::TapQueue;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["feed", iface, size, secs] => {
            number(size).and_then(|s| seconds(secs).and_then(|d| feed(iface, s, d)))
        }
        ["write", tap, size, secs] => {
            number(size).and_then(|s| seconds(secs).and_then(|d| write_tap(tap, s, d)))
        }
        ["write-batched", tap, size, secs] => {
            number(size).and_then(|s| seconds(secs).and_then(|d| write_tap_batched(tap, s, d)))
        }
        ["read", tap, secs] => seconds(secs).and_then(|d| read_tap(tap, d)),
        _ => Err(
            "usage: net-tap feed IFACE SIZE SECONDS | write TAP SIZE SECONDS | \
             write-batched TAP SIZE SECONDS | read TAP SECONDS"
                .into(),
        ),
    };
    match result {
        Ok((frames, elapsed)) => {
            let secs = elapsed.as_secs_f64();
            println!(
                "frames={frames} seconds={secs:.3} pps={:.0}",
                frames as f64 / secs
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("net-tap: {e}");
            ExitCode::FAILURE
        }
    }
}

fn number(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (60..=9000).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a frame size from 60 to 9000")),
    }
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("'{s}' is not a number of seconds"))
}

/// An Ethernet/IPv4/UDP frame of `size` bytes to 198.18.0.1 (a benchmarking range).
fn frame(size: usize) -> Vec<u8> {
    let mut f = vec![0u8; size];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[198, 18, 0, 2]);
    f[30..34].copy_from_slice(&[198, 18, 0, 1]);
    f[34..36].copy_from_slice(&1024u16.to_be_bytes());
    f[36..38].copy_from_slice(&1025u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn feed(iface: &str, size: usize, d: Duration) -> Result<(u64, Duration), String> {
    let name = std::ffi::CString::new(iface).map_err(|_| "bad interface name")?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {iface}"));
    }
    // SAFETY: socket(2) with constant arguments; owned right after.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "packet socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int. Straight to the device: no qdisc in the measurement.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    // SAFETY: plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    let f = frame(size);
    const BATCH: usize = 64;
    let mut iov = [libc::iovec {
        iov_base: f.as_ptr() as *mut libc::c_void,
        iov_len: f.len(),
    }; BATCH];
    // SAFETY: plain data, filled below.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_name = (&mut addr as *mut libc::sockaddr_ll).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < d {
        // SAFETY: BATCH valid headers pointing at live buffers.
        let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        } else {
            // The tap's queue is full (its reader is behind): let it catch up.
            std::thread::yield_now();
        }
    }
    Ok((sent, start.elapsed()))
}

/// A queue of tap `tap`, up, with a 12-byte virtio-net header, and a frame for it.
fn tap_for_writing(tap: &str, size: usize) -> Result<(TapQueue, Vec<u8>), String> {
    let q = TapQueue::open(tap, false).map_err(|e| e.to_string())?;
    q.set_vnet_hdr_len(12).map_err(|e| e.to_string())?;
    cloister_tap::Interface::new(q.name())
        .and_then(|i| i.up())
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 12];
    buf.extend(frame(size));
    Ok((q, buf))
}

fn write_tap(tap: &str, size: usize, d: Duration) -> Result<(u64, Duration), String> {
    let (q, buf) = tap_for_writing(tap, size)?;
    let start = Instant::now();
    let mut written = 0u64;
    while start.elapsed() < d {
        for _ in 0..64 {
            let iov = [libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            }];
            // SAFETY: one iovec over our buffer.
            if unsafe { q.writev(&iov) }.is_ok() {
                written += 1;
            }
        }
    }
    Ok((written, start.elapsed()))
}

fn write_tap_batched(tap: &str, size: usize, d: Duration) -> Result<(u64, Duration), String> {
    use io_uring::{opcode, types, IoUring};
    const BATCH: usize = 64;
    let (q, buf) = tap_for_writing(tap, size)?;
    let ring_error = |e: std::io::Error| format!("io_uring: {e}");
    let mut ring: IoUring = IoUring::builder().build(BATCH as u32).map_err(ring_error)?;
    ring.submitter()
        .register_files(&[q.as_raw_fd()])
        .map_err(ring_error)?;
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let start = Instant::now();
    let mut written = 0u64;
    while start.elapsed() < d {
        for _ in 0..BATCH {
            let sqe = opcode::Writev::new(types::Fixed(0), &iov, 1).build();
            // SAFETY: the iovec and the buffer outlive the wait for every completion below.
            unsafe { ring.submission().push(&sqe) }.map_err(|e| e.to_string())?;
        }
        ring.submit_and_wait(BATCH).map_err(ring_error)?;
        written += ring.completion().filter(|c| c.result() > 0).count() as u64;
    }
    Ok((written, start.elapsed()))
}

fn read_tap(tap: &str, d: Duration) -> Result<(u64, Duration), String> {
    let q = TapQueue::open(tap, false).map_err(|e| e.to_string())?;
    cloister_tap::Interface::new(q.name())
        .and_then(|i| i.up())
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65600];
    let start = Instant::now();
    let mut got = 0u64;
    while start.elapsed() < d {
        match q.read(&mut buf) {
            Ok(Some(_)) => got += 1,
            Ok(None) => std::thread::yield_now(),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok((got, start.elapsed()))
}

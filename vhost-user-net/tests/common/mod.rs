//! Test harness: runs the real `vhost-user-net` binary on a tap in a network namespace of the
//! test's own, drives it with the test frontend from `cloister-backends` (the guest's side),
//! and sends and captures frames on the tap's host side with a packet socket.

#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cloister_backends::test_frontend::net::{features_wanted, TestNet};

pub const BINARY: &str = env!("CARGO_BIN_EXE_vhost-user-net");
/// The tap each test's daemon creates, in the test's own network namespace.
pub const TAP: &str = "vmtap0";
/// An EtherType for local experiments (IEEE 802): nothing else on the tap sends it.
pub const TEST_ETHERTYPE: u16 = 0x88b5;
pub const GUEST_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
pub const PEER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];

/// Moves the calling thread (each test runs on a thread of its own) into a new network
/// namespace, so each test has its own taps and sees only its own frames. The daemons it
/// starts inherit it. Needs CAP_SYS_ADMIN; a host without it skips, saying so.
pub fn own_network_namespace(test: &str) -> bool {
    // SAFETY: unshare(2) with a constant flag; affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "SKIPPED {test}: cannot make a network namespace ({}); these tests need root",
            io::Error::last_os_error()
        );
        return false;
    }
    // No IPv6 on the taps to come: the kernel's own neighbour discovery and multicast
    // listener reports would take receive buffers the tests count on. (/proc/sys/net is the
    // opening thread's namespace.)
    for key in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6");
        if let Err(e) = std::fs::write(&path, "1") {
            eprintln!("{test}: cannot write {path}: {e}");
        }
    }
    true
}

/// A scratch directory removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cloister-net-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running daemon; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub scratch: Scratch,
}

impl Daemon {
    /// Starts the daemon on a new tap `TAP` with the guest MAC `GUEST_MAC` and `args` added.
    pub fn start(name: &str, args: &[&str]) -> Self {
        let mac = format_mac(GUEST_MAC);
        let mut all = vec!["--tap", TAP, "--mac", &mac, "--log-level", "debug"];
        all.extend_from_slice(args);
        Self::start_raw(name, &all, None)
    }

    /// Starts the daemon with exactly `args` (plus --socket), handing it `inherit` (descriptor
    /// numbers kept open across exec).
    pub fn start_raw(name: &str, args: &[&str], inherit: Option<Vec<RawFd>>) -> Self {
        let scratch = Scratch::new(name);
        let socket = scratch.path("net.sock");
        let log = scratch.path("daemon.log");
        let mut command = Command::new(BINARY);
        command
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create log"));
        if let Some(fds) = inherit {
            use std::os::unix::process::CommandExt;
            // SAFETY: only fcntl between fork and exec, on descriptors the test owns.
            unsafe {
                command.pre_exec(move || {
                    for &fd in &fds {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                })
            };
        }
        let child = command.spawn().expect("spawn vhost-user-net");
        let mut daemon = Self {
            child: Some(child),
            socket,
            log,
            scratch,
        };
        daemon.wait_for_socket();
        daemon
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Some(status) = self.try_wait() {
                panic!("daemon exited early with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "no socket after 10 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn connect(&self, pairs: usize) -> TestNet {
        self.connect_with(pairs, features_wanted())
    }

    pub fn connect_with(&self, pairs: usize, wanted: u64) -> TestNet {
        TestNet::connect(&self.socket, pairs, 256, wanted)
            .unwrap_or_else(|e| panic!("connect: {e:?}; daemon log: {}", self.log_text()))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits (at most 10 s) for the exit status.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored signal {signal}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the binary with `args` (no daemon expected) and returns (status, stderr).
pub fn run_cli(args: &[&str]) -> (ExitStatus, String) {
    let output = Command::new(BINARY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vhost-user-net");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The host side of the tap: a packet socket bound to it, which sees every frame the guest
/// sends and sends frames the guest receives.
pub struct HostSide {
    fd: OwnedFd,
    ifindex: i32,
}

impl HostSide {
    /// Opens it once the interface exists (the daemon creates it) and is up.
    pub fn open(interface: &str) -> Self {
        let name = std::ffi::CString::new(interface).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ifindex = loop {
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if index != 0 {
                break index as i32;
            }
            assert!(Instant::now() < deadline, "no interface {interface}");
            std::thread::sleep(Duration::from_millis(10));
        };
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = sockaddr_ll(ifindex, protocol);
        // SAFETY: bind with a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with an int of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                4,
            )
        };
        Self { fd, ifindex }
    }

    /// Sends `frame` (Ethernet header included) out of the tap, to the guest.
    pub fn send(&self, frame: &[u8]) {
        let addr = sockaddr_ll(self.ifindex, 0);
        // SAFETY: sendto with a buffer and a sockaddr_ll of the sizes given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame the guest sent with `ethertype` (others, such as the kernel's own IPv6
    /// traffic, are skipped), or None after `wait`.
    pub fn receive(&self, ethertype: u16, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            if ready <= 0 {
                return None;
            }
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom into buffers of the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 14 {
                continue;
            }
            // Our own transmissions come back as PACKET_OUTGOING: not the guest's.
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..n as usize];
            if u16::from_be_bytes([frame[12], frame[13]]) == ethertype {
                return Some(frame.to_vec());
            }
        }
    }
}

fn sockaddr_ll(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    addr
}

/// An Ethernet frame of `TEST_ETHERTYPE` from `src` to `dst`, `len` bytes in all, its payload
/// made from `seed`.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while frame.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        frame.push((state >> 24) as u8);
    }
    frame
}

/// The one's-complement sum of `data` (IPv4 header and TCP/UDP checksums).
pub fn inet_checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 frame from 10.0.0.2 to 10.0.0.1 carrying UDP (`protocol` 17) or TCP (6) with
/// `payload` bytes; its IP header checksum filled in, the transport checksum left partial (the
/// pseudo-header sum, as a driver leaves it for the device with NEEDS_CSUM).
pub fn ipv4_frame(dst: [u8; 6], protocol: u8, src_port: u16, payload: usize) -> Vec<u8> {
    let transport_len = if protocol == 6 { 20 } else { 8 };
    let total = 20 + transport_len + payload;
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    f.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
    let sum = inet_checksum(&f[ip_start..ip_start + 20], 0);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    if protocol == 6 {
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    // The pseudo-header sum, not inverted, where the checksum goes.
    let mut pseudo = 0u32;
    for w in [[10u8, 0], [0, 2], [10, 0], [0, 1]] {
        pseudo += u32::from(u16::from_be_bytes(w));
    }
    pseudo += u32::from(protocol) + (transport_len + payload) as u32;
    while pseudo > 0xffff {
        pseudo = (pseudo & 0xffff) + (pseudo >> 16);
    }
    let csum_at = ip_start + 20 + if protocol == 6 { 16 } else { 6 };
    f[csum_at..csum_at + 2].copy_from_slice(&(pseudo as u16).to_be_bytes());
    f.extend((0..payload).map(|i| (i % 251) as u8));
    f
}

/// Reads a process's status line `key` (`Seccomp`, `CapEff`, ...).
pub fn proc_status(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// The next frame of `TEST_ETHERTYPE` the guest receives on `pair`, skipping what the host's
/// kernel sends on its own (IPv6 neighbour discovery and the like).
pub fn receive_test_frame(
    net: &mut cloister_backends::test_frontend::net::TestNet,
    pair: usize,
) -> Result<cloister_backends::test_frontend::net::Received, String> {
    for _ in 0..100 {
        let got = net.receive(pair).map_err(|e| e.to_string())?;
        if got.frame.len() >= 14 && got.frame[12..14] == TEST_ETHERTYPE.to_be_bytes() {
            return Ok(got);
        }
    }
    Err("only other frames".into())
}

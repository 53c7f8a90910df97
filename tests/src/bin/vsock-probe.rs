//! Both ends of a vsock conversation, for the lab's vsock tests: in the guest over AF_VSOCK,
//! on the host over the hybrid vsock unix socket (Cloud Hypervisor's and Firecracker's model,
//! which vhost-device-vsock serves).
//!
//! ```text
//! vsock-probe guest-serve PORT              accept one connection on vsock PORT, echo a line
//! vsock-probe guest-connect CID PORT MSG    send MSG to CID:PORT, print the reply
//! vsock-probe host-serve PATH               accept one connection on unix PATH, echo a line
//! vsock-probe host-connect PATH PORT MSG    "CONNECT PORT" through PATH, send MSG, print reply
//! ```
//!
//! A server replies `echo:` and the line it got. Every wait is bounded (30 s); a failure is one
//! line on stderr and exit status 1.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["guest-serve", port] => port_of(port).and_then(guest_serve),
        ["guest-connect", cid, port, msg] => {
            let cid = cid.parse().map_err(|_| format!("'{cid}' is not a CID"));
            cid.and_then(|cid| guest_connect(cid, port_of(port)?, msg))
        }
        ["host-serve", path] => host_serve(path),
        ["host-connect", path, port, msg] => {
            port_of(port).and_then(|port| host_connect(path, port, msg))
        }
        _ => Err(
            "usage: vsock-probe guest-serve PORT | guest-connect CID PORT MSG | \
                  host-serve PATH | host-connect PATH PORT MSG"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn port_of(s: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("'{s}' is not a port"))
}

/// Reads one line from `stream` and answers `echo:LINE`; returns the line.
fn echo_one<S: std::io::Read + Write>(stream: S) -> Result<String, String> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    let line = line.trim_end().to_string();
    writeln!(reader.get_mut(), "echo:{line}").map_err(|e| format!("reply: {e}"))?;
    Ok(line)
}

/// Sends `msg` and returns the reply line.
fn ask<S: std::io::Read + Write>(reader: &mut BufReader<S>, msg: &str) -> Result<String, String> {
    writeln!(reader.get_mut(), "{msg}").map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .map_err(|e| format!("read the reply: {e}"))?;
    Ok(reply.trim_end().to_string())
}

fn host_serve(path: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))?;
    println!("host-serve: listening on {path}");
    let (stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).ok();
    let line = echo_one(stream)?;
    println!("host-serve: got {line}");
    Ok(())
}

/// How many connections a probe tries (host-connect) or serves (guest-serve) before giving up.
const ATTEMPTS: u32 = 5;

/// Connects through the hybrid vsock socket, again after a reset: a host-initiated vsock
/// connection can be reset by the backend in a race with the guest's listener (Cloud
/// Hypervisor's issue 3485 saw the same), which orchestrators such as Kata answer by retrying.
fn host_connect(path: &str, port: u32, msg: &str) -> Result<(), String> {
    let mut last_error = String::new();
    for attempt in 1..=ATTEMPTS {
        match host_connect_once(path, port, msg) {
            Ok(()) => return Ok(()),
            Err(e) => {
                eprintln!("vsock-probe: connection attempt {attempt} failed: {e}");
                last_error = e;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Err(last_error)
}

fn host_connect_once(path: &str, port: u32, msg: &str) -> Result<(), String> {
    let stream = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).ok();
    let mut reader = BufReader::new(stream);
    let ok = ask(&mut reader, &format!("CONNECT {port}"))?;
    if !ok.starts_with("OK ") {
        return Err(format!("CONNECT {port}: the backend answered '{ok}'"));
    }
    let reply = ask(&mut reader, msg)?;
    println!("host-connect: {reply}");
    Ok(())
}

/// An AF_VSOCK stream socket.
fn vsock_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "socket(AF_VSOCK): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt with a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
    Ok(fd)
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn guest_serve(port: u32) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: bind and listen on our socket with a valid address of `len` bytes.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    } != 0
    {
        return Err(os_error("bind"));
    }
    // SAFETY: as above.
    if unsafe { libc::listen(fd.as_raw_fd(), 1) } != 0 {
        return Err(os_error("listen"));
    }
    println!("guest-serve: listening on port {port}");
    // A connection the transport resets under us (the host side retries) is not the end:
    // serve until one conversation completes.
    let mut last_error = String::new();
    for attempt in 1..=ATTEMPTS {
        // SAFETY: accept(2) without the peer's address.
        let conn = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            return Err(os_error("accept"));
        }
        // SAFETY: a fresh descriptor nothing else owns; a vsock stream reads and writes like one.
        let stream = unsafe { UnixStream::from_raw_fd(conn) };
        match echo_one(stream) {
            Ok(line) => {
                println!("guest-serve: got {line}");
                return Ok(());
            }
            Err(e) => {
                eprintln!("guest-serve: connection {attempt}: {e}");
                last_error = e;
            }
        }
    }
    Err(last_error)
}

fn guest_connect(cid: u32, port: u32, msg: &str) -> Result<(), String> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: connect our socket to a valid address of `len` bytes.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            len,
        )
    } != 0
    {
        return Err(os_error(&format!("connect to {cid}:{port}")));
    }
    // SAFETY: ownership moves from `fd` to the stream.
    let stream = unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) };
    let mut reader = BufReader::new(stream);
    let reply = ask(&mut reader, msg)?;
    println!("guest-connect: {reply}");
    Ok(())
}

//! A relay between a frontend and `vhost-user-backend`, for frontends that send
//! `SET_VRING_ENABLE` before `SET_FEATURES`.
//!
//! QEMU's virtio-net attaches its queue pairs to a vhost-user backend when the device is
//! created, long before the guest's driver acknowledges features: it sends `SET_VRING_ENABLE`
//! as soon as the backend *offers* `VHOST_USER_F_PROTOCOL_FEATURES`. rust-vmm's `vhost` crate
//! (0.18) refuses that request until `SET_FEATURES` has acknowledged the bit, and the refusal
//! ends the connection, so QEMU cannot use a vhost-user-backend net device at all. Until the
//! crate accepts it, the daemon puts this relay in between: the frontend's messages go through
//! unchanged, except a `SET_VRING_ENABLE` that comes before any `SET_FEATURES`, which the relay
//! acknowledges itself and drops. Nothing is lost: rings start disabled once
//! `PROTOCOL_FEATURES` is acknowledged, and QEMU enables them again when it starts the device.
//!
//! The relay also tells the device which rings the frontend enables once features are set
//! (`VringEnableHook`): the crate gives a backend no call of its own for that, and a frontend
//! that handles virtio-net's control queue itself (QEMU) says which queue pairs run that way.
//!
//! The crate side is a connection to an abstract unix socket of this process (no file, and
//! Landlock lets a process reach the abstract sockets it made). Only control messages cross the
//! relay; the data path (shared memory, eventfds) does not.
//!
//! With an [`InflightHook`], the relay also serves `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD`
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, which it adds to what the backend offers):
//! `vhost-user-backend` (0.24) answers both with "not supported", and the crate's request
//! handler cannot be extended without forking it. The relay makes or maps the region
//! ([`crate::inflight`]) and gives it to the device.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;

use crate::inflight::InflightRegion;

const HEADER_LEN: usize = 12;
const SET_FEATURES: u32 = 2;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
/// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`.
const INFLIGHT_SHMFD: u64 = 1 << 12;
/// `struct VhostUserInflight`: mmap size and offset (u64), queue count and size (u16); 24
/// bytes with C's padding, which frontends send (and expect back).
const INFLIGHT_LEN: usize = 20;
const RESET_OWNER: u32 = 4;
const RESET_DEVICE: u32 = 34;
const SET_VRING_ENABLE: u32 = 18;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// The most descriptors one vhost-user message carries (a memory table of 8 regions).
const MAX_FDS: usize = 32;
/// The largest payload a frontend sends (a memory table); anything larger is not vhost-user.
const MAX_PAYLOAD: usize = 64 * 1024;

/// Told of each `SET_VRING_ENABLE` (ring index, enabled) that reaches the backend.
pub type VringEnableHook = Arc<dyn Fn(u32, bool) + Send + Sync>;

/// Given the in-flight region the frontend asked for (`GET_INFLIGHT_FD`, a new empty one) or
/// handed over (`SET_INFLIGHT_FD`, what an earlier backend left).
pub type InflightHook = Arc<dyn Fn(Arc<InflightRegion>) + Send + Sync>;

/// What the device wants to be told of.
#[derive(Default, Clone)]
pub struct RelayHooks {
    pub on_enable: Option<VringEnableHook>,
    pub inflight: Option<InflightHook>,
}

/// The relayed connection: the listener the crate accepts the relay's end from, and the two
/// relay threads.
pub struct Relay {
    pub listener: Listener,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays `frontend`: returns a listener with one pending connection, for
    /// `VhostUserDaemon::start`.
    pub fn start(frontend: UnixStream, hooks: RelayHooks) -> io::Result<Self> {
        // A random name (getpid is not in the sandbox's policy; getrandom is).
        let mut nonce = [0u8; 8];
        // SAFETY: getrandom into a buffer of the length given.
        let n = unsafe { libc::getrandom(nonce.as_mut_ptr().cast(), nonce.len(), 0) };
        if n != nonce.len() as isize {
            return Err(io::Error::last_os_error());
        }
        let name = format!("cloister-relay-{:016x}", u64::from_le_bytes(nonce));
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        let inner = UnixStream::connect_addr(&addr)?;
        frontend.set_nonblocking(false)?;
        let features_set = Arc::new(AtomicBool::new(false));
        let (f_read, f_write) = (frontend.try_clone()?, frontend);
        let (i_read, i_write) = (inner.try_clone()?, inner);
        let f_write_for_acks = f_write.try_clone()?;
        let advertise_inflight = hooks.inflight.is_some();
        let down = {
            let features_set = Arc::clone(&features_set);
            std::thread::Builder::new()
                .name("relay-down".into())
                .spawn(move || {
                    let frontend_side = FrontendSide {
                        acks: &f_write_for_acks,
                        features_set: &features_set,
                        hooks,
                    };
                    let end = forward(&f_read, &i_write, Side::Frontend(frontend_side));
                    log_end("frontend", end);
                    let _ = i_write.shutdown(std::net::Shutdown::Both);
                })?
        };
        let up = std::thread::Builder::new()
            .name("relay-up".into())
            .spawn(move || {
                let end = forward(&i_read, &f_write, Side::Backend { advertise_inflight });
                log_end("backend", end);
                let _ = f_write.shutdown(std::net::Shutdown::Both);
            })?;
        Ok(Self {
            listener: Listener::from(listener),
            threads: vec![down, up],
        })
    }

    /// Waits for both relay threads (after the connection has ended on one side, they end).
    pub fn join(self) {
        drop(self.listener);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn log_end(side: &str, end: io::Result<()>) {
    match end {
        Ok(()) => log::debug!("relay: the {side} closed the connection"),
        Err(e) => log::debug!("relay: {side} side: {e}"),
    }
}

/// What the frontend's direction of the relay needs.
struct FrontendSide<'a> {
    /// Where the relay's own answers go.
    acks: &'a UnixStream,
    features_set: &'a AtomicBool,
    hooks: RelayHooks,
}

/// Which way a relay thread moves messages.
enum Side<'a> {
    /// From the frontend: early `SET_VRING_ENABLE`s are answered on the frontend's socket and
    /// dropped, later ones reported to the hook; the in-flight requests are served here.
    Frontend(FrontendSide<'a>),
    /// From the backend: with `advertise_inflight`, its protocol features gain INFLIGHT_SHMFD.
    Backend { advertise_inflight: bool },
}

/// Moves whole messages from `from` to `to` until either closes, as `side` says.
fn forward(from: &UnixStream, to: &UnixStream, side: Side<'_>) -> io::Result<()> {
    let mut payload = vec![0u8; MAX_PAYLOAD];
    loop {
        let Some((header, fds)) = read_header(from)? else {
            return Ok(());
        };
        let request = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let flags = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a {size}-byte message"),
            ));
        }
        read_full(from, &mut payload[..size])?;
        if let Side::Backend {
            advertise_inflight: true,
        } = side
        {
            if request == GET_PROTOCOL_FEATURES && flags & REPLY != 0 && size >= 8 {
                let offered = read_u64(&payload, 0) | INFLIGHT_SHMFD;
                payload[..8].copy_from_slice(&offered.to_le_bytes());
            }
        }
        if let Side::Frontend(FrontendSide {
            acks: frontend,
            features_set,
            hooks,
        }) = &side
        {
            if let Some(hook) = &hooks.inflight {
                match request {
                    GET_INFLIGHT_FD | SET_INFLIGHT_FD => {
                        serve_inflight(frontend, request, flags, &payload[..size], fds, hook)?;
                        continue;
                    }
                    // The crate is not told of a feature it does not have.
                    SET_PROTOCOL_FEATURES if size >= 8 => {
                        let acked = read_u64(&payload, 0) & !INFLIGHT_SHMFD;
                        payload[..8].copy_from_slice(&acked.to_le_bytes());
                    }
                    _ => {}
                }
            }
            match request {
                SET_FEATURES => features_set.store(true, Ordering::Release),
                // The crate forgets the features on a reset; so does the relay.
                RESET_OWNER | RESET_DEVICE => features_set.store(false, Ordering::Release),
                _ => {}
            }
            if request == SET_VRING_ENABLE && !features_set.load(Ordering::Acquire) {
                log::debug!("relay: answering an early SET_VRING_ENABLE");
                if flags & NEED_REPLY != 0 {
                    let mut reply = Vec::with_capacity(HEADER_LEN + 8);
                    reply.extend_from_slice(&request.to_le_bytes());
                    reply.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
                    reply.extend_from_slice(&8u32.to_le_bytes());
                    reply.extend_from_slice(&0u64.to_le_bytes());
                    send(frontend, &reply, &[], &[])?;
                }
                continue;
            }
            if request == SET_VRING_ENABLE && size >= 8 {
                if let Some(hook) = &hooks.on_enable {
                    // struct vhost_vring_state: the ring's index, then 1 to enable it.
                    let word = |at: usize| {
                        u32::from_le_bytes([
                            payload[at],
                            payload[at + 1],
                            payload[at + 2],
                            payload[at + 3],
                        ])
                    };
                    hook(word(0), word(4) != 0);
                }
            }
        }
        send(to, &header, &payload[..size], &fds)?;
    }
}

fn read_u64(payload: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&payload[at..at + 8]);
    u64::from_le_bytes(b)
}

fn read_u16(payload: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([payload[at], payload[at + 1]])
}

/// Answers `GET_INFLIGHT_FD` with a new region, or maps the one `SET_INFLIGHT_FD` hands over;
/// either way the device gets it. A region that cannot be made is answered with a size of 0
/// (no tracking, which frontends accept); one that cannot be mapped is refused when the
/// frontend wants a reply, and logged either way.
fn serve_inflight(
    frontend: &UnixStream,
    request: u32,
    flags: u32,
    payload: &[u8],
    fds: Vec<OwnedFd>,
    hook: &InflightHook,
) -> io::Result<()> {
    if payload.len() < INFLIGHT_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {}-byte in-flight request", payload.len()),
        ));
    }
    let (size, offset) = (read_u64(payload, 0), read_u64(payload, 8));
    let (queues, queue_size) = (read_u16(payload, 16), read_u16(payload, 18));
    let header = |len: u32| {
        let mut h = Vec::with_capacity(HEADER_LEN + INFLIGHT_LEN);
        h.extend_from_slice(&request.to_le_bytes());
        h.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
        h
    };
    if request == GET_INFLIGHT_FD {
        // The request's own layout back, with the size and offset filled in.
        let mut answer = payload.to_vec();
        let made = InflightRegion::create(queues, queue_size);
        let (len, fds) = match made {
            Ok((region, fd, len)) => {
                hook(Arc::new(region));
                (len, vec![fd])
            }
            Err(e) => {
                log::warn!("cannot track in-flight requests: {e}");
                (0, Vec::new())
            }
        };
        answer[..8].copy_from_slice(&len.to_le_bytes());
        answer[8..16].copy_from_slice(&0u64.to_le_bytes());
        return send(frontend, &header(answer.len() as u32), &answer, &fds);
    }
    let adopted = match fds.first() {
        Some(fd) => {
            InflightRegion::adopt(fd, size, offset, queues, queue_size).map_err(|e| e.to_string())
        }
        None => Err("SET_INFLIGHT_FD without a descriptor".to_string()),
    };
    let status: u64 = match adopted {
        Ok(region) => {
            log::info!("in-flight region of {queues} queue(s) of {queue_size} handed over");
            hook(Arc::new(region));
            0
        }
        Err(e) => {
            log::warn!("refusing the frontend's in-flight region: {e}");
            1
        }
    };
    if flags & NEED_REPLY != 0 {
        let mut reply = header(8);
        reply.extend_from_slice(&status.to_le_bytes());
        send(frontend, &reply, &[], &[])?;
    }
    Ok(())
}

/// Fills `buf` (a payload: no descriptors come with it). recvmsg and sendmsg only: `read` and
/// `write` on a socket are recvfrom and sendto, outside the daemons' policies.
fn read_full(from: &UnixStream, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let (n, _) = recv_with_fds(from, &mut buf[got..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(())
}

/// The 12-byte header and the descriptors that came with it; None at end of stream.
fn read_header(from: &UnixStream) -> io::Result<Option<([u8; HEADER_LEN], Vec<OwnedFd>)>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < HEADER_LEN {
        let (n, more) = recv_with_fds(from, &mut header[got..])?;
        fds.extend(more);
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    Ok(Some((header, fds)))
}

fn recv_with_fds(from: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    // u64s: control messages are read as cmsghdr, which needs its alignment.
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    // SAFETY: plain data; filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as usize;
    let n = loop {
        // SAFETY: recvmsg into buffers that live across the call; CLOEXEC on what it receives.
        let n = unsafe { libc::recvmsg(from.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg wrote, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more descriptors than a vhost-user message carries",
        ));
    }
    Ok((n, fds))
}

/// One message, header and payload in one `sendmsg`, with its descriptors.
fn send(to: &UnixStream, header: &[u8], payload: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let iov = [IoSlice::new(header), IoSlice::new(payload)];
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(raw.as_slice()) as u32) };
    // u64s: the control message is written as cmsghdr, which needs its alignment.
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    // SAFETY: plain data; filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as usize;
        // SAFETY: one control message in a buffer sized for it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(cmsg) as *mut RawFd,
                raw.len(),
            );
        }
    }
    let total = header.len() + payload.len();
    // SAFETY: sendmsg from buffers that live across the call.
    let n = unsafe { libc::sendmsg(to.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < total {
        // The descriptors went with the first byte; the rest is plain data.
        let mut rest = Vec::with_capacity(total - n as usize);
        rest.extend_from_slice(header);
        rest.extend_from_slice(payload);
        send(to, &rest[n as usize..], &[], &[])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn early_vring_enables_are_answered_and_the_rest_goes_through() {
        let (mut frontend, ours) = UnixStream::pair().unwrap();
        let relay = Relay::start(ours, RelayHooks::default()).unwrap();
        let (mut backend, _) = relay.listener_accept();
        // An early enable with NEED_REPLY: answered by the relay, never seen by the backend.
        frontend
            .write_all(&message(SET_VRING_ENABLE, VERSION | NEED_REPLY, &[0; 8]))
            .unwrap();
        let mut reply = [0u8; HEADER_LEN + 8];
        frontend.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &SET_VRING_ENABLE.to_le_bytes());
        assert_eq!(&reply[4..8], &(VERSION | REPLY).to_le_bytes());
        assert_eq!(&reply[12..], &[0; 8]);
        // SET_FEATURES, then an enable: both reach the backend, in order.
        let features = message(SET_FEATURES, VERSION, &(1u64 << 30).to_le_bytes());
        let enable = message(SET_VRING_ENABLE, VERSION, &[0, 0, 0, 0, 1, 0, 0, 0]);
        frontend.write_all(&features).unwrap();
        frontend.write_all(&enable).unwrap();
        let mut got = vec![0u8; features.len() + enable.len()];
        backend.read_exact(&mut got).unwrap();
        assert_eq!(got, [features, enable].concat());
        // A reply the other way.
        let answer = message(1, VERSION | REPLY, &7u64.to_le_bytes());
        backend.write_all(&answer).unwrap();
        let mut back = vec![0u8; answer.len()];
        frontend.read_exact(&mut back).unwrap();
        assert_eq!(back, answer);
        drop(frontend);
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "the backend side closes when the frontend does"
        );
        drop(backend);
        relay.join();
    }

    impl Relay {
        fn listener_accept(&self) -> (UnixStream, ()) {
            // SAFETY: accept(2) on the listener's descriptor; the result is owned at once.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            assert!(fd >= 0, "{}", io::Error::last_os_error());
            // SAFETY: a fresh descriptor.
            (unsafe { UnixStream::from_raw_fd(fd) }, ())
        }
    }
}

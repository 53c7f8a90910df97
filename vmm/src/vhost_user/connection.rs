//! One vhost-user connection on a socket [`super::socket`] reached: negotiate, and the
//! typed requests the device makes. Everything the backend says is untrusted: a reply of the
//! wrong shape, an absurd value or no reply at all is an error on this connection, never a
//! panic or a hang (see [`super::watchdog`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use super::watchdog::Watchdog;
use crate::memory::GuestMemoryMmap;
use crate::virtio::VIRTIO_F_VERSION_1;

/// How long a backend may take to answer a request, or all the requests of one operation
/// (negotiation, a device start, a reset), so that a backend answering each just in time can't
/// stretch a start of 2 + 6 requests per queue to many times that. Generous: requests are few
/// and the lab runs everything under emulation.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most queues we accept from GET_QUEUE_NUM: what the PCI transport's MSI-X table holds.
pub const MAX_BACKEND_QUEUES: u64 = crate::virtio::pci_transport::MAX_QUEUES as u64;

/// "10 s", or "50 ms" for a wait shorter than a second.
fn wait_text(d: &Duration) -> String {
    if d.as_secs() == 0 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{} s", d.as_secs())
    }
}

#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("socket {} did not accept a connection within {}", .path.display(), wait_text(.timeout))]
    ConnectTimeout {
        path: PathBuf,
        timeout: Duration,
        #[source]
        last: io::Error,
    },
    #[error("cannot connect to {}", .0.display())]
    Connect(PathBuf, #[source] io::Error),
    #[error("{0}")]
    ConfigMismatch(String),
    #[error("cannot listen on {} for the backend", .0.display())]
    Listen(PathBuf, #[source] io::Error),
    #[error("no backend connected to {} within {} s", .path.display(), .timeout.as_secs())]
    AcceptTimeout { path: PathBuf, timeout: Duration },
    #[error("{0}")]
    BackendGone(String),
    #[error("cannot set up the connection")]
    Setup(#[source] io::Error),
    #[error("{0}: no reply within {ms} ms", ms = .1.as_millis())]
    Timeout(&'static str, Duration),
    #[error("{what} took more than {ms} ms (waiting for {request})", ms = .timeout.as_millis())]
    OperationTimeout {
        what: &'static str,
        request: &'static str,
        timeout: Duration,
    },
    #[error("{0} failed")]
    Request(&'static str, #[source] vhost::Error),
    #[error("the backend does not offer VIRTIO_F_VERSION_1 (non-legacy virtio)")]
    NoVersion1,
    #[error("the backend does not offer vhost-user protocol features")]
    NoProtocolFeatures,
    #[error("the backend lacks the {0} protocol feature")]
    MissingProtocolFeature(&'static str),
    #[error("the backend reports {0} queues (expected 1 to {MAX_BACKEND_QUEUES})")]
    BadQueueCount(u64),
    #[error("the backend offers {available} queues, {wanted} requested")]
    TooFewQueues { available: u64, wanted: u16 },
    #[error("guest memory region at {0:#x} cannot be shared (not file-backed)")]
    Memory(u64),
    #[error("queue {index}: the backend refused a ring of {size} entries; set queue_size= (queue_sizes= for --generic-vhost-user) to a size it accepts")]
    RingSizeRefused {
        index: usize,
        size: u16,
        #[source]
        source: vhost::Error,
    },
    #[error("queue {index}: the backend hung up when given a ring of {size} entries (it acknowledges no request, and that is how such a backend refuses a ring size); if it limits them, set queue_size= (queue_sizes= for --generic-vhost-user) to a size it accepts")]
    RingSetupHungUp {
        index: usize,
        size: u16,
        #[source]
        source: vhost::Error,
    },
    #[error("queue {0}: {1} is outside guest memory")]
    Ring(usize, &'static str),
}

pub use super::socket::{accept, connect, BackendListener};

/// What the backend agreed to.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    /// Virtio features the backend offers (VHOST_USER_F_PROTOCOL_FEATURES included).
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    /// Queues the backend can serve.
    pub queues: u64,
}

/// One vring as the backend needs it.
pub struct VringSetup<'a> {
    pub index: usize,
    pub size: u16,
    /// Frontend (our) virtual addresses, as vhost-user wants them.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where the backend starts reading the available ring: 0 for rings the driver has just
    /// set up; on a new backend for running rings, what the last one had completed.
    pub base: u16,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

/// A backend's in-flight region (`GET_INFLIGHT_FD`), kept while the device runs.
pub struct Inflight {
    fd: OwnedFd,
    info: VhostUserInflight,
}

pub struct Connection {
    frontend: Frontend,
    // Declared after `frontend` is irrelevant for drop order: `Drop` shuts the socket first.
    watchdog: Watchdog,
    socket: OwnedFd,
    timeout: Duration,
    /// The operation whose deadline covers the requests being made, if any.
    operation: Option<&'static str>,
    negotiated: Negotiated,
}

impl Connection {
    /// SET_OWNER and feature negotiation on a connected socket: virtio features (VERSION_1
    /// required), protocol features (MQ, CONFIG and REPLY_ACK used if offered) and the queue
    /// count, which must cover `queues`.
    pub fn new(stream: UnixStream, name: &str, queues: u16) -> Result<Self, ConnectionError> {
        Self::with_timeout(stream, name, queues, REQUEST_TIMEOUT)
    }

    /// [`Connection::new`] with another deadline per request.
    pub fn with_timeout(
        stream: UnixStream,
        name: &str,
        queues: u16,
        timeout: Duration,
    ) -> Result<Self, ConnectionError> {
        let socket = OwnedFd::from(stream.try_clone().map_err(ConnectionError::Setup)?);
        let watchdog = Watchdog::new(socket.try_clone().map_err(ConnectionError::Setup)?, name)
            .map_err(ConnectionError::Setup)?;
        let mut conn = Connection {
            frontend: Frontend::from_stream(stream, 1),
            watchdog,
            socket,
            timeout,
            operation: None,
            negotiated: Negotiated {
                features: 0,
                protocol: VhostUserProtocolFeatures::empty(),
                queues: 1,
            },
        };
        conn.operation("negotiation", |conn| conn.negotiate(queues))?;
        Ok(conn)
    }

    /// Runs `f`'s requests under one deadline (the connection's timeout) rather than one each.
    pub fn operation<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, ConnectionError>,
    ) -> Result<T, ConnectionError> {
        if self.operation.is_some() {
            return f(self);
        }
        let armed = self.watchdog.arm(self.timeout);
        self.operation = Some(what);
        let r = f(self);
        self.operation = None;
        drop(armed);
        r
    }

    fn negotiate(&mut self, queues: u16) -> Result<(), ConnectionError> {
        self.call("SET_OWNER", |f| f.set_owner())?;
        let features = self.call("GET_FEATURES", |f| f.get_features())?;
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(ConnectionError::NoVersion1);
        }
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(ConnectionError::NoProtocolFeatures);
        }
        let offered = self.call("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        // CONFIG is the device kind's business: some take their config space from the
        // backend, others (virtio-fs, rng) make it locally. INFLIGHT_SHMFD lets a backend that
        // replaces this one take up what it left unfinished.
        let protocol = offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        self.call("SET_PROTOCOL_FEATURES", |f| {
            f.set_protocol_features(protocol)
        })?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request waits for its ack, so a request the backend refuses fails
            // right there instead of closing the connection under a later one.
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        // Without MQ the backend serves its device type's queues, which is what we ask for
        // (as QEMU and Cloud Hypervisor assume).
        let available = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = self.call("GET_QUEUE_NUM", |f| f.get_queue_num())?;
            if n == 0 || n > MAX_BACKEND_QUEUES {
                return Err(ConnectionError::BadQueueCount(n));
            }
            n
        } else {
            u64::from(queues)
        };
        if available < u64::from(queues) {
            return Err(ConnectionError::TooFewQueues {
                available,
                wanted: queues,
            });
        }
        self.negotiated = Negotiated {
            features,
            protocol,
            queues: available,
        };
        Ok(())
    }

    /// Runs one request under the watchdog: its own deadline, or its operation's.
    fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, ConnectionError> {
        let armed = self
            .operation
            .is_none()
            .then(|| self.watchdog.arm(self.timeout));
        let r = f(&mut self.frontend);
        drop(armed);
        r.map_err(|e| match (self.watchdog.fired(), self.operation) {
            (true, Some(what)) => ConnectionError::OperationTimeout {
                what,
                request: op,
                timeout: self.timeout,
            },
            (true, None) => ConnectionError::Timeout(op, self.timeout),
            (false, _) => ConnectionError::Request(op, e),
        })
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// The socket, for the VMM's main loop to notice a hang-up.
    pub fn socket(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// A descriptor of the socket that stays valid after this connection is dropped.
    pub fn socket_dup(&self) -> io::Result<OwnedFd> {
        self.socket.as_fd().try_clone_to_owned()
    }

    /// GET_CONFIG of exactly `len` bytes from offset 0 (the crate checks the reply's size and
    /// offset against the request).
    pub fn get_config(&mut self, len: u32) -> Result<Vec<u8>, ConnectionError> {
        let buf = vec![0u8; len as usize];
        let (_, payload) = self.call("GET_CONFIG", |f| {
            f.get_config(0, len, VhostUserConfigFlags::empty(), &buf)
        })?;
        Ok(payload)
    }

    /// SET_FEATURES: the driver's features, plus PROTOCOL_FEATURES, which stays negotiated
    /// (it also makes rings start disabled until SET_VRING_ENABLE).
    pub fn set_features(&mut self, driver_features: u64) -> Result<(), ConnectionError> {
        let features = driver_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.call("SET_FEATURES", |f| f.set_features(features))
    }

    /// SET_MEM_TABLE with every RAM region (memfd and offset).
    pub fn set_mem_table(&mut self, memory: &GuestMemoryMmap) -> Result<(), ConnectionError> {
        let regions = memory
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                    ConnectionError::Memory(vm_memory::GuestMemoryRegion::start_addr(r).0)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.call("SET_MEM_TABLE", |f| f.set_mem_table(&regions).map(|_| ()))
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK, then SET_VRING_ENABLE: the backend starts serving.
    pub fn start_vring(&mut self, v: &VringSetup) -> Result<(), ConnectionError> {
        let config = VringConfigData {
            queue_max_size: v.size,
            queue_size: v.size,
            flags: 0,
            desc_table_addr: v.desc,
            used_ring_addr: v.used,
            avail_ring_addr: v.avail,
            log_addr: None,
        };
        let i = v.index;
        let acked = self
            .negotiated
            .protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK);
        // With REPLY_ACK a refused size fails SET_VRING_NUM itself. Without, nothing is
        // answered and a backend refusing it just hangs up: a round trip right after shows it.
        self.call("SET_VRING_NUM", |f| f.set_vring_num(i, v.size))
            .map_err(|e| match e {
                ConnectionError::Request(_, source) if acked => ConnectionError::RingSizeRefused {
                    index: i,
                    size: v.size,
                    source,
                },
                other => other,
            })?;
        if !acked {
            self.call("GET_FEATURES", |f| f.get_features())
                .map_err(|e| match e {
                    ConnectionError::Request(_, source) => ConnectionError::RingSetupHungUp {
                        index: i,
                        size: v.size,
                        source,
                    },
                    other => other,
                })?;
        }
        self.call("SET_VRING_ADDR", |f| f.set_vring_addr(i, &config))?;
        let base = v.base;
        self.call("SET_VRING_BASE", |f| f.set_vring_base(i, base))?;
        self.call("SET_VRING_CALL", |f| f.set_vring_call(i, v.call))?;
        self.call("SET_VRING_KICK", |f| f.set_vring_kick(i, v.kick))?;
        self.call("SET_VRING_ENABLE", |f| f.set_vring_enable(i, true))
    }

    /// A round trip: a backend handles requests in order, so once it answers, it has handled
    /// every request before. Requests are acknowledged one by one under REPLY_ACK; without it,
    /// this is how we know the rings are enabled before we kick them.
    pub fn barrier(&mut self) -> Result<(), ConnectionError> {
        if self
            .negotiated
            .protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            return Ok(());
        }
        self.call("GET_FEATURES", |f| f.get_features()).map(|_| ())
    }

    /// GET_INFLIGHT_FD for `queues` rings of `queue_size`: the region in which the backend
    /// records what it has in flight, for the frontend to keep. None if the backend does not
    /// track (no INFLIGHT_SHMFD, or it answered with an empty region).
    pub fn get_inflight(
        &mut self,
        queues: u16,
        queue_size: u16,
    ) -> Result<Option<Inflight>, ConnectionError> {
        if !self.tracks_inflight() || queues == 0 || queue_size == 0 {
            return Ok(None);
        }
        let asked = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size,
        };
        let (info, file) = self.call("GET_INFLIGHT_FD", |f| f.get_inflight_fd(&asked))?;
        if info.mmap_size == 0 {
            return Ok(None);
        }
        Ok(Some(Inflight {
            fd: OwnedFd::from(file),
            info: VhostUserInflight {
                num_queues: queues,
                queue_size,
                ..info
            },
        }))
    }

    /// SET_INFLIGHT_FD: a new backend gets the region the last one recorded in.
    pub fn set_inflight(&mut self, inflight: &Inflight) -> Result<(), ConnectionError> {
        let fd = inflight.fd.as_raw_fd();
        self.call("SET_INFLIGHT_FD", |f| f.set_inflight_fd(&inflight.info, fd))
    }

    /// Whether the backend records what it has in flight (INFLIGHT_SHMFD).
    pub fn tracks_inflight(&self) -> bool {
        self.negotiated
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// GET_VRING_BASE: the backend stops the ring and says where it stopped.
    pub fn stop_vring(&mut self, index: usize) -> Result<u32, ConnectionError> {
        self.call("GET_VRING_BASE", |f| f.get_vring_base(index))
    }
}

impl Drop for Connection {
    /// Shut the socket down rather than just closing our descriptors: the main loop holds a
    /// duplicate (to watch for hang-ups) that would otherwise keep it open.
    fn drop(&mut self) {
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    enum Reply {
        Send(Vec<u8>),
        /// Send, but only after a while.
        Late(Duration, Vec<u8>),
        SendAndHangUp(Vec<u8>),
        /// Say nothing and keep the connection open.
        Silence,
    }

    type Script = fn(u32) -> Reply;

    /// A scripted backend: for each request it reads, `script` says what to do.
    fn hostile(script: Script) -> UnixStream {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || loop {
            let mut hdr = [0u8; 12];
            if theirs.read_exact(&mut hdr).is_err() {
                return;
            }
            let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size];
            if theirs.read_exact(&mut body).is_err() {
                return;
            }
            match script(code) {
                Reply::Send(bytes) => {
                    if theirs.write_all(&bytes).is_err() {
                        return;
                    }
                }
                Reply::Late(after, bytes) => {
                    std::thread::sleep(after);
                    if theirs.write_all(&bytes).is_err() {
                        return;
                    }
                }
                Reply::SendAndHangUp(bytes) => {
                    let _ = theirs.write_all(&bytes);
                    return;
                }
                Reply::Silence => std::thread::sleep(Duration::from_secs(3600)),
            }
        });
        ours
    }

    const GET_FEATURES: u32 = 1;
    const SET_OWNER: u32 = 3;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const GET_QUEUE_NUM: u32 = 17;
    const REPLY: u32 = 0x4 | 0x1;

    fn reply_u64(code: u32, v: u64) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&REPLY.to_le_bytes());
        m.extend_from_slice(&8u32.to_le_bytes());
        m.extend_from_slice(&v.to_le_bytes());
        m
    }

    const GOOD_FEATURES: u64 = (1 << 32) | (1 << 30);
    const GOOD_PROTOCOL: u64 = 0b1 | (1 << 3) | (1 << 9); // MQ, REPLY_ACK, CONFIG

    fn with_queue_num(n: u64) -> Script {
        match n {
            0 => |c| base_reply(c, 0),
            65535 => |c| base_reply(c, 65535),
            _ => |c| base_reply(c, 4),
        }
    }

    fn base_reply(code: u32, queues: u64) -> Reply {
        Reply::Send(match code {
            GET_FEATURES => reply_u64(code, GOOD_FEATURES),
            GET_PROTOCOL_FEATURES => reply_u64(code, GOOD_PROTOCOL),
            GET_QUEUE_NUM => reply_u64(code, queues),
            // Acks (REPLY_ACK is only on after SET_PROTOCOL_FEATURES): success.
            SET_PROTOCOL_FEATURES | SET_OWNER => Vec::new(),
            _ => reply_u64(code, 0),
        })
    }

    fn err(script: Script, queues: u16) -> ConnectionError {
        match Connection::new(hostile(script), "test", queues) {
            Ok(_) => panic!("accepted a bad backend"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_sane_backend_negotiates() {
        let conn = Connection::new(hostile(with_queue_num(4)), "test", 2).unwrap();
        let n = conn.negotiated();
        assert_eq!(n.queues, 4);
        assert_eq!(n.features, GOOD_FEATURES);
        assert!(n.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
    }

    #[test]
    fn absurd_queue_counts_are_errors() {
        assert!(matches!(
            err(with_queue_num(0), 1),
            ConnectionError::BadQueueCount(0)
        ));
        // 65535 is refused by the crate (above VHOST_USER_MAX_VRINGS) or by us.
        let e = err(with_queue_num(65535), 1);
        assert!(
            matches!(
                e,
                ConnectionError::BadQueueCount(65535)
                    | ConnectionError::Request("GET_QUEUE_NUM", _)
            ),
            "{e}"
        );
        assert!(matches!(
            err(with_queue_num(4), 8),
            ConnectionError::TooFewQueues {
                available: 4,
                wanted: 8
            }
        ));
    }

    #[test]
    fn missing_features_are_errors() {
        let no_v1: Script = |c| match c {
            GET_FEATURES => Reply::Send(reply_u64(c, 1 << 30)),
            _ => base_reply(c, 1),
        };
        assert!(matches!(err(no_v1, 1), ConnectionError::NoVersion1));
        // Neither CONFIG nor MQ is required: the device kind decides about the config space,
        // and without MQ the backend serves the device type's queues.
        let no_config: Script = |c| match c {
            GET_PROTOCOL_FEATURES => Reply::Send(reply_u64(c, 0)),
            _ => base_reply(c, 1),
        };
        let conn = Connection::new(hostile(no_config), "test", 3).unwrap();
        assert!(!conn
            .negotiated()
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIG));
        assert_eq!(conn.negotiated().queues, 3);
    }

    #[test]
    fn malformed_replies_are_errors() {
        // A reply of the wrong size: 4 bytes of body where 8 are due, then hang up. (Without
        // the hang-up it is a timeout: see `silence_times_out`.)
        let short: Script = |c| match c {
            GET_FEATURES => {
                let mut m = reply_u64(c, GOOD_FEATURES);
                m.truncate(16);
                m[8..12].copy_from_slice(&4u32.to_le_bytes());
                Reply::SendAndHangUp(m)
            }
            _ => base_reply(c, 1),
        };
        let e = err(short, 1);
        assert!(
            matches!(e, ConnectionError::Request("GET_FEATURES", _)),
            "{e}"
        );
        // A reply to another request.
        let wrong: Script = |c| match c {
            GET_FEATURES => Reply::Send(reply_u64(GET_QUEUE_NUM, GOOD_FEATURES)),
            _ => base_reply(c, 1),
        };
        assert!(matches!(
            err(wrong, 1),
            ConnectionError::Request("GET_FEATURES", _)
        ));
    }

    #[test]
    fn config_of_the_wrong_length_is_an_error() {
        let cfg: Script = |c| match c {
            24 => {
                // A complete GET_CONFIG reply whose config header claims 8 bytes where 60
                // were asked.
                let mut m = Vec::new();
                m.extend_from_slice(&24u32.to_le_bytes());
                m.extend_from_slice(&REPLY.to_le_bytes());
                m.extend_from_slice(&(12u32 + 60).to_le_bytes());
                m.extend_from_slice(&0u32.to_le_bytes());
                m.extend_from_slice(&8u32.to_le_bytes());
                m.extend_from_slice(&0u32.to_le_bytes());
                m.extend_from_slice(&[0xab; 60]);
                Reply::Send(m)
            }
            _ => base_reply(c, 1),
        };
        let mut conn = Connection::new(hostile(cfg), "test", 1).unwrap();
        let e = conn.get_config(60).unwrap_err();
        assert!(
            matches!(e, ConnectionError::Request("GET_CONFIG", _)),
            "{e}"
        );
    }

    #[test]
    fn silence_times_out() {
        let silent: Script = |c| match c {
            GET_FEATURES => Reply::Silence,
            _ => base_reply(c, 1),
        };
        let start = Instant::now();
        let timeout = Duration::from_millis(200);
        let e = match Connection::with_timeout(hostile(silent), "test", 1, timeout) {
            Ok(_) => panic!("accepted a silent backend"),
            Err(e) => e,
        };
        assert_eq!(
            e.to_string(),
            "negotiation took more than 200 ms (waiting for GET_FEATURES)"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        // A request on its own has a deadline of its own.
        let silent_config: Script = |c| match c {
            24 => Reply::Silence,
            _ => base_reply(c, 1),
        };
        let mut conn =
            Connection::with_timeout(hostile(silent_config), "test", 1, timeout).unwrap();
        let start = Instant::now();
        let e = conn.get_config(60).unwrap_err();
        assert!(
            matches!(e, ConnectionError::Timeout("GET_CONFIG", _)),
            "{e}"
        );
        assert_eq!(e.to_string(), "GET_CONFIG: no reply within 200 ms");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    fn ring(kick: &EventFd, call: &EventFd) -> VringSetup<'static> {
        // The scripted backends never look at addresses or descriptors.
        let kick: &'static EventFd = Box::leak(Box::new(kick.try_clone().unwrap()));
        let call: &'static EventFd = Box::leak(Box::new(call.try_clone().unwrap()));
        VringSetup {
            index: 0,
            size: 256,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            base: 0,
            kick,
            call,
        }
    }

    const SET_VRING_NUM: u32 = 8;

    #[test]
    fn a_refused_ring_size_is_named() {
        let e = EventFd::new(0).unwrap();
        // With REPLY_ACK: the backend answers SET_VRING_NUM with a failure.
        let refuses: Script = |c| match c {
            SET_VRING_NUM => Reply::Send(reply_u64(c, 1)),
            _ => base_reply(c, 1),
        };
        let mut conn = Connection::new(hostile(refuses), "test", 1).unwrap();
        let err = conn.start_vring(&ring(&e, &e)).unwrap_err();
        assert!(
            matches!(
                err,
                ConnectionError::RingSizeRefused {
                    index: 0,
                    size: 256,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("set queue_size="), "{err}");
        // Without REPLY_ACK: it hangs up, which the round trip after SET_VRING_NUM shows.
        let hangs_up: Script = |c| match c {
            GET_PROTOCOL_FEATURES => Reply::Send(reply_u64(c, 0b1 | (1 << 9))),
            SET_VRING_NUM => Reply::SendAndHangUp(Vec::new()),
            _ => base_reply(c, 1),
        };
        let mut conn = Connection::new(hostile(hangs_up), "test", 1).unwrap();
        let err = conn.start_vring(&ring(&e, &e)).unwrap_err();
        assert!(
            matches!(
                err,
                ConnectionError::RingSetupHungUp {
                    index: 0,
                    size: 256,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn replies_each_in_time_but_too_slow_together_time_out() {
        // Three replies in negotiation (features, protocol features, queue count), each well
        // within the deadline, together past it.
        let slow: Script = |c| match base_reply(c, 1) {
            Reply::Send(bytes) if !bytes.is_empty() => {
                Reply::Late(Duration::from_millis(150), bytes)
            }
            other => other,
        };
        let start = Instant::now();
        let timeout = Duration::from_millis(350);
        let e = match Connection::with_timeout(hostile(slow), "test", 1, timeout) {
            Ok(_) => panic!("accepted a backend that took {:?}", start.elapsed()),
            Err(e) => e,
        };
        assert!(
            matches!(
                e,
                ConnectionError::OperationTimeout {
                    what: "negotiation",
                    request: "GET_QUEUE_NUM",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "negotiation took more than 350 ms (waiting for GET_QUEUE_NUM)"
        );
        // A backend just as slow is fine with time to spare.
        Connection::with_timeout(hostile(slow), "test", 1, Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn connect_waits_for_the_socket_and_reports_a_dead_backend() {
        let dir = std::env::temp_dir().join(format!("cloister-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("late.sock");
        let p = path.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let l = UnixListener::bind(&p).unwrap();
            let _ = l.accept();
        });
        connect(&path, Duration::from_secs(10), &mut || Ok(())).unwrap();
        t.join().unwrap();
        let missing = dir.join("never.sock");
        let e = connect(&missing, Duration::from_secs(10), &mut || {
            Err("exited".into())
        })
        .unwrap_err();
        assert!(matches!(e, ConnectionError::BackendGone(_)));
        let e = connect(&missing, Duration::from_millis(50), &mut || Ok(())).unwrap_err();
        assert!(matches!(e, ConnectionError::ConnectTimeout { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_listener_that_never_accepts_times_out() {
        let dir = std::env::temp_dir().join(format!("cloister-conn-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("full.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // A backlog of 0 holds one pending connection, which fills it.
        // SAFETY: listen(2) on the listener's own descriptor.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let _pending = UnixStream::connect(&path).unwrap();
        let start = Instant::now();
        let e = connect(&path, Duration::from_millis(200), &mut || Ok(())).unwrap_err();
        assert!(matches!(e, ConnectionError::ConnectTimeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        // Once it accepts, the next attempt gets through.
        let _accepted = listener.accept().unwrap();
        connect(&path, Duration::from_secs(5), &mut || Ok(())).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

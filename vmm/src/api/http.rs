//! Just enough HTTP/1.1 for the API: one request at a time off a Unix stream, bounded in size
//! and time, descriptors passed with it (SCM_RIGHTS) kept, and a reply with a JSON or text
//! body. The head is parsed with `httparse`; everything a client controls is checked.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Longest request head (request line and headers) taken.
pub const MAX_HEAD: usize = 16 << 10;
/// Largest body taken: a `VmConfig` with every device is a few KiB.
pub const MAX_BODY: usize = 1 << 20;
const MAX_HEADERS: usize = 64;
/// Descriptors taken with one request (Kata hands a tap's queues to `vm.add-net`).
pub const MAX_FDS: usize = 16;
/// A client has this long to send a whole request (and to read a reply): a slow one is
/// dropped, never waited on for good.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a kept-alive connection may sit idle between requests while other clients wait
/// (the server serves one connection at a time).
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum HttpError {
    #[error("the request's head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the request's body is larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("chunked bodies are not supported: send Content-Length")]
    Chunked,
    #[error("the client did not send its request within {} s", READ_TIMEOUT.as_secs())]
    Timeout,
    #[error("the client closed the connection in the middle of a request")]
    Truncated,
    #[error("more than {MAX_FDS} descriptors came with the request")]
    TooManyFds,
    #[error("cannot read the request")]
    Io(#[source] io::Error),
}

impl HttpError {
    /// The status a reply to this error carries (none when the connection is gone).
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge => Some(413),
            HttpError::Malformed(_) | HttpError::TooManyFds => Some(400),
            HttpError::Chunked => Some(411),
            HttpError::Timeout => Some(408),
            HttpError::Truncated | HttpError::Io(_) => None,
        }
    }
}

#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
    /// Descriptors that came with the request, in order.
    pub fds: Vec<OwnedFd>,
    /// The client asked to keep the connection (HTTP/1.1 without `Connection: close`).
    pub keep_alive: bool,
}

/// Reads requests off one connection; bytes of the next request that arrive with this one
/// are kept for it.
pub struct Reader {
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Requests read so far on this connection.
    served: usize,
}

impl Default for Reader {
    fn default() -> Self {
        Self::new()
    }
}

impl Reader {
    pub fn new() -> Self {
        Reader {
            buf: Vec::new(),
            fds: Vec::new(),
            served: 0,
        }
    }

    /// The next request, or `None` if the client closed the connection between requests.
    pub fn read(&mut self, stream: &UnixStream) -> Result<Option<Request>, HttpError> {
        // The whole request within READ_TIMEOUT of its first byte; the first byte within
        // IDLE_TIMEOUT on a kept-alive connection (READ_TIMEOUT on a new one).
        let mut deadline = None;
        let (head_len, method, path, body_len, keep_alive) = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(HttpError::HeadTooLarge);
            }
            if deadline.is_none() && !self.buf.is_empty() {
                deadline = Some(Instant::now() + READ_TIMEOUT);
            }
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None if self.served > 0 => IDLE_TIMEOUT,
                None => READ_TIMEOUT,
            };
            // Between requests, a client that goes quiet (or away) simply ends the connection.
            let filled = match self.fill(stream, wait) {
                Err(HttpError::Timeout) if self.buf.is_empty() => 0,
                filled => filled?,
            };
            if filled == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(HttpError::Truncated)
                };
            }
        };
        if body_len > MAX_BODY {
            return Err(HttpError::BodyTooLarge);
        }
        let deadline = deadline.unwrap_or_else(|| Instant::now() + READ_TIMEOUT);
        while self.buf.len() < head_len + body_len {
            let wait = deadline.saturating_duration_since(Instant::now());
            if self.fill(stream, wait)? == 0 {
                return Err(HttpError::Truncated);
            }
        }
        self.served += 1;
        let body = self.buf[head_len..head_len + body_len].to_vec();
        self.buf.drain(..head_len + body_len);
        Ok(Some(Request {
            method,
            path,
            body,
            fds: std::mem::take(&mut self.fds),
            keep_alive,
        }))
    }

    /// One recvmsg(2), waiting at most `wait`: bytes into the buffer, descriptors into the
    /// list. Returns the bytes read (0 at end of stream).
    fn fill(&mut self, stream: &UnixStream, wait: Duration) -> Result<usize, HttpError> {
        if wait.is_zero() {
            return Err(HttpError::Timeout);
        }
        stream.set_read_timeout(Some(wait)).map_err(HttpError::Io)?;
        let mut chunk = [0u8; 4096];
        // Room for MAX_FDS descriptors; u64 elements keep it aligned for cmsghdr.
        let mut control = [0u64; 16];
        let control_len = unsafe {
            // SAFETY: CMSG_SPACE only computes a size.
            libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32) as usize
        };
        debug_assert!(control_len <= std::mem::size_of_val(&control));
        let mut iov = libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: chunk.len(),
        };
        // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control_len;
        let n = loop {
            // SAFETY: recvmsg into the buffers described by `msg`, all owned here.
            let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return Err(HttpError::Timeout)
                }
                _ => return Err(HttpError::Io(e)),
            }
        };
        let mut too_many = msg.msg_flags & libc::MSG_CTRUNC != 0;
        // SAFETY: walking the control messages recvmsg filled in, with the libc macros; each
        // SCM_RIGHTS payload is an array of descriptors now ours.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                    let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                    for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        let fd = OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                        if self.fds.len() < MAX_FDS {
                            self.fds.push(fd);
                        } else {
                            too_many = true;
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        if too_many {
            return Err(HttpError::TooManyFds);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

/// `(head length, method, path, body length, keep-alive)` once the whole head is in `buf`.
type Head = (usize, String, String, usize, bool);

fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_string();
    let mut body_len = 0;
    let mut keep_alive = req.version == Some(1);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::Malformed(format!("header {} is not UTF-8", h.name)))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            body_len = value.parse().map_err(|_| {
                HttpError::Malformed(format!("Content-Length '{value}' is not a number"))
            })?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("identity") {
                return Err(HttpError::Chunked);
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    Ok(Some((head_len, method, path, body_len, keep_alive)))
}

/// A reply: a status, and a JSON or plain-text body, or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Body>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Json(String),
    Text(String),
}

impl Response {
    pub fn empty(status: u16) -> Self {
        Response { status, body: None }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Response {
            status,
            body: Some(Body::Json(value.to_string())),
        }
    }

    /// An error: Cloud Hypervisor answers errors with a plain-text body that says what was
    /// wrong; so does cloister.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let mut message = message.into();
        message.push('\n');
        Response {
            status,
            body: Some(Body::Text(message)),
        }
    }

    pub fn write(&self, stream: &mut UnixStream, keep_alive: bool) -> io::Result<()> {
        let (kind, body) = match &self.body {
            Some(Body::Json(b)) => ("application/json", b.as_str()),
            Some(Body::Text(b)) => ("text/plain; charset=utf-8", b.as_str()),
            None => ("", ""),
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: cloister\r\nConnection: {}\r\n",
            self.status,
            reason(self.status),
            if keep_alive { "keep-alive" } else { "close" }
        );
        if !kind.is_empty() {
            out.push_str(&format!("Content-Type: {kind}\r\n"));
        }
        // 204 carries no body and no length.
        if self.status != 204 {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        out.push_str(body);
        stream.write_all(out.as_bytes())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Result<Option<Request>, HttpError> {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(bytes).unwrap();
        drop(a);
        Reader::new().read(&b)
    }

    #[test]
    fn a_request_with_a_body() {
        let r = read_all(
            b"PUT /api/v1/vm.add-disk?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\n{}\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/api/v1/vm.add-disk");
        assert_eq!(r.body, b"{}\r\n");
        assert!(r.keep_alive);
    }

    #[test]
    fn two_requests_in_one_write_are_two() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
            .unwrap();
        drop(a);
        let mut reader = Reader::new();
        assert_eq!(reader.read(&b).unwrap().unwrap().path, "/a");
        let second = reader.read(&b).unwrap().unwrap();
        assert_eq!(second.path, "/b");
        assert!(!second.keep_alive, "HTTP/1.0 closes by default");
        assert!(reader.read(&b).unwrap().is_none());
    }

    #[test]
    fn bad_requests_are_named() {
        assert!(matches!(
            read_all(b"NOT HTTP\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            read_all(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            Err(HttpError::Truncated)
        ));
        assert!(matches!(
            read_all(b"PUT /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Err(HttpError::BodyTooLarge)
        ));
        assert!(matches!(
            read_all(b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            read_all(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::Chunked)
        ));
        let mut huge = b"GET /x HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD + 100, b'a');
        assert!(matches!(read_all(&huge), Err(HttpError::HeadTooLarge)));
        assert!(read_all(b"").unwrap().is_none());
    }

    #[test]
    fn descriptors_come_with_the_request() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fds = [file.as_raw_fd(), file.as_raw_fd()];
        let bytes = b"PUT /api/v1/vm.add-net HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fds(&a, &[&bytes[..]], &fds).unwrap();
        drop(a);
        let r = Reader::new().read(&b).unwrap().unwrap();
        assert_eq!(r.fds.len(), 2);
        assert_eq!(r.body, b"{}");
    }

    /// Garbage, truncations and mutations of good requests: every one is a request or an
    /// error, never a panic or a hang (the peer's end is closed, so reads end).
    #[test]
    fn fuzzed_requests_never_panic() {
        let good: &[&[u8]] = &[
            b"PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"path\": \"/a\"}\n",
            b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            let base = good[round % good.len()];
            let mut input = base.to_vec();
            match next() % 4 {
                0 => input.truncate((next() as usize) % base.len()),
                1 => {
                    for _ in 0..1 + next() % 8 {
                        let i = (next() as usize) % input.len();
                        input[i] = next() as u8;
                    }
                }
                2 => {
                    let i = (next() as usize) % input.len();
                    let junk: Vec<u8> = (0..next() % 64).map(|_| next() as u8).collect();
                    input.splice(i..i, junk);
                }
                _ => input = (0..next() % 512).map(|_| next() as u8).collect(),
            }
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&input).unwrap();
            drop(a);
            let mut reader = Reader::new();
            // Several requests may parse from one input; the loop ends at the closed end.
            for _ in 0..8 {
                match reader.read(&b) {
                    Ok(Some(r)) => assert!(r.body.len() <= MAX_BODY),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    /// A client that sends a byte now and then never holds the server past the request's
    /// deadline.
    #[test]
    fn a_dripping_client_is_dropped_at_the_deadline() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let drip = std::thread::spawn(move || {
            for byte in b"GET /api/v1/vm.info HTTP/1.1\r\nX-Slow: ".iter().cycle() {
                if a.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let start = Instant::now();
        let r = Reader::new().read(&b);
        assert!(matches!(r, Err(HttpError::Timeout)), "{r:?}");
        let took = start.elapsed();
        assert!(
            took >= READ_TIMEOUT && took < READ_TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
        drop(b);
        drip.join().unwrap();
    }

    #[test]
    fn replies() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        Response::json(200, &serde_json::json!({"id": "x"}))
            .write(&mut a, false)
            .unwrap();
        Response::empty(204).write(&mut a, true).unwrap();
        drop(a);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut b, &mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains(
            "Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{\"id\":\"x\"}"
        ));
        assert!(out.contains(
            "HTTP/1.1 204 No Content\r\nServer: cloister\r\nConnection: keep-alive\r\n\r\n"
        ));
    }
}

//! Reaching a backend's socket: connecting to one that listens (waiting for it to appear), or
//! listening for one that connects (server mode), with deadlines, so that no wait is for ever.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::connection::ConnectionError;

/// Connects to `path`, waiting up to `timeout` for the socket to appear and accept. `alive` is
/// asked between attempts, so a backend process that died is reported at once rather than
/// after the timeout.
pub fn connect(
    path: &Path,
    timeout: Duration,
    alive: &mut dyn FnMut() -> Result<(), String>,
) -> Result<UnixStream, ConnectionError> {
    let start = Instant::now();
    loop {
        match connect_without_waiting(path) {
            Ok(s) => return Ok(s),
            // Not there yet, there but not listening yet, or listening but with its backlog
            // full (a backend that does not accept).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::WouldBlock
                ) =>
            {
                alive().map_err(ConnectionError::BackendGone)?;
                if start.elapsed() >= timeout {
                    return Err(ConnectionError::ConnectTimeout {
                        path: path.to_path_buf(),
                        timeout,
                        last: e,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(ConnectionError::Connect(path.to_path_buf(), e)),
        }
    }
}

/// The backend's connection on `path`, where we listen (its client mode: `vhost_mode=server`),
/// waiting at most `timeout`. A stale socket file there is replaced (anything else is not),
/// and the file is removed once the backend is connected, or given up on.
pub fn accept(path: &Path, timeout: Duration) -> Result<UnixStream, ConnectionError> {
    BackendListener::bind(path)?
        .accept_within(timeout)?
        .ok_or_else(|| ConnectionError::AcceptTimeout {
            path: path.to_path_buf(),
            timeout,
        })
}

/// A socket where we wait for a backend to connect (its client mode), for as long as it
/// lives: a backend that connects between two looks waits in the backlog. The file goes with
/// it.
pub struct BackendListener {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
}

impl BackendListener {
    /// Listens on `path`; a stale socket file there is replaced (anything else is not).
    pub fn bind(path: &Path) -> Result<Self, ConnectionError> {
        let listen_error = |e| ConnectionError::Listen(path.to_path_buf(), e);
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(listen_error(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            std::fs::remove_file(path).map_err(listen_error)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(listen_error)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The next backend to connect, waiting at most `timeout`; None if none did.
    pub fn accept_within(&self, timeout: Duration) -> Result<Option<UnixStream>, ConnectionError> {
        let listen_error = |e| ConnectionError::Listen(self.path.clone(), e);
        let Some(stream) = wait_accept(&self.listener, timeout).map_err(listen_error)? else {
            return Ok(None);
        };
        stream.set_nonblocking(false).map_err(listen_error)?;
        Ok(Some(stream))
    }
}

impl Drop for BackendListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn wait_accept(
    listener: &std::os::unix::net::UnixListener,
    timeout: Duration,
) -> io::Result<Option<UnixStream>> {
    use std::os::fd::AsRawFd;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(Some(stream)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
    }
}

/// connect(2) on a non-blocking socket, then made blocking: a listener whose backlog is full
/// answers EAGAIN at once, where a blocking connect would wait until it accepts, for ever if
/// it never does.
fn connect_without_waiting(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long for a unix socket address",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, &from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = from as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the duration of the call.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let stream = UnixStream::from(fd);
    // Blocking from here on: the vhost crate expects it.
    stream.set_nonblocking(false)?;
    Ok(stream)
}

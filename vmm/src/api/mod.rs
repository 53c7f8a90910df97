//! Cloud Hypervisor's REST API on a Unix socket (`--api-socket`): HTTP/1.1, paths under
//! `/api/v1/`, its JSON bodies. One thread serves it, one connection and one request at a
//! time (so concurrent clients are served in turn), confined to its own seccomp role
//! (`vmm-api`) with no file access: it answers what it can from the VMM's shared state and
//! hands the rest to the main thread ([`crate::lifecycle`]) or the hot-plug thread.
//! `docs/api.yaml` describes what it serves.

pub mod body;
pub mod client;
pub mod http;
pub mod routes;
pub mod vm_config;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use cloister_seccomp::ThreadRole;

use crate::lifecycle::Control;
use crate::ConfigError;
use vm_config::ProcessOptions;

/// The API socket, bound and listening.
pub struct Listener {
    socket: UnixListener,
    /// Removed when cloister exits, if cloister made it.
    path: Option<PathBuf>,
}

impl Listener {
    /// `--api-socket`'s value: `path=PATH`, a bare PATH, or `fd=N`.
    pub fn open(value: &str) -> Result<Self, ConfigError> {
        let fail = |why: String| ConfigError::ApiSocket {
            value: value.to_string(),
            why,
        };
        if let Some(fd) = value.strip_prefix("fd=") {
            let fd: RawFd = fd
                .parse()
                .map_err(|_| fail(format!("'{fd}' is not a descriptor number")))?;
            return inherited(fd).map_err(fail);
        }
        let path = PathBuf::from(value.strip_prefix("path=").unwrap_or(value));
        if path.as_os_str().is_empty() {
            return Err(fail("no path".into()));
        }
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            // A socket nobody answers on is a dead cloister's: take its place. Anything else
            // is someone's, and stays.
            if !meta.file_type().is_socket() {
                return Err(fail("something that is not a socket is in the way".into()));
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(fail("another process serves this socket".into()));
            }
            std::fs::remove_file(&path).map_err(|e| fail(format!("cannot remove it: {e}")))?;
        }
        // Only the owner may talk to the VMM: no window in which the socket is open to
        // others (this process is one thread still, so the umask is ours alone).
        // SAFETY: umask(2) cannot fail.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let socket = bound.map_err(|e| fail(format!("cannot listen there: {e}")))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(format!("cannot make it private: {e}")))?;
        Ok(Listener {
            socket,
            path: Some(path),
        })
    }
}

/// A listening Unix socket inherited as descriptor `fd`.
fn inherited(fd: RawFd) -> Result<Listener, String> {
    let mut kind: libc::c_int = 0;
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into locals of the size given.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        ) == 0
            && libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut listening as *mut libc::c_int).cast(),
                &mut len,
            ) == 0
    };
    if !ok || kind != libc::AF_UNIX {
        return Err(format!("descriptor {fd} is not a Unix socket"));
    }
    if listening == 0 {
        return Err(format!("socket {fd} is not listening"));
    }
    // SAFETY: checked above to be an open, listening Unix socket, handed to us to own.
    let socket = unsafe { UnixListener::from_raw_fd(fd) };
    // Not passed on to the backends cloister starts; and blocking, whatever it was handed
    // over as: the server sleeps in accept(2).
    // SAFETY: fcntl on the descriptor we now own.
    unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    socket
        .set_nonblocking(false)
        .map_err(|e| format!("cannot make socket {fd} blocking: {e}"))?;
    Ok(Listener { socket, path: None })
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The running server.
pub struct Server {
    /// Says the reply to `vmm.shutdown` is written.
    done: Receiver<()>,
    /// Its socket file, removed when cloister ends.
    _path: PathOwner,
}

/// Removes the socket file on drop (the server thread cannot: it has no file access).
struct PathOwner(Option<PathBuf>);

impl Drop for PathOwner {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Server {
    /// Waits, a moment at most, for the reply to `vmm.shutdown` to be written.
    pub fn finish(&self) {
        let _ = self.done.recv_timeout(Duration::from_secs(2));
    }

    /// Leaves the socket file where it is when cloister exits: once a VM has run, the main
    /// thread's sandbox may not remove files outside the runtime directory. The next cloister
    /// on that path replaces it (nobody answers on it).
    pub fn keep_socket_file(&mut self) {
        self._path.0 = None;
    }
}

/// Starts the server thread on `listener`.
pub fn start(
    mut listener: Listener,
    control: Control,
    process: ProcessOptions,
) -> io::Result<Server> {
    let (done_tx, done) = mpsc::channel();
    let (ready_tx, ready) = mpsc::sync_channel(1);
    let path = PathOwner(listener.path.take());
    let socket = listener.socket.try_clone()?;
    drop(listener);
    crate::signals::spawn_helper(std::thread::Builder::new().name("api".into()), move || {
        let rules = cloister_seccomp::landlock::Rules::new();
        if let Err(e) = cloister_seccomp::enter(ThreadRole::VmmApi, &rules) {
            let _ = ready_tx.send(Err(crate::error_chain(&e)));
            return;
        }
        let _ = ready_tx.send(Ok(()));
        let routes = routes::Routes::new(control, process);
        serve(&socket, &routes, &done_tx);
    })?;
    // A VMM whose API cannot run must not start and wait for requests that cannot come.
    match ready.recv() {
        Ok(Ok(())) => Ok(Server { done, _path: path }),
        Ok(Err(why)) => Err(io::Error::other(format!("cannot enter its sandbox: {why}"))),
        Err(_) => Err(io::Error::other("it ended at once")),
    }
}

fn serve(socket: &UnixListener, routes: &routes::Routes, done: &mpsc::Sender<()>) {
    loop {
        let stream = match socket.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("cloister: API: cannot accept a connection: {e}");
                // Out of descriptors, say: a pause, not a busy loop.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if connection(stream, routes) {
            let _ = done.send(());
            return;
        }
    }
}

/// Serves one client until it closes or errs. True once `vmm.shutdown` has been answered.
fn connection(mut stream: UnixStream, routes: &routes::Routes) -> bool {
    // A client that does not read its replies holds the server no longer than one that does
    // not send.
    if stream.set_write_timeout(Some(http::READ_TIMEOUT)).is_err() {
        return false;
    }
    let mut reader = http::Reader::new();
    loop {
        let request = match reader.read(&stream) {
            Ok(Some(request)) => request,
            Ok(None) => return false,
            Err(e) => {
                if let Some(status) = e.status() {
                    let _ = http::Response::error(status, e.to_string()).write(&mut stream, false);
                }
                return false;
            }
        };
        let keep_alive = request.keep_alive;
        let (response, vmm_gone) = routes.handle(request);
        let written = response.write(&mut stream, keep_alive && !vmm_gone);
        if vmm_gone {
            return true;
        }
        if written.is_err() || !keep_alive {
            return false;
        }
    }
}

//! The listening socket: replaces a stale socket file, refuses to clobber anything else, and
//! removes the file when the daemon stops.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vhost::vhost_user::Listener;

use crate::error::Error;
use crate::signals::Stop;

/// A bound, listening vhost-user socket; the file is removed on drop. Bind it before the
/// sandbox: afterwards the process can no longer create files.
pub struct SocketListener {
    path: PathBuf,
    listener: Listener,
}

impl SocketListener {
    pub fn bind(path: &Path) -> Result<Self, Error> {
        remove_stale(path)?;
        let listener = UnixListener::bind(path).map_err(|source| Error::Listen {
            path: path.to_owned(),
            source,
        })?;
        // Non-blocking so that a connection that vanished between poll() and accept() cannot
        // block the loop; accept is only called once poll() says a connection is pending.
        listener
            .set_nonblocking(true)
            .map_err(|source| Error::Listen {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            // `From<UnixListener>` leaves the path unset, so vhost's Listener won't unlink it
            // behind our back; our Drop does that.
            listener: Listener::from(listener),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn listener(&mut self) -> &mut Listener {
        &mut self.listener
    }

    /// Waits until a frontend is connecting (true) or a stop was requested (false).
    pub(crate) fn wait_for_frontend(&self, stop: &Stop) -> Result<bool, Error> {
        loop {
            if stop.requested() {
                return Ok(false);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd structures for the whole call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ret < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Poll(error));
            }
            if stop.requested() {
                return Ok(false);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                return Ok(true);
            }
        }
    }
}

impl Drop for SocketListener {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Removes `path` if it is a socket nobody listens on. A live socket means another daemon
/// serves it (two backends on one socket would fight over frontends), and a non-socket file is
/// not ours to delete.
fn remove_stale(path: &Path) -> Result<(), Error> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Listen {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::info!("replacing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(Error::Listen {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "cloister-socket-test-{}-{name}",
            std::process::id()
        ))
    }

    #[test]
    fn replaces_stale_socket_and_removes_on_drop() {
        let path = temp_path("stale");
        let _ = std::fs::remove_file(&path);
        // A bound socket whose listener is gone is exactly what a crashed daemon leaves.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = SocketListener::bind(&path).unwrap();
        assert!(path.exists());
        drop(listener);
        assert!(!path.exists());
    }

    #[test]
    fn refuses_live_socket_and_regular_file() {
        let path = temp_path("live");
        let _ = std::fs::remove_file(&path);
        let _live = UnixListener::bind(&path).unwrap();
        assert!(matches!(
            SocketListener::bind(&path),
            Err(Error::SocketInUse(_))
        ));
        std::fs::remove_file(&path).unwrap();

        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            SocketListener::bind(&path),
            Err(Error::NotASocket(_))
        ));
        std::fs::remove_file(&path).unwrap();
    }
}

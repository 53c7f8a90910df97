//! The serve loop: one frontend at a time, a fresh backend per connection, and back to
//! listening when the frontend goes away.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::error::{Error, VhostUserDaemonError};
use crate::relay::Relay;
use crate::signals::Stop;
use crate::socket::SocketListener;
use crate::worker_exit::WorkerExits;

/// Guest memory as the backends see it: no dirty-page bitmap (no live migration yet).
pub type GuestMemory = GuestMemoryMmap<()>;

/// A device served over vhost-user. The device itself lives as long as the daemon (files,
/// io_uring instances, everything opened before the sandbox); a [`Device::Backend`] lives for
/// one connection.
pub trait Device {
    /// What `vhost-user-backend` drives for one connection.
    type Backend: VhostUserBackend<Bitmap = ()> + Clone + 'static;

    /// A backend for a new connection. It must answer `exit_event()` with
    /// [`WorkerExits::event`] from `exits`, so its worker threads stop when the connection ends.
    fn connect(
        &self,
        exits: Arc<WorkerExits>,
    ) -> Result<Self::Backend, Box<dyn std::error::Error + Send + Sync>>;

    /// Called once the connection's worker threads exist, before the frontend is accepted:
    /// register extra event sources (e.g. I/O completion eventfds) with them.
    fn attach(
        &self,
        backend: &Self::Backend,
        handlers: &[Arc<VringEpollHandler<Self::Backend>>],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// Called after the connection's worker threads have stopped: finish or abandon in-flight
    /// work and drop everything tied to this connection's guest memory.
    fn disconnect(&self, backend: &Self::Backend);

    /// Whether frontends reach this device through the [`Relay`], for those (QEMU's
    /// virtio-net) that enable rings before they acknowledge features.
    fn relay_frontend(&self) -> bool {
        false
    }

    /// With the relay: what to tell the device of (rings enabled, in-flight regions).
    fn relay_hooks(&self) -> crate::relay::RelayHooks {
        crate::relay::RelayHooks::default()
    }
}

/// Serves `device` on `listener` until `stop` is requested. A frontend that disconnects, or a
/// connection that fails, is logged, and the daemon listens again. The socket file is removed
/// on the way out.
pub fn serve<D>(
    name: &str,
    mut listener: SocketListener,
    device: &D,
    stop: &Stop,
) -> Result<(), Error>
where
    D: Device,
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    log::info!("listening on {}", listener.path().display());
    let mut connections: u64 = 0;
    while listener.wait_for_frontend(stop)? {
        connections += 1;
        let served = if device.relay_frontend() {
            let frontend = match listener.listener().accept() {
                Ok(Some(stream)) => stream,
                // Gone between poll and accept.
                Ok(None) => continue,
                Err(e) => {
                    return Err(Error::Accept(VhostUserDaemonError(
                        vhost_user_backend::Error::CreateBackendListener(e),
                    )))
                }
            };
            let mut relay = Relay::start(frontend, device.relay_hooks()).map_err(Error::Relay)?;
            let served = serve_one(name, device, stop, connections, |daemon| {
                daemon.start(&mut relay.listener)
            });
            relay.join();
            served
        } else {
            serve_one(name, device, stop, connections, |daemon| {
                daemon.start(listener.listener())
            })
        };
        served.map_err(|e| match e {
            Served::Failed(e) => e,
            Served::NotStarted(e) => Error::Accept(e),
        })?;
        if stop.requested() {
            break;
        }
        log::info!("listening again on {}", listener.path().display());
    }
    log::info!("stopped after {connections} connection(s)");
    Ok(())
}

/// Serves `device` to a frontend that listens on `socket` (the frontend's server mode): connects,
/// serves until it disconnects, and connects again, until `stop` is requested. While nobody
/// listens there it tries again every [`RECONNECT_INTERVAL`].
pub fn serve_client<D>(name: &str, socket: &Path, device: &D, stop: &Stop) -> Result<(), Error>
where
    D: Device,
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    let Some(path) = socket.to_str() else {
        return Err(Error::Listen {
            path: socket.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not UTF-8"),
        });
    };
    log::info!("connecting to the frontend at {path}");
    let mut connections: u64 = 0;
    let mut waiting = false;
    while !stop.requested() {
        let served = if device.relay_frontend() {
            match std::os::unix::net::UnixStream::connect(socket)
                .and_then(|stream| Relay::start(stream, device.relay_hooks()))
            {
                Ok(mut relay) => {
                    let served = serve_one(name, device, stop, connections + 1, |daemon| {
                        daemon.start(&mut relay.listener)
                    });
                    relay.join();
                    served
                }
                Err(e) => Err(Served::NotStarted(VhostUserDaemonError(
                    vhost_user_backend::Error::CreateBackendReqHandler(
                        vhost::vhost_user::Error::SocketConnect(e),
                    ),
                ))),
            }
        } else {
            serve_one(name, device, stop, connections + 1, |daemon| {
                daemon.start_client(path)
            })
        };
        match served {
            Ok(()) => {
                connections += 1;
                waiting = false;
                if !stop.requested() {
                    log::info!("connecting again to {path}");
                }
            }
            Err(Served::NotStarted(e)) => {
                if !waiting {
                    log::info!("no frontend at {path} yet ({e}); trying again");
                    waiting = true;
                }
                let until = Instant::now() + RECONNECT_INTERVAL;
                while Instant::now() < until && !stop.requested() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Err(Served::Failed(e)) => return Err(e),
        }
    }
    log::info!("stopped after {connections} connection(s)");
    Ok(())
}

/// How often a client backend tries a frontend that is not listening.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(200);

/// Why one connection was not served.
enum Served {
    /// No frontend to serve (accept or connect failed).
    NotStarted(VhostUserDaemonError),
    Failed(Error),
}

fn serve_one<D>(
    name: &str,
    device: &D,
    stop: &Stop,
    number: u64,
    start: impl FnOnce(
        &mut VhostUserDaemon<D::Backend>,
    ) -> std::result::Result<(), vhost_user_backend::Error>,
) -> Result<(), Served>
where
    D: Device,
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    let exits = Arc::new(WorkerExits::default());
    let backend = device
        .connect(Arc::clone(&exits))
        .map_err(|e| Served::Failed(Error::Connect(e)))?;
    let mut daemon = VhostUserDaemon::new(
        name.to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| Served::Failed(Error::Daemon(VhostUserDaemonError(e))))?;

    let attached = device.attach(&backend, &daemon.get_epoll_handlers());
    let result = match attached {
        Err(e) => Err(Served::Failed(Error::Connect(e))),
        Ok(()) => start(&mut daemon).map_err(|e| Served::NotStarted(VhostUserDaemonError(e))),
    };
    if result.is_ok() {
        log::info!("frontend connected (connection {number})");
        stop.set_connection(daemon.shutdown_handle());
        let ended = daemon.wait();
        stop.set_connection(None);
        match ended {
            // A frontend that goes away between messages (or mid-message, if it died) is the
            // normal end of a connection.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("frontend disconnected (connection {number})"),
            // A misbehaving frontend ends its own connection, not the daemon.
            Err(e) => log::warn!("connection {number} ended: {e}"),
        }
    }

    // Dropping the daemon sends the exit events and joins the worker threads.
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    drop(daemon);
    device.disconnect(&backend);
    drop(backend);
    if Arc::strong_count(&exits) == 1 {
        // SAFETY: the only other owners of `exits` were the backend clones held by the epoll
        // handlers; with all of them gone, the worker threads and their epolls are gone too.
        unsafe { exits.reclaim() };
    } else {
        log::warn!(
            "connection {number}: worker threads still hold the backend; leaking their exit events"
        );
    }
    result
}

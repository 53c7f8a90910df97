//! The serve loop: one frontend at a time, a fresh backend per connection, and back to
//! listening when the frontend goes away.

use std::sync::Arc;

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::error::{Error, VhostUserDaemonError};
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
        serve_one(name, &mut listener, device, stop, connections)?;
        if stop.requested() {
            break;
        }
        log::info!("listening again on {}", listener.path().display());
    }
    log::info!("stopped after {connections} connection(s)");
    Ok(())
}

fn serve_one<D>(
    name: &str,
    listener: &mut SocketListener,
    device: &D,
    stop: &Stop,
    number: u64,
) -> Result<(), Error>
where
    D: Device,
    <D::Backend as VhostUserBackend>::Vring: Clone + Send + Sync,
{
    let exits = Arc::new(WorkerExits::default());
    let backend = device.connect(Arc::clone(&exits)).map_err(Error::Connect)?;
    let mut daemon = VhostUserDaemon::new(
        name.to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| Error::Daemon(VhostUserDaemonError(e)))?;

    let attached = device.attach(&backend, &daemon.get_epoll_handlers());
    let result = match attached {
        Err(e) => Err(Error::Connect(e)),
        Ok(()) => daemon
            .start(listener.listener())
            .map_err(|e| Error::Accept(VhostUserDaemonError(e))),
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

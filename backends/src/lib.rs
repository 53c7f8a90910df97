//! What every Cloister vhost-user backend daemon shares.
//!
//! A backend daemon is built from these pieces, in this order:
//! 1. [`cli::main`] parses the command line (with [`CommonOptions`] flattened into the device's
//!    own options), installs [`logging`] and the [`signals`] that stop it, and prints
//!    `NAME: error: chain` if the body fails.
//! 2. The device opens everything it needs (files, io_uring instances) and binds its socket
//!    ([`SocketListener::bind`]) while it still can.
//! 3. [`Sandbox::enter`] confines the process, still single-threaded; then [`Stop::listen`]
//!    starts the signal thread, and worker threads confine themselves further
//!    ([`sandbox::enter_worker`]).
//! 4. [`server::serve`] serves one frontend at a time on the socket, with a fresh backend per
//!    connection, and listens again when the frontend goes away.

pub mod cli;
pub mod error;
pub mod guest_memory;
pub mod inflight;
pub mod logging;
pub mod options;
pub mod poll;
pub mod relay;
pub mod sandbox;
pub mod server;
pub mod signals;
mod socket;
mod worker_exit;

#[cfg(feature = "test-frontend")]
pub mod test_frontend;

pub use error::{DaemonError, Error};
pub use options::{CommonOptions, LogLevel, SeccompMode};
pub use sandbox::Sandbox;
pub use server::{serve, serve_client, Device};
pub use signals::Stop;
pub use socket::SocketListener;
pub use worker_exit::WorkerExits;

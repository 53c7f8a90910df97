//! `vhost-user-net`: Cloister's virtio-net backend daemon, on a tap device.
//!
//! How it works:
//! - **The tap.** Created or opened by name (`--tap`, needs CAP_NET_ADMIN), or handed over
//!   open (`--tap-fd`, one per queue pair, as cloister's managed mode and orchestrators do), with
//!   `IFF_VNET_HDR`: every frame carries the virtio-net header, so the guest's checksum and
//!   segmentation offloads reach the host kernel as they are, and the kernel hands the guest
//!   large frames as far as the guest said it takes them (`TUNSETOFFLOAD`, from the GUEST_*
//!   features it acknowledged). With several queue pairs the tap is multi-queue, one tap queue
//!   per pair; the queues the driver does not use are detached, so the kernel steers no frame
//!   to them.
//! - **Threads.** `main` (the vhost-user control connection), worker threads (one per queue
//!   pair up to the CPUs, `--threads`; pair i on thread i mod N, the control queue on thread
//!   0), and a signal thread. A worker sleeps in its epoll on its pairs' kick eventfds and tap
//!   queues (edge-triggered).
//! - **Data path** (`pair.rs`): transmit chains go to the tap with one `writev` each, straight
//!   from guest memory; received frames are read into the worker's buffer and copied into the
//!   guest's buffers (several with MRG_RXBUF). With EVENT_IDX a batch of frames costs the guest
//!   at most one interrupt; the receive queue asks for kicks only when it ran out of buffers.
//! - **Control queue** (`ctrl.rs`): receive modes and MAC tables (applied as a filter on
//!   received frames, as a NIC would), the MAC address, the queue pairs in use, the guest's
//!   offloads. The VMM never sees it.

mod backend;
mod config;
mod ctrl;
mod error;
mod filter;
mod pair;
mod state;
mod threads;
mod virtio;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;

use cloister_backends::{logging, serve, serve_client, Sandbox, SocketListener, Stop};
use cloister_seccomp::landlock::Rules;
use cloister_seccomp::ThreadRole;
use cloister_tap::{Interface, InterfaceConfig, MacAddr, TapQueue};

use crate::backend::NetDevice;
use crate::config::{Args, Config, TapSource};
use crate::error::Error;

const NAME: &str = "vhost-user-net";
const DEFAULT_MTU: u16 = 1500;

fn main() -> ExitCode {
    cloister_backends::cli::main(NAME, run)
}

fn run(args: Args) -> Result<(), Error> {
    logging::init(NAME, args.common.log_level.into());
    let config = Config::try_from(&args)?;
    // Before anything else opens a descriptor: a --tap-fd number must be the one inherited,
    // not one of ours.
    let taps = open_taps(&config)?;
    // While this is the only thread: every thread inherits the blocked signals.
    let stop = Stop::block_signals()?;
    let name = taps
        .first()
        .map(|t| t.name().to_owned())
        .unwrap_or_default();
    let mtu = match config.mtu {
        Some(mtu) => mtu,
        // A tap handed over may belong to another network namespace, where its name means
        // nothing here: then the Ethernet default (cloister passes --mtu).
        None => Interface::new(&name)?.mtu().unwrap_or_else(|e| {
            log::warn!("{e}; offering the guest an MTU of {DEFAULT_MTU} (give --mtu)");
            DEFAULT_MTU
        }),
    };
    let mac = config
        .mac
        .unwrap_or_else(|| MacAddr::local_from(name.as_bytes()));
    let device = NetDevice::new(taps, mac, mtu, config.threads, config.poll_max);
    let socket = &args.common.socket;
    if config.client {
        // The directory, not the socket: the frontend may not have made it yet, and makes
        // it anew after a restart.
        Sandbox::new(
            NAME,
            args.common.seccomp,
            Rules::new().connect_unix(socket_dir(socket)),
        )
        .enter(ThreadRole::NetMain)?;
        stop.listen(None)?;
        serve_client(NAME, socket, &device, &stop)?;
    } else {
        let listener = SocketListener::bind(socket)?;
        Sandbox::new(
            NAME,
            args.common.seccomp,
            Rules::new().remove_entries(socket_dir(listener.path())),
        )
        .enter(ThreadRole::NetMain)?;
        stop.listen(Some(socket.clone()))?;
        serve(NAME, listener, &device, &stop)?;
    }
    Ok(())
}

fn socket_dir(socket: &Path) -> &Path {
    match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The tap's queues, one per pair: opened (and the interface configured) by name, or taken
/// over from the descriptors given.
fn open_taps(config: &Config) -> Result<Vec<TapQueue>, Error> {
    match &config.tap {
        TapSource::Name(name) => {
            let taps = TapQueue::open_queues(name, config.queue_pairs.into())?;
            let actual = taps.first().map_or(name.as_str(), |t| t.name());
            Interface::new(actual)?.configure(&InterfaceConfig {
                ip: config.ip,
                mask: config.mask,
                mac: config.host_mac,
                mtu: config.mtu,
            })?;
            Ok(taps)
        }
        TapSource::Fds(fds) => {
            let mut taps: Vec<TapQueue> = Vec::with_capacity(fds.len());
            for &fd in fds {
                // SAFETY: F_GETFD only looks at the descriptor table.
                if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(Error::NotOpen(fd));
                }
                // SAFETY: an open descriptor handed to this process for it to own; the list
                // has no repeats (checked with the options), so each is owned once.
                let tap = TapQueue::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })?;
                if let Some(first) = taps.first() {
                    if first.name() != tap.name() {
                        return Err(Error::MixedTaps(first.name().into(), tap.name().into()));
                    }
                }
                taps.push(tap);
            }
            if taps.len() > 1 && taps.iter().any(|t| !t.multi_queue()) {
                return Err(Error::Usage(
                    "several --tap-fd need a multi-queue tap (IFF_MULTI_QUEUE)".into(),
                ));
            }
            Ok(taps)
        }
    }
}

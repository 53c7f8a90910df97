//! `vhost-user-blk`: Cloister's virtio-blk backend daemon.
//!
//! How it works:
//! - **Threads.** `main` (the vhost-user control connection, through `vhost-user-backend`),
//!   `--threads` worker threads (by default one per virtqueue, but no more than the CPUs the
//!   daemon may run on; `threads.rs` deals queue *i* to thread *i* mod N), and a signal thread.
//!   A worker thread sleeps in its epoll on each of its queues' kick eventfd and io_uring
//!   instance. On a thread shared by several queues, one queue polls only while none of the
//!   others has an event waiting.
//! - **I/O.** Each queue owns an io_uring (created at start-up, before the sandbox, reused by
//!   every connection) with one slot per possible in-flight request. A kick pops every
//!   available chain, parses it (`request.rs`), pushes SQEs, and submits them with one
//!   `io_uring_enter`; completions come back in any order and are returned to the used ring as
//!   they come. Page-cache hits complete inside that `io_uring_enter` and are answered in the
//!   same pass; the rest make the ring readable and wake the worker. Buffered writes are the
//!   exception: ext4 cannot do them without blocking, io_uring would hand each one to a kernel
//!   worker thread, and writing into the page cache on the queue's thread measured several
//!   times faster. A batch of one buffered read tries `preadv2(RWF_NOWAIT)` first, which is
//!   cheaper than a ring round trip when the data is cached. `--direct` opens the image with
//!   O_DIRECT; requests whose buffers or offsets don't meet the file system's O_DIRECT
//!   alignment use a second, buffered descriptor.
//! - **Notifications.** With VIRTIO_RING_F_EVENT_IDX, the worker re-arms `avail_event` only
//!   after it has drained the ring (and looks once more after re-arming), and signals the guest
//!   once per batch of completions, when `used_event` says the guest is waiting for one of
//!   them. A guest that keeps the ring busy is rarely kicked and rarely interrupted.
//! - **Polling.** Once a worker has nothing in flight and nothing to pop, it spins on the avail
//!   ring for up to `--poll-max-us` before it re-arms notifications and sleeps, yielding the
//!   CPU on every turn to any other runnable thread. Waking a sleeping thread costs more than a
//!   cached 4 KiB request takes (tens of microseconds on a virtual host), and a guest whose
//!   next request comes within the window needs neither a kick nor a wake-up. The window
//!   adapts (`cloister_backends::poll`): it shrinks when requests come further apart, so an
//!   idle disk costs no CPU. A polling worker gives its queue to the control thread at once
//!   (GET_VRING_BASE, reset), and a busy one goes back through its event loop every
//!   millisecond.
//! - **Connections.** The image and the rings outlive connections; per connection there is a
//!   fresh `VhostUserBackend`. GET_VRING_BASE waits for the queue's in-flight requests and
//!   completes them first; a reset or a disconnect waits for them and discards the results.

mod backend;
mod config;
mod disk;
mod engine;
mod error;
mod inflight;
mod io_uring_engine;
mod queue;
mod request;
mod sync_engine;
mod threads;
mod virtio;

use std::path::Path;
use std::process::ExitCode;

use cloister_backends::{logging, serve, Sandbox, SocketListener, Stop};
use cloister_seccomp::landlock::Rules;
use cloister_seccomp::ThreadRole;

use crate::backend::BlkDevice;
use crate::config::{Args, Config};
use crate::error::Error;

const NAME: &str = "vhost-user-blk";

fn main() -> ExitCode {
    cloister_backends::cli::main(NAME, run)
}

fn run(args: Args) -> Result<(), Error> {
    logging::init(NAME, args.common.log_level.into());
    // First, while this is the only thread: every thread inherits the blocked signals.
    let stop = Stop::block_signals()?;
    let config = Config::try_from(&args)?;
    // Open the image, create the io_uring instances and bind the socket while the process
    // may still do so; then confine it, still single-threaded, so that every thread it starts
    // (signals, vhost-user control, queue workers) starts confined.
    let device = BlkDevice::new(&config)?;
    let listener = SocketListener::bind(&args.common.socket)?;
    Sandbox::new(
        NAME,
        args.common.seccomp,
        sandbox_rules(&config, listener.path()),
    )
    .enter(ThreadRole::BlkMain)?;
    stop.listen(Some(args.common.socket.clone()))?;
    serve(NAME, listener, &device, &stop)?;
    Ok(())
}

/// What the daemon may still reach once serving: its image (everything is done through the
/// descriptors opened at start-up; the rule only names what it is) and its socket's directory,
/// to remove the socket when it stops. Nothing else; `openat` is refused by seccomp anyway.
fn sandbox_rules(config: &Config, socket: &Path) -> Rules {
    let rules = if config.readonly {
        Rules::new().read_file(&config.image)
    } else {
        Rules::new().read_write_file(&config.image)
    };
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    rules.remove_entries(dir)
}

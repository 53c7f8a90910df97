//! `vhost-user-blk`: Cloister's virtio-blk backend daemon.

mod backend;
mod config;
mod disk;
mod engine;
mod error;
mod io_uring_engine;
mod queue;
mod request;
mod sync_engine;
mod virtio;

use std::process::ExitCode;

use cloister_backends::{logging, serve, Sandbox, Stop};

use crate::backend::BlkDevice;
use crate::config::{Args, Config};
use crate::error::Error;

const NAME: &str = "vhost-user-blk";

fn main() -> ExitCode {
    cloister_backends::cli::main(NAME, run)
}

fn run(args: Args) -> Result<(), Error> {
    logging::init(NAME, args.common.log_level.into());
    // First, before any thread exists: every thread inherits the blocked signals.
    let stop = Stop::from_signals(Some(args.common.socket.clone()))?;
    let config = Config::try_from(&args)?;
    // Open the image and create the io_uring instances while the process may still do so.
    let device = BlkDevice::new(&config)?;
    Sandbox::new(args.common.seccomp).enter()?;
    serve(NAME, &args.common.socket, &device, &stop)?;
    Ok(())
}

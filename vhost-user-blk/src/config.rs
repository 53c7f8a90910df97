//! Command line of `vhost-user-blk` and the validated configuration made from it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use cloister_backends::CommonOptions;

use crate::error::Error;

/// Largest queue count: vhost-user-backend maps queues to worker threads with a 64-bit mask.
pub const MAX_QUEUES: u16 = 64;
/// Largest virtqueue: a request's data segments become one iovec array, and the kernel takes at
/// most 1024 (IOV_MAX) of them; it also bounds the in-flight slots allocated per queue.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Longest polling window accepted (10 ms: past that, sleeping costs nothing in comparison).
pub const MAX_POLL_US: u64 = 10_000;
/// virtio-blk's device ID string is 20 bytes (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL_LEN: usize = 20;

/// Serves a raw disk image to a VMM as a virtio-blk device over vhost-user.
///
/// The daemon listens on --socket, serves one frontend at a time, and listens again when it
/// disconnects. SIGTERM or SIGINT stop it and remove the socket; a second signal, or a stop
/// still unfinished after 5 s (a worker stuck on a frontend's descriptor), ends it with status 1.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-blk", version, about, long_about)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonOptions,

    /// Raw disk image (a regular file or a block device). Its size, rounded down to 512 bytes,
    /// is the disk's capacity.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,

    /// Offer a read-only disk (VIRTIO_BLK_F_RO); writes, discards and zeroing fail.
    #[arg(long)]
    pub readonly: bool,

    /// Number of virtqueues, each with its own io_uring (see --threads for their threads).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUES as i64))]
    pub queues: u16,

    /// Worker threads serving the queues, queue i on thread i mod N (1 to --queues). Default:
    /// one per queue, but no more than the CPUs this process may run on (more threads than
    /// CPUs only add context switches, which cost more than a request on a virtual host), and
    /// with --direct on io_uring no more than half of them: the device moves the data, a
    /// request costs its thread a few microseconds, and one wake-up of a shared thread serves
    /// every queue's completions.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUES as i64))]
    pub threads: Option<u16>,

    /// Requests each queue keeps in flight (its io_uring depth), and the segment limit the
    /// device advertises (this less two, as QEMU does). Rings of any size a frontend may set
    /// (a power of two up to 32768, QEMU's microvm uses 1024) are accepted whatever this is;
    /// a larger ring costs nothing here, requests beyond the depth wait in it.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Open the image with O_DIRECT (bypass the host page cache). Requests whose buffers or
    /// offsets are not aligned for O_DIRECT go through a second, buffered descriptor.
    #[arg(long)]
    pub direct: bool,

    /// Device ID returned to VIRTIO_BLK_T_GET_ID (the guest's /sys/block/vdX/serial); at most
    /// 20 bytes.
    #[arg(long, value_name = "STRING", default_value = "", value_parser = parse_serial)]
    pub serial: String,

    /// How requests reach the image: `io-uring` keeps many in flight per queue; `sync` does
    /// each with preadv/pwritev on the queue's thread (kept for comparison).
    #[arg(long, value_enum, value_name = "ENGINE", default_value_t = EngineKind::IoUring)]
    pub io_engine: EngineKind,

    /// Longest time, in microseconds, a queue worker with nothing in flight busy-polls its ring
    /// for the guest's next request before it sleeps (the guest does not kick a polling
    /// worker). The window adapts like KVM's halt polling (whose default maximum is also
    /// 200 µs): it doubles while work comes back sooner than this and halves whenever a wait
    /// is longer, down to zero, so an idle disk costs no CPU. 0 never polls.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(0..=MAX_POLL_US))]
    pub poll_max_us: u64,
}

/// The I/O engine of every queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    IoUring,
    Sync,
}

fn parse_queue_size(text: &str) -> Result<u16, String> {
    let size: u16 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    if !(2..=MAX_QUEUE_SIZE).contains(&size) || !size.is_power_of_two() {
        return Err(format!("must be a power of two from 2 to {MAX_QUEUE_SIZE}"));
    }
    Ok(size)
}

fn parse_serial(text: &str) -> Result<String, String> {
    if text.len() > MAX_SERIAL_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_SERIAL_LEN}",
            text.len()
        ));
    }
    Ok(text.to_owned())
}

/// What the device is asked to be, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub image: PathBuf,
    pub readonly: bool,
    pub queues: u16,
    /// Worker threads, 1 to `queues`.
    pub threads: u16,
    /// CPUs this process may run on, at start-up.
    pub cpus: usize,
    pub queue_size: u16,
    pub direct: bool,
    pub serial: [u8; MAX_SERIAL_LEN],
    pub engine: EngineKind,
    pub poll_max: Duration,
}

impl TryFrom<&Args> for Config {
    type Error = Error;

    fn try_from(args: &Args) -> Result<Self, Error> {
        // clap's value parsers already enforce the ranges; this re-checks what the rest of the
        // program relies on, for configurations not built by clap.
        if args.queues == 0 || args.queues > MAX_QUEUES {
            return Err(Error::Usage(format!(
                "--queues {}: must be from 1 to {MAX_QUEUES}",
                args.queues
            )));
        }
        parse_queue_size(&args.queue_size.to_string())
            .map_err(|why| Error::Usage(format!("--queue-size {}: {why}", args.queue_size)))?;
        let mut serial = [0u8; MAX_SERIAL_LEN];
        let bytes = args.serial.as_bytes();
        if bytes.len() > MAX_SERIAL_LEN {
            return Err(Error::Usage(format!(
                "--serial: at most {MAX_SERIAL_LEN} bytes"
            )));
        }
        serial[..bytes.len()].copy_from_slice(bytes);
        if args.poll_max_us > MAX_POLL_US {
            return Err(Error::Usage(format!(
                "--poll-max-us {}: at most {MAX_POLL_US}",
                args.poll_max_us
            )));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = match args.threads {
            Some(threads) if threads == 0 || threads > args.queues => {
                return Err(Error::Usage(format!(
                    "--threads {threads}: must be from 1 to the number of queues ({})",
                    args.queues
                )));
            }
            Some(threads) => threads,
            None => default_threads(args.queues, cpus, args.direct, args.io_engine),
        };
        Ok(Self {
            image: args.image.clone(),
            readonly: args.readonly,
            queues: args.queues,
            threads,
            cpus,
            queue_size: args.queue_size,
            direct: args.direct,
            serial,
            engine: args.io_engine,
            poll_max: Duration::from_micros(args.poll_max_us),
        })
    }
}

/// The worker threads for `queues` queues when --threads is not given.
///
/// With O_DIRECT on io_uring a request takes a few microseconds of its thread's CPU, so a
/// thread keeps up with several queues, and a shared thread's one wake-up serves all of their
/// completions. Four queues at QD1 on 2 CPUs (bench/blk's load generator, alternating runs):
/// one thread took 25-33 CPU s per million requests against 35-44 with two (qsd: 31-38) at the
/// same or higher IOPS, and QD32 lost at most a tenth of its 2x lead over qsd. Buffered requests
/// copy the data on the thread, and the synchronous engine blocks it, so those get a thread per
/// queue up to the CPUs.
fn default_threads(queues: u16, cpus: usize, direct: bool, engine: EngineKind) -> u16 {
    let cpus = if direct && engine == EngineKind::IoUring {
        (cpus / 2).max(1)
    } else {
        cpus
    };
    queues.min(u16::try_from(cpus).unwrap_or(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        let mut full = vec!["vhost-user-blk", "--socket", "/tmp/s", "--image", "/tmp/i"];
        full.extend_from_slice(argv);
        Args::try_parse_from(full)
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).unwrap();
        let config = Config::try_from(&args).unwrap();
        assert_eq!(config.queues, 1);
        assert_eq!(config.threads, 1);
        assert_eq!(config.queue_size, 256);
        assert!(!config.readonly && !config.direct);
        assert_eq!(config.serial, [0u8; 20]);
        assert_eq!(config.engine, EngineKind::IoUring);
        assert_eq!(config.poll_max, Duration::from_micros(200));
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["--queues", "0"]).is_err());
        assert!(parse(&["--queues", "65"]).is_err());
        assert!(parse(&["--queue-size", "100"]).is_err());
        assert!(parse(&["--queue-size", "2048"]).is_err());
        assert!(parse(&["--serial", "123456789012345678901"]).is_err());
        assert!(parse(&["--poll-max-us", "10001"]).is_err());
        assert!(parse(&["--poll-max-us", "-1"]).is_err());
        let off = Config::try_from(&parse(&["--poll-max-us", "0"]).unwrap()).unwrap();
        assert_eq!(off.poll_max, Duration::ZERO);
        let args = parse(&["--serial", "12345678901234567890", "--queues", "4"]).unwrap();
        let config = Config::try_from(&args).unwrap();
        assert_eq!(&config.serial, b"12345678901234567890");
        assert_eq!(config.queues, 4);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(usize::from(config.threads), cpus.min(4));
    }

    #[test]
    fn direct_io_uring_queues_share_threads_by_default() {
        assert_eq!(default_threads(4, 2, true, EngineKind::IoUring), 1);
        assert_eq!(default_threads(4, 8, true, EngineKind::IoUring), 4);
        assert_eq!(default_threads(8, 8, true, EngineKind::IoUring), 4);
        assert_eq!(default_threads(4, 1, true, EngineKind::IoUring), 1);
        assert_eq!(default_threads(4, 2, false, EngineKind::IoUring), 2);
        assert_eq!(default_threads(4, 2, true, EngineKind::Sync), 2);
        assert_eq!(default_threads(2, 64, false, EngineKind::IoUring), 2);
    }

    #[test]
    fn threads_are_between_one_and_the_queue_count() {
        let threads = |argv: &[&str]| Config::try_from(&parse(argv).unwrap()).map(|c| c.threads);
        assert_eq!(threads(&["--queues", "4", "--threads", "1"]).unwrap(), 1);
        assert_eq!(threads(&["--queues", "4", "--threads", "4"]).unwrap(), 4);
        let error = threads(&["--queues", "2", "--threads", "3"]).unwrap_err();
        assert!(error.to_string().contains("--threads 3"), "{error}");
        assert!(parse(&["--threads", "0"]).is_err());
    }
}

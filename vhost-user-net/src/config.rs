//! Command line of `vhost-user-net` and the validated configuration made from it.

use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use clap::Parser;
use cloister_backends::CommonOptions;
use cloister_tap::MacAddr;

use crate::error::Error;

/// Largest queue-pair count: vhost-user-backend maps queues to worker threads with a 64-bit
/// mask, and the control queue takes one.
pub const MAX_QUEUE_PAIRS: u16 = 31;

/// Serves a tap device to a VMM as a virtio-net device over vhost-user.
///
/// The tap is created (or opened, if it exists) by name with --tap, which needs
/// CAP_NET_ADMIN, or handed over already open with --tap-fd (one descriptor per queue pair,
/// opened with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR), which needs no privilege at all. The
/// daemon listens on --socket (or, with --client, connects to a VMM listening there), serves
/// one frontend at a time, and waits for the next when it goes away. SIGTERM or SIGINT stop it.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-net", version, about, long_about)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonOptions,

    /// Connect to a frontend listening on --socket (its server mode: cloister's
    /// `vhost_mode=server`, QEMU's `server=on`) instead of listening; after a disconnect,
    /// connect again.
    #[arg(long)]
    pub client: bool,

    /// Tap device to create, or to open if it exists (a name with %d lets the kernel pick).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "tap_fd",
        required_unless_present = "tap_fd"
    )]
    pub tap: Option<String>,

    /// An open tap queue descriptor inherited from the parent (repeat it, one per queue pair).
    #[arg(long = "tap-fd", value_name = "FD")]
    pub tap_fd: Vec<RawFd>,

    /// IPv4 address for the host side of the tap (with --tap).
    #[arg(long, value_name = "A.B.C.D", requires = "tap")]
    pub ip: Option<Ipv4Addr>,

    /// Netmask for --ip.
    #[arg(long, value_name = "M.M.M.M", requires = "ip")]
    pub mask: Option<Ipv4Addr>,

    /// MAC address of the host side of the tap (with --tap).
    #[arg(long, value_name = "MAC", requires = "tap")]
    pub host_mac: Option<MacAddr>,

    /// The guest's MAC address, in the device's config space. Default: a locally administered
    /// address made from the tap's name.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<MacAddr>,

    /// MTU offered to the guest (VIRTIO_NET_F_MTU), and set on a tap created with --tap.
    /// Default: the tap's MTU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(68..=65535))]
    pub mtu: Option<u16>,

    /// Queue pairs (a receive and a transmit virtqueue each; with more than one, a
    /// multi-queue tap with one tap queue per pair). A control queue comes on top.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUE_PAIRS as i64))]
    pub queues: u16,

    /// Worker threads serving the queue pairs, pair i on thread i mod N. Default: one per pair,
    /// but no more than the CPUs this process may run on.
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUE_PAIRS as i64))]
    pub threads: Option<u16>,

    /// Longest time, in microseconds, a worker whose transmit queue ran empty busy-polls it
    /// for the guest's next frames before it sleeps (the guest does not kick a polling worker).
    /// The window adapts as vhost-user-blk's does: it doubles while frames come back sooner,
    /// halves whenever they take longer, down to zero, so an idle NIC costs no CPU. 0 never
    /// polls.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=MAX_POLL_US))]
    pub poll_max_us: u64,
}

/// The largest --poll-max-us.
pub const MAX_POLL_US: u64 = 10_000;

/// Where the tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    Name(String),
    Fds(Vec<RawFd>),
}

/// What the device is asked to be, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub tap: TapSource,
    pub ip: Option<Ipv4Addr>,
    pub mask: Option<Ipv4Addr>,
    pub host_mac: Option<MacAddr>,
    pub mac: Option<MacAddr>,
    pub mtu: Option<u16>,
    pub queue_pairs: u16,
    pub threads: u16,
    pub client: bool,
    pub poll_max: std::time::Duration,
}

impl TryFrom<&Args> for Config {
    type Error = Error;

    fn try_from(args: &Args) -> Result<Self, Error> {
        let tap = match (&args.tap, args.tap_fd.as_slice()) {
            (Some(name), []) => TapSource::Name(name.clone()),
            (None, fds) if !fds.is_empty() => {
                if fds.len() != usize::from(args.queues) {
                    return Err(Error::Usage(format!(
                        "{} --tap-fd given for --queues {}: one tap queue per queue pair",
                        fds.len(),
                        args.queues
                    )));
                }
                let mut sorted = fds.to_vec();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != fds.len() {
                    return Err(Error::Usage("--tap-fd: a descriptor is given twice".into()));
                }
                TapSource::Fds(fds.to_vec())
            }
            _ => {
                return Err(Error::Usage(
                    "give either --tap NAME or --tap-fd (one per queue pair)".into(),
                ))
            }
        };
        if matches!(tap, TapSource::Fds(_)) && (args.ip.is_some() || args.host_mac.is_some()) {
            return Err(Error::Usage(
                "--ip and --host-mac need --tap: a tap handed over is configured by whoever opened it"
                    .into(),
            ));
        }
        if args.mac.is_some_and(|m| !m.is_unicast()) {
            return Err(Error::Usage(format!(
                "--mac {}: a multicast address cannot be an interface's",
                args.mac.map(|m| m.to_string()).unwrap_or_default()
            )));
        }
        if args.mask.is_some() && args.ip.is_none() {
            return Err(Error::Usage("--mask needs --ip".into()));
        }
        if args.queues == 0 || args.queues > MAX_QUEUE_PAIRS {
            return Err(Error::Usage(format!(
                "--queues {}: must be from 1 to {MAX_QUEUE_PAIRS}",
                args.queues
            )));
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = match args.threads {
            Some(t) if t == 0 || t > args.queues => {
                return Err(Error::Usage(format!(
                    "--threads {t}: must be from 1 to the number of queue pairs ({})",
                    args.queues
                )))
            }
            Some(t) => t,
            None => args.queues.min(u16::try_from(cpus).unwrap_or(u16::MAX)),
        };
        Ok(Self {
            tap,
            ip: args.ip,
            mask: args.mask,
            host_mac: args.host_mac,
            mac: args.mac,
            mtu: args.mtu,
            queue_pairs: args.queues,
            threads,
            client: args.client,
            poll_max: std::time::Duration::from_micros(args.poll_max_us),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        let mut full = vec!["vhost-user-net", "--socket", "/tmp/s"];
        full.extend_from_slice(argv);
        Args::try_parse_from(full)
    }

    fn config(argv: &[&str]) -> Result<Config, String> {
        let args = parse(argv).map_err(|e| e.to_string())?;
        Config::try_from(&args).map_err(|e| e.to_string())
    }

    #[test]
    fn a_tap_by_name_or_by_descriptors() {
        let c = config(&["--tap", "t0", "--ip", "10.0.0.1", "--mask", "255.255.255.0"]).unwrap();
        assert_eq!(c.tap, TapSource::Name("t0".into()));
        assert_eq!(c.queue_pairs, 1);
        assert_eq!(c.ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
        let c = config(&["--tap-fd", "5", "--tap-fd", "6", "--queues", "2"]).unwrap();
        assert_eq!(c.tap, TapSource::Fds(vec![5, 6]));
        assert!(c.threads >= 1 && c.threads <= 2);
    }

    #[test]
    fn mistakes_are_named() {
        assert!(config(&[]).is_err());
        assert!(config(&["--tap", "t0", "--tap-fd", "3"]).is_err());
        let e = config(&["--tap-fd", "5", "--tap-fd", "5", "--queues", "2"]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = config(&["--tap-fd", "5", "--queues", "2"]).unwrap_err();
        assert!(e.contains("one tap queue per queue pair"), "{e}");
        assert!(config(&["--tap", "t0", "--mac", "01:00:00:00:00:01"])
            .unwrap_err()
            .contains("multicast"));
        assert!(config(&["--tap", "t0", "--mac", "nonsense"]).is_err());
        assert!(config(&["--tap", "t0", "--queues", "0"]).is_err());
        assert!(config(&["--tap", "t0", "--queues", "32"]).is_err());
        assert!(config(&["--tap", "t0", "--mtu", "67"]).is_err());
        assert!(config(&["--tap", "t0", "--mask", "255.0.0.0"]).is_err());
        assert!(config(&["--tap-fd", "5", "--ip", "10.0.0.1"]).is_err());
        let e = config(&["--tap", "t0", "--queues", "2", "--threads", "3"]).unwrap_err();
        assert!(e.contains("--threads 3"), "{e}");
    }
}

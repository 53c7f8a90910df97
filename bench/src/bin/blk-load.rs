//! `blk-load`: the guest side of a virtio-blk data-plane benchmark, without a guest.
//!
//! Connects to a vhost-user-blk backend (ours or anyone's), shares memfd "guest memory", sets
//! up N virtqueues and keeps QD requests in flight on each, with kicks and interrupt handling
//! as a guest driver does (EVENT_IDX included). One thread per queue, like one vCPU per queue.
//! Reports IOPS, MB/s and, given the backend's pid, the backend's CPU time per million
//! requests (utime + stime from /proc/PID/stat, all its threads).
//!
//! The last line of output is machine-readable: `RESULT key=value ...`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use cloister_backends::test_frontend::blk::{
    features_wanted, header, BlkConfig, CONFIG_LEN, HEADER_LEN, STATUS_UNTOUCHED, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use cloister_backends::test_frontend::{Buffer, Connection, GuestRam, SplitQueue};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, Parser)]
#[command(
    name = "blk-load",
    about = "Drive a vhost-user-blk backend like a guest would, and measure it"
)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Backend process whose CPU time to measure.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    rw: Pattern,
    /// Request size in bytes (a multiple of 512).
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    bs: u32,
    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 1)]
    qd: u16,
    /// Virtqueues, each driven by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    queues: u16,
    /// Virtqueue size.
    #[arg(long, value_name = "N", default_value_t = 256)]
    queue_size: u16,
    /// Measured seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.5)]
    warmup: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Randread,
    Randwrite,
    Read,
    Write,
}

impl Pattern {
    fn is_write(self) -> bool {
        matches!(self, Pattern::Randwrite | Pattern::Write)
    }

    fn is_random(self) -> bool {
        matches!(self, Pattern::Randread | Pattern::Randwrite)
    }
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("cannot set up the frontend")]
    Frontend(#[from] cloister_backends::test_frontend::Error),
    #[error("the backend's config space is too short")]
    Config,
    #[error("disk of {capacity} bytes is smaller than one {bs}-byte request per queue slot")]
    DiskTooSmall { capacity: u64, bs: u32 },
    #[error("cannot read /proc/{pid}/stat")]
    Stat {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("queue thread {0} failed")]
    Worker(usize, #[source] Box<Error>),
    #[error("queue thread {0} panicked")]
    Panicked(usize),
}

/// One request slot of a queue: its own header, data and status buffers.
struct Slot {
    header: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

/// What the measurement window saw on one queue.
#[derive(Default, Clone, Copy)]
struct Counts {
    requests: u64,
    errors: u64,
    kicks: u64,
    interrupts: u64,
}

struct Plan {
    pattern: Pattern,
    bs: u32,
    qd: u16,
    blocks: u64,
    start_measure: Instant,
    end_measure: Instant,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "blk-load: error: {} (see --help)",
                cloister_backends::cli::usage_message(&e)
            );
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk-load: error: {}", cloister_backends::error::chain(&e));
            ExitCode::from(if matches!(e, Error::Usage(_)) { 2 } else { 1 })
        }
    }
}

fn run(args: &Args) -> Result<(), Error> {
    if args.bs == 0 || args.bs % 512 != 0 {
        return Err(Error::Usage(format!(
            "--bs {}: must be a positive multiple of 512",
            args.bs
        )));
    }
    if args.qd == 0 || args.queues == 0 || args.qd > args.queue_size / 3 {
        // A request takes three descriptors (header, data, status).
        return Err(Error::Usage(format!(
            "--qd {} --queues {}: need 1 <= qd <= queue-size/3 ({}) and at least one queue",
            args.qd,
            args.queues,
            args.queue_size / 3
        )));
    }
    let queues = usize::from(args.queues);
    let slot_bytes = u64::from(args.bs) + 2 * 4096;
    let ram_bytes = (queues as u64 * u64::from(args.qd) * slot_bytes
        + queues as u64 * 3 * 4096 * 4)
        .next_multiple_of(2 << 20)
        + (2 << 20);
    let ram = Arc::new(GuestRam::new(&[(0, ram_bytes as usize)])?);
    let mut connection = Connection::connect(&args.socket, &ram, features_wanted(), queues)?;
    let config = BlkConfig::parse(&connection.config(0, CONFIG_LEN)?).ok_or(Error::Config)?;
    let event_idx = connection.negotiation().has(VIRTIO_RING_F_EVENT_IDX);
    let blocks = config.capacity_bytes() / u64::from(args.bs);
    if blocks < u64::from(args.qd) * queues as u64 {
        return Err(Error::DiskTooSmall {
            capacity: config.capacity_bytes(),
            bs: args.bs,
        });
    }

    let mut rings = Vec::with_capacity(queues);
    for index in 0..queues {
        let queue = SplitQueue::new(Arc::clone(&ram), args.queue_size, event_idx)?;
        connection.start_queue(index, &ram, &queue)?;
        let slots = (0..args.qd)
            .map(|_| {
                Ok(Slot {
                    header: ram.alloc(u64::from(HEADER_LEN), 64)?,
                    data: ram.alloc(u64::from(args.bs), 4096)?,
                    status: ram.alloc(1, 64)?,
                })
            })
            .collect::<Result<Vec<_>, cloister_backends::test_frontend::Error>>()?;
        // Written data: incompressible and never all zeros.
        for slot in &slots {
            let fill: Vec<u8> = (0..args.bs)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
                .collect();
            ram.memory()
                .write_slice(&fill, slot.data)
                .map_err(|e| cloister_backends::test_frontend::Error::Access(e.to_string()))?;
        }
        rings.push((queue, slots));
    }

    let start = Instant::now();
    let start_measure = start + Duration::from_secs_f64(args.warmup);
    let plan = Arc::new(Plan {
        pattern: args.rw,
        bs: args.bs,
        qd: args.qd,
        blocks,
        start_measure,
        end_measure: start_measure + Duration::from_secs_f64(args.duration),
    });
    let failed = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = rings
        .into_iter()
        .enumerate()
        .map(|(index, (queue, slots))| {
            let plan = Arc::clone(&plan);
            let ram = Arc::clone(&ram);
            let failed = Arc::clone(&failed);
            std::thread::Builder::new()
                .name(format!("queue{index}"))
                .spawn(move || {
                    let result = drive(index, queue, &slots, &ram, &plan, &failed);
                    if result.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    result
                })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Worker(0, Box::new(Error::Usage(e.to_string()))))?;

    sleep_until(plan.start_measure);
    let cpu_start = args.pid.map(cpu_seconds).transpose()?;
    sleep_until(plan.end_measure);
    let cpu_end = args.pid.map(cpu_seconds).transpose()?;

    let mut total = Counts::default();
    let mut latencies = Vec::new();
    for (index, worker) in workers.into_iter().enumerate() {
        let (counts, queue_latencies) = worker
            .join()
            .map_err(|_| Error::Panicked(index))?
            .map_err(|e| Error::Worker(index, Box::new(e)))?;
        total.requests += counts.requests;
        total.errors += counts.errors;
        total.kicks += counts.kicks;
        total.interrupts += counts.interrupts;
        latencies.extend(queue_latencies);
    }
    drop(connection);
    latencies.sort_unstable();
    // Nearest-rank percentiles, in microseconds.
    let percentile = |p: f64| -> Option<f64> {
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        latencies
            .get(rank.saturating_sub(1))
            .map(|&ns| ns as f64 / 1000.0)
    };
    let (p50, p99) = (percentile(50.0), percentile(99.0));
    let micros = |v: Option<f64>| v.map_or("na".to_string(), |us| format!("{us:.1}"));

    let seconds = args.duration;
    let iops = total.requests as f64 / seconds;
    let mbps = total.requests as f64 * f64::from(args.bs) / seconds / 1e6;
    let cpu = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let cpu_per_mreq = cpu.map(|c| {
        if total.requests > 0 {
            c / total.requests as f64 * 1e6
        } else {
            f64::NAN
        }
    });
    let per_request = |n: u64| {
        if total.requests > 0 {
            n as f64 / total.requests as f64
        } else {
            0.0
        }
    };
    // A closed stdout (e.g. `| head -1`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "blk-load: {:?} bs={} qd={} queues={}: {:.0} IOPS, {:.1} MB/s{}, latency p50 {} µs p99 {} µs, {:.2} kicks and {:.2} interrupts per request, {} errors",
        args.rw,
        args.bs,
        args.qd,
        args.queues,
        iops,
        mbps,
        match (cpu, cpu_per_mreq) {
            (Some(c), Some(m)) => format!(", backend CPU {c:.2} s ({m:.2} s per million requests)"),
            _ => String::new(),
        },
        micros(p50),
        micros(p99),
        per_request(total.kicks),
        per_request(total.interrupts),
        total.errors
    );
    let _ = writeln!(
        out,
        "RESULT iops={iops:.0} mbps={mbps:.1} cpu_s={} cpu_s_per_mreq={} requests={} errors={} kicks_per_req={:.3} irqs_per_req={:.3} lat_p50_us={} lat_p99_us={}",
        cpu.map_or("na".into(), |c| format!("{c:.3}")),
        cpu_per_mreq.map_or("na".into(), |c| format!("{c:.3}")),
        total.requests,
        total.errors,
        per_request(total.kicks),
        per_request(total.interrupts),
        micros(p50),
        micros(p99),
    );
    if total.errors > 0 {
        eprintln!("blk-load: warning: {} requests failed", total.errors);
    }
    Ok(())
}

/// Keeps `plan.qd` requests in flight on one queue until the window closes, then drains.
fn drive(
    index: usize,
    mut queue: SplitQueue,
    slots: &[Slot],
    ram: &GuestRam,
    plan: &Plan,
    failed: &AtomicBool,
) -> Result<(Counts, Vec<u64>), Error> {
    let mem = ram.memory();
    let access = |e: vm_memory::GuestMemoryError| {
        cloister_backends::test_frontend::Error::Access(e.to_string())
    };
    let kind = if plan.pattern.is_write() {
        VIRTIO_BLK_T_OUT
    } else {
        VIRTIO_BLK_T_IN
    };
    let sectors_per_block = u64::from(plan.bs) / 512;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ ((index as u64 + 1) << 32);
    // Sequential streams start in different parts of the disk per queue.
    let mut next_block = plan.blocks / (index as u64 + 2) * index as u64 % plan.blocks;
    let mut pick = |rng: &mut u64| {
        if plan.pattern.is_random() {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng % plan.blocks
        } else {
            let block = next_block;
            next_block = (next_block + 1) % plan.blocks;
            block
        }
    };
    let mut slot_of_head = vec![usize::MAX; usize::from(queue.size())];
    // When each slot's request was made available, and each measured request's latency (ns):
    // from then until this thread saw it used.
    let mut issued_at = vec![Instant::now(); slots.len()];
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut issue =
        |queue: &mut SplitQueue, slot_index: usize, rng: &mut u64| -> Result<u16, Error> {
            let slot = &slots[slot_index];
            let sector = pick(rng) * sectors_per_block;
            mem.write_slice(&header(kind, sector), slot.header)
                .map_err(access)?;
            mem.write_obj(STATUS_UNTOUCHED, slot.status)
                .map_err(access)?;
            let head = queue.add(&[
                Buffer::readable(slot.header, HEADER_LEN),
                Buffer {
                    addr: slot.data,
                    len: plan.bs,
                    writable: !plan.pattern.is_write(),
                },
                Buffer::writable(slot.status, 1),
            ])?;
            Ok(head)
        };

    for (slot_index, issued) in issued_at.iter_mut().enumerate().take(usize::from(plan.qd)) {
        let head = issue(&mut queue, slot_index, &mut rng)?;
        slot_of_head[usize::from(head)] = slot_index;
        *issued = Instant::now();
    }
    queue.notify()?;
    let mut outstanding = usize::from(plan.qd);
    let mut counts = Counts::default();
    let kicks_before = queue.kicks;
    let mut kicks_at_start = None;
    let mut stopping = false;
    while outstanding > 0 {
        let mut completed = 0;
        while let Some((head, _len)) = queue.pop_used()? {
            completed += 1;
            let slot_index = slot_of_head[usize::from(head)];
            let status: u8 = mem.read_obj(slots[slot_index].status).map_err(access)?;
            let now = Instant::now();
            if now >= plan.start_measure && now < plan.end_measure {
                if kicks_at_start.is_none() {
                    kicks_at_start = Some(queue.kicks);
                }
                counts.requests += 1;
                latencies.push(now.duration_since(issued_at[slot_index]).as_nanos() as u64);
                if status != VIRTIO_BLK_S_OK as u8 {
                    counts.errors += 1;
                }
            }
            stopping = stopping || now >= plan.end_measure || failed.load(Ordering::Relaxed);
            if stopping {
                outstanding -= 1;
            } else {
                let head = issue(&mut queue, slot_index, &mut rng)?;
                slot_of_head[usize::from(head)] = slot_index;
                issued_at[slot_index] = Instant::now();
            }
        }
        if completed > 0 {
            queue.notify()?;
        }
        if outstanding == 0 {
            break;
        }
        // Interrupts on, then one last look before sleeping (as virtqueue_enable_cb does).
        if queue.enable_interrupts()? {
            continue;
        }
        if queue.wait_call(Duration::from_secs(10))? {
            if Instant::now() >= plan.start_measure && Instant::now() < plan.end_measure {
                counts.interrupts += 1;
            }
        } else if queue.pop_used()?.is_none() {
            return Err(Error::Frontend(
                cloister_backends::test_frontend::Error::Timeout(Duration::from_secs(10)),
            ));
        }
    }
    counts.kicks = queue.kicks - kicks_at_start.unwrap_or(kicks_before);
    Ok((counts, latencies))
}

fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        std::thread::sleep(when - now);
    }
}

/// utime + stime of every thread of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64, Error> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| Error::Stat { pid, source })?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let after = text.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let parse = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (parse(11), parse(12)) else {
        return Err(Error::Stat {
            pid,
            source: std::io::Error::other("unexpected format"),
        });
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) as f64 / ticks)
}

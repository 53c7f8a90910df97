//! `api-latency --runs N --cloister API.sock --qmp QMP.sock`: control-plane round trips,
//! cloister's REST API beside QEMU's QMP, on VMs that are already running:
//! - status: cloister `GET vm.info` (a connection per request, as `ch-remote` does, and on one
//!   kept-alive connection, as an orchestrator's client does) against QMP `query-status` (on
//!   QMP's one connection);
//! - pause+resume: `PUT vm.pause` then `PUT vm.resume` against `stop` then `cont`.
//!
//! Prints the median and 95th percentile of each, and the ratio of medians (cloister / QEMU).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// cloister's --api-socket.
    #[arg(long)]
    cloister: PathBuf,
    /// QEMU's -qmp unix socket.
    #[arg(long)]
    qmp: PathBuf,
}

fn main() {
    let args = Args::parse();
    let mut qmp = Qmp::connect(&args.qmp);
    let status_once = time(args.runs, || http_once(&args.cloister, "GET", "vm.info"));
    // Opened just now: the server serves one connection at a time, so an open connection
    // holds the others until it is used or idle.
    let mut keep = UnixStream::connect(&args.cloister).expect("connect to cloister's API");
    let status_kept = time(args.runs, || http(&mut keep, "GET", "vm.info", true));
    drop(keep);
    let status_qmp = time(args.runs, || qmp.execute("query-status"));
    let pause = time(args.runs / 4 + 1, || {
        http_once(&args.cloister, "PUT", "vm.pause");
        http_once(&args.cloister, "PUT", "vm.resume");
    });
    let pause_qmp = time(args.runs / 4 + 1, || {
        qmp.execute("stop");
        qmp.execute("cont");
    });
    println!("| call | cloister median / p95 | QEMU QMP median / p95 | cloister / QEMU |");
    println!("| --- | --- | --- | --- |");
    row(
        "status, a connection per request",
        &status_once,
        &status_qmp,
    );
    row("status, one connection", &status_kept, &status_qmp);
    row("pause + resume", &pause, &pause_qmp);
}

fn row(name: &str, ours: &[Duration], qemu: &[Duration]) {
    let (m, p) = (percentile(ours, 50), percentile(ours, 95));
    let (qm, qp) = (percentile(qemu, 50), percentile(qemu, 95));
    println!(
        "| {name} | {} / {} µs | {} / {} µs | {:.2} |",
        m.as_micros(),
        p.as_micros(),
        qm.as_micros(),
        qp.as_micros(),
        m.as_secs_f64() / qm.as_secs_f64()
    );
}

fn time(runs: usize, mut f: impl FnMut()) -> Vec<Duration> {
    // A few first to warm both sides up.
    for _ in 0..3 {
        f();
    }
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

fn http_once(socket: &PathBuf, method: &str, endpoint: &str) {
    let mut stream = UnixStream::connect(socket).expect("connect to cloister's API");
    http(&mut stream, method, endpoint, false);
}

/// One request and its whole reply (read by Content-Length).
fn http(stream: &mut UnixStream, method: &str, endpoint: &str, keep_alive: bool) {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let request = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("reply head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 2"),
        "{method} {endpoint}: {head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("reply body");
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &PathBuf) -> Qmp {
        let stream = UnixStream::connect(path).expect("connect to QMP");
        let writer = stream.try_clone().expect("clone");
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting).expect("QMP greeting");
        qmp.execute("qmp_capabilities");
        qmp
    }

    /// Sends a command and reads lines until its reply (events in between are skipped).
    fn execute(&mut self, command: &str) {
        writeln!(self.writer, "{{\"execute\": \"{command}\"}}").expect("send");
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("QMP reply");
            assert!(!line.contains("\"error\""), "{command}: {line}");
            if line.contains("\"return\"") {
                return;
            }
        }
    }
}

//! `boot-timer`: starts VMMs alternately and times each from exec to a marker on its output.
//!
//! ```text
//! boot-timer --runs N --marker TEXT --case NAME PROGRAM ARGS... -- [--case NAME ... --]
//! ```
//! Each run of each case: the time from spawning the process to its first output byte and to
//! the first line containing TEXT, the time until it exits, and its peak RSS (from wait4). Cases
//! alternate run by run, so a machine that gets slower affects all alike. Prints one line per run
//! and a summary with medians and the ratio of every case to the first:
//! `@@CLOISTER-MARK <case>.median_ms=...@@` lines are for the harness.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

struct Case {
    name: String,
    argv: Vec<String>,
}

#[derive(Default, Clone, Copy)]
struct Sample {
    first_byte_ms: f64,
    marker_ms: f64,
    exit_ms: f64,
    peak_rss_kib: i64,
    status: i32,
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("boot-timer: {problem}");
    eprintln!("usage: boot-timer --runs N --marker TEXT --case NAME PROGRAM ARGS... -- [...]");
    ExitCode::from(2)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors on success; ownership is taken right away.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One run: spawn, read stdout until EOF noting the first byte and the marker, reap with wait4.
fn run_once(case: &Case, marker: &[u8]) -> std::io::Result<Sample> {
    let (reader, writer) = pipe()?;
    let start = Instant::now();
    let child = Command::new(&case.argv[0])
        .args(&case.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::null())
        .spawn()?;
    let mut sample = Sample {
        first_byte_ms: f64::NAN,
        marker_ms: f64::NAN,
        ..Sample::default()
    };
    let mut stream = std::fs::File::from(reader);
    let mut seen: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let now = start.elapsed().as_secs_f64() * 1000.0;
        if sample.first_byte_ms.is_nan() {
            sample.first_byte_ms = now;
        }
        if sample.marker_ms.is_nan() {
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(marker.len()).any(|w| w == marker) {
                sample.marker_ms = now;
            }
            // Keep only what could still hold the start of a marker.
            let keep = seen.len().saturating_sub(marker.len());
            seen.drain(..keep);
        }
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, filling status and usage.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    sample.exit_ms = start.elapsed().as_secs_f64() * 1000.0;
    sample.peak_rss_kib = usage.ru_maxrss;
    sample.status = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Ok(sample)
}

fn main() -> ExitCode {
    let mut runs = 10usize;
    let mut marker = String::new();
    let mut cases: Vec<Case> = Vec::new();
    let mut args = std::env::args().skip(1).peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => match args.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => runs = n,
                _ => return usage("--runs needs a positive number"),
            },
            "--marker" => match args.next() {
                Some(m) if !m.is_empty() => marker = m,
                _ => return usage("--marker needs some text"),
            },
            "--case" => {
                let Some(name) = args.next() else {
                    return usage("--case needs a name");
                };
                let argv: Vec<String> = args.by_ref().take_while(|a| a != "--").collect();
                if argv.is_empty() {
                    return usage(&format!("--case {name}: no program"));
                }
                cases.push(Case { name, argv });
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    if marker.is_empty() || cases.is_empty() {
        return usage("--marker and at least one --case are required");
    }

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); cases.len()];
    for run in 0..runs {
        for (index, case) in cases.iter().enumerate() {
            match run_once(case, marker.as_bytes()) {
                Ok(sample) => {
                    println!(
                        "run {run:2} {:12} first byte {:9.2} ms  marker {:9.2} ms  exit {:9.2} ms  \
                         peak RSS {:7} KiB  status {}",
                        case.name,
                        sample.first_byte_ms,
                        sample.marker_ms,
                        sample.exit_ms,
                        sample.peak_rss_kib,
                        sample.status
                    );
                    samples[index].push(sample);
                }
                Err(e) => {
                    eprintln!(
                        "boot-timer: {}: cannot run {}: {e}",
                        case.name, case.argv[0]
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
    }

    let mut failed = false;
    let mut reference = f64::NAN;
    println!(
        "\n{:12} {:>14} {:>14} {:>14} {:>12} {:>8}",
        "case", "first byte", "marker", "exit", "peak RSS", "ratio"
    );
    for (index, case) in cases.iter().enumerate() {
        let set = &samples[index];
        let missed = set.iter().filter(|s| s.marker_ms.is_nan()).count();
        let first = median(&mut set.iter().map(|s| s.first_byte_ms).collect::<Vec<_>>());
        let to_marker = median(
            &mut set
                .iter()
                .map(|s| s.marker_ms)
                .filter(|v| !v.is_nan())
                .collect::<Vec<_>>(),
        );
        let exit = median(&mut set.iter().map(|s| s.exit_ms).collect::<Vec<_>>());
        let rss = set.iter().map(|s| s.peak_rss_kib).max().unwrap_or(0);
        if index == 0 {
            reference = to_marker;
        }
        let ratio = to_marker / reference;
        println!(
            "{:12} {:11.2} ms {:11.2} ms {:11.2} ms {:8} KiB {:8.3}",
            case.name, first, to_marker, exit, rss, ratio
        );
        println!("@@CLOISTER-MARK {}.first_byte_ms={first:.3}@@", case.name);
        println!("@@CLOISTER-MARK {}.median_ms={to_marker:.3}@@", case.name);
        println!("@@CLOISTER-MARK {}.peak_rss_kib={rss}@@", case.name);
        println!("@@CLOISTER-MARK {}.ratio={ratio:.3}@@", case.name);
        if missed > 0 {
            eprintln!(
                "boot-timer: {}: marker missing in {missed} of {} runs",
                case.name,
                set.len()
            );
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

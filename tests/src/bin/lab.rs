//! `lab`: runs one scenario script in the lab (or directly on a hardware-KVM host) and shows its
//! console; the demo and the benchmarks use it.
//!
//! Usage: lab [--rootfs] [--memory MIB] [--timeout SECS] SCRIPT [NAME]

use std::process::ExitCode;
use std::time::Duration;

use harness::{lab, LabOptions, Scenario};

fn usage() -> ExitCode {
    eprintln!("usage: lab [--rootfs] [--memory MIB] [--timeout SECS] SCRIPT [NAME]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut options = LabOptions::default();
    let mut timeout = Duration::from_secs(600);
    let mut positional = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rootfs" => options.rootfs = true,
            "--memory" => match args.next().and_then(|v| v.parse().ok()) {
                Some(mib) => options.memory_mib = mib,
                None => return usage(),
            },
            "--timeout" => match args.next().and_then(|v| v.parse().ok()) {
                Some(secs) => timeout = Duration::from_secs(secs),
                None => return usage(),
            },
            "-h" | "--help" => return usage(),
            _ if arg.starts_with('-') => return usage(),
            _ => positional.push(arg),
        }
    }
    let (script_path, name) = match positional.as_slice() {
        [script] => (script.clone(), "lab".to_string()),
        [script, name] => (script.clone(), name.clone()),
        _ => return usage(),
    };
    let script = match std::fs::read_to_string(&script_path) {
        Ok(script) => script,
        Err(e) => {
            eprintln!("lab: cannot read {script_path}: {e}");
            return ExitCode::from(2);
        }
    };
    let scenario = Scenario::new(&name, &script).timeout(timeout);
    match lab::run(&name, &[scenario], &options) {
        Ok(run) => match run.scenario(&name) {
            Ok(outcome) if outcome.rc == Some(0) => ExitCode::SUCCESS,
            Ok(outcome) => {
                eprintln!("lab: scenario {name} ended with {:?}", outcome.rc);
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("lab: {}", e.lines().next().unwrap_or_default());
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("lab: {e}");
            ExitCode::FAILURE
        }
    }
}

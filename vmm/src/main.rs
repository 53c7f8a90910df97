//! `cloister`: parse the command line, run the VM, turn the outcome into a message and an exit
//! status.

use std::process::ExitCode;

use clap::Parser;
use vmm::config::Cli;
use vmm::ExitReason;

fn main() -> ExitCode {
    // A bug must still produce one line in our format rather than a panic report.
    cloister_seccomp::panic_report::install("cloister");
    let cli = Cli::parse();
    match vmm::run(&cli) {
        Ok(reason) => {
            match &reason {
                ExitReason::PowerOff => {}
                ExitReason::Reboot | ExitReason::Signal(_) => eprintln!("cloister: {reason}"),
                _ => eprintln!("cloister: error: {reason}"),
            }
            ExitCode::from(reason.exit_code())
        }
        Err(e) => {
            eprintln!("cloister: error: {}", vmm::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

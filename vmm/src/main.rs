//! `cloister`: parse the command line, run the VM, turn the outcome into a message and an exit
//! status.

use std::process::ExitCode;

use clap::Parser;
use vmm::config::Cli;
use vmm::ExitReason;

/// A bug must still produce one line in our format rather than a panic report.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown cause");
        let at = info
            .location()
            .map(|l| format!(" ({}:{})", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        eprintln!("cloister: internal error in thread {name}: {msg}{at}");
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
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

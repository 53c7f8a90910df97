//! The top of every backend's `main`: parse, run, and report failure as `NAME: error: chain`
//! with exit status 2 for usage errors and 1 for the rest.

use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Parser;

use crate::error::{chain, DaemonError};

/// Exit status for command-line mistakes (the convention of BSD `sysexits` `EX_USAGE` family and
/// of most GNU tools).
pub const EXIT_USAGE: u8 = 2;

/// Parses `A` from the command line and runs `body` with it.
pub fn main<A, E>(name: &str, body: impl FnOnce(A) -> Result<(), E>) -> ExitCode
where
    A: Parser,
    E: DaemonError,
{
    let args = match A::try_parse() {
        Ok(args) => args,
        Err(error) => return clap_failure(name, &error),
    };
    match body(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: error: {}", chain(&error));
            if error.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `--help` and `--version` go to stdout with status 0; anything else becomes one line on
/// stderr that names the offending option, and status 2.
fn clap_failure(name: &str, error: &clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Nothing useful to do if stdout is closed.
            let _ = error.print();
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{name}: error: {} (see --help)", usage_message(error));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// One line out of clap's multi-line report.
pub fn usage_message(error: &clap::Error) -> String {
    let missing = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::Strings(args)) => args.join(", "),
        Some(ContextValue::String(arg)) => arg.clone(),
        _ => String::new(),
    };
    if error.kind() == ErrorKind::MissingRequiredArgument && !missing.is_empty() {
        return format!("missing required option {missing}");
    }
    let rendered = error.render().to_string();
    let first = rendered
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("invalid command line");
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser, Debug)]
    struct Args {
        #[arg(long)]
        image: String,
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: Option<u16>,
    }

    fn message(argv: &[&str]) -> String {
        let error = Args::try_parse_from(argv).unwrap_err();
        usage_message(&error)
    }

    #[test]
    fn messages_name_the_option() {
        assert_eq!(message(&["x"]), "missing required option --image <IMAGE>");
        let bad = message(&["x", "--image", "a", "--queues", "0"]);
        assert!(bad.contains("--queues"), "{bad}");
        assert!(!bad.contains('\n'));
        let unknown = message(&["x", "--image", "a", "--frobnicate"]);
        assert!(unknown.contains("--frobnicate"), "{unknown}");
    }
}

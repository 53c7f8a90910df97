//! `make-payload DIR`: writes the tiny PVH payload that prints `CLOISTER-PAYLOAD-OK` and powers
//! off (see `harness::payload`), and prints its path. The host boot benchmark uses it.

use std::path::Path;
use std::process::ExitCode;

use harness::payload::{self, Payload};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir] = args.as_slice() else {
        eprintln!("usage: make-payload DIR");
        return ExitCode::from(2);
    };
    match payload::write(Payload::PowerOff, Path::new(dir)) {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("make-payload: cannot write into {dir}: {e}");
            ExitCode::FAILURE
        }
    }
}

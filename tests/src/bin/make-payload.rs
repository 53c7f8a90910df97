//! `make-payload DIR [hang]`: writes the tiny PVH payload that prints `CLOISTER-PAYLOAD-OK` and
//! powers off (see `harness::payload`), or with `hang` the one that prints its marker and halts
//! for ever, and prints its path. The host boot and fs benchmarks use them.

use std::path::Path;
use std::process::ExitCode;

use harness::payload::{self, Payload};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, kind) = match args.as_slice() {
        [dir] => (dir, Payload::PowerOff),
        [dir, hang] if hang == "hang" => (dir, Payload::Hang),
        _ => {
            eprintln!("usage: make-payload DIR [hang]");
            return ExitCode::from(2);
        }
    };
    match payload::write(kind, Path::new(dir)) {
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

//! `guest-mem PID`: a checksum of a running cloister's guest RAM (the mapping of its
//! guest-memory memfd at file offset 0, that is RAM from guest address 0), read through
//! /proc/PID/mem, for tests that check that a paused guest's memory does not change. Prints
//! `bytes=N fnv=HEX`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(pid) = std::env::args().nth(1) else {
        eprintln!("usage: guest-mem PID");
        return ExitCode::from(2);
    };
    match checksum(&pid) {
        Ok((bytes, sum)) => {
            println!("bytes={bytes} fnv={sum:016x}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("guest-mem: {e}");
            ExitCode::FAILURE
        }
    }
}

fn checksum(pid: &str) -> Result<(u64, u64), String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
    let range = maps
        .lines()
        .find(|l| {
            l.contains("cloister-guest-ram") && l.split_whitespace().nth(2) == Some("00000000")
        })
        .and_then(|l| l.split_whitespace().next())
        .ok_or("no guest RAM mapping")?;
    let (start, end) = range.split_once('-').ok_or("bad maps line")?;
    let start = u64::from_str_radix(start, 16).map_err(|e| e.to_string())?;
    let end = u64::from_str_radix(end, 16).map_err(|e| e.to_string())?;
    let mem = File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let n = buf.len().min((end - at) as usize);
        mem.read_exact_at(&mut buf[..n], at)
            .map_err(|e| format!("read at {at:#x}: {e}"))?;
        // FNV-1a over 8-byte words: fast enough under emulation, and any change shows.
        for word in buf[..n].chunks(8) {
            let mut w = [0u8; 8];
            w[..word.len()].copy_from_slice(word);
            hash = (hash ^ u64::from_le_bytes(w)).wrapping_mul(0x0100_0000_01b3);
        }
        at += n as u64;
    }
    Ok((end - start, hash))
}

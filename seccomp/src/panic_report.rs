//! Panics reported in one line, within every sandboxed thread's policy.
//!
//! std's default hook prints a backtrace when `RUST_BACKTRACE` is set, and resolving it reads
//! `/proc/self/exe` (readlink) and `/proc/self/maps`: calls no sandboxed thread may make, so a
//! panic the program means to survive (a backend's worker catches them) would end in SIGSYS.
//! This hook writes one line and ignores a failing stderr (a panic inside a panic hook aborts
//! the process).

use std::io::Write;

/// Replaces the panic hook: `PROGRAM: internal error in thread NAME: MESSAGE (FILE:LINE)`.
pub fn install(program: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
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
        let _ = writeln!(
            std::io::stderr(),
            "{program}: internal error in thread {name}: {message}{at}"
        );
    }));
}

//! `--event-monitor`: what happens to the VMM and the VM, one JSON object per line, with
//! Cloud Hypervisor's event names where it has them:
//!
//! ```text
//! {"timestamp":{"secs":0,"nanos":1834567},"source":"vm","event":"booted","properties":null}
//! ```
//!
//! `timestamp` counts from cloister's start. Sources and events: `vmm` (`starting`,
//! `shutdown`), `vm` (`booting`, `booted`, `pausing`, `paused`, `resuming`, `resumed`,
//! `shutdown`, `deleted`, `power-button`), `device` (`added`, `removed`, `ejecting`,
//! `backend-lost`, `backend-recovered`; `properties` has the device's `id`, and more).
//!
//! The destination is opened once, before any thread is confined; every thread may write to it
//! (`write(2)` is in every seccomp role). Lines are written whole, under a lock, so that
//! events from several threads never interleave; a failed write is dropped, never fatal, and an
//! inherited descriptor is made non-blocking, so a reader that stops reading (a full pipe)
//! loses events rather than stalling the thread that emits them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde_json::{json, Value};

struct Monitor {
    out: Mutex<File>,
    start: Instant,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// `--event-monitor`'s value: `path=PATH` (created or appended to), a bare PATH, or `fd=N`
/// (an inherited descriptor, as Kata hands one over).
pub fn open(value: &str) -> Result<(), String> {
    let out = if let Some(fd) = value.strip_prefix("fd=") {
        let fd: RawFd = fd
            .parse()
            .map_err(|_| format!("'{fd}' is not a descriptor number"))?;
        // SAFETY: fcntl(F_GETFD) only checks that the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("descriptor {fd} is not open"));
        }
        // SAFETY: an open descriptor handed to us to own; marked close-on-exec so that
        // backends do not inherit it, and non-blocking so that a reader that stops reading
        // costs it events, never a VMM thread (lines that do not fit are dropped).
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
            File::from_raw_fd(fd)
        }
    } else {
        let path = value.strip_prefix("path=").unwrap_or(value);
        if path.is_empty() {
            return Err("no path".into());
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {path}: {e}"))?
    };
    MONITOR
        .set(Monitor {
            out: Mutex::new(out),
            start: Instant::now(),
        })
        .map_err(|_| "given twice".to_string())
}

/// Writes one event, if there is a monitor.
pub fn emit(source: &str, event: &str, properties: Option<Value>) {
    let Some(m) = MONITOR.get() else {
        return;
    };
    let t = m.start.elapsed();
    let line = json!({
        "timestamp": {"secs": t.as_secs(), "nanos": t.subsec_nanos()},
        "source": source,
        "event": event,
        "properties": properties,
    });
    let mut text = line.to_string();
    text.push('\n');
    let mut out = m.out.lock().unwrap_or_else(|e| e.into_inner());
    let _ = out.write_all(text.as_bytes());
}

/// An event about device `id`, with more properties if given.
pub fn device(event: &str, id: &str, more: Option<Value>) {
    let mut properties = json!({ "id": id });
    if let (Some(Value::Object(more)), Some(p)) = (more, properties.as_object_mut()) {
        p.extend(more);
    }
    emit("device", event, Some(properties));
}

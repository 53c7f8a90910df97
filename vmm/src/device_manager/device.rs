//! One device of the VM as the device manager keeps it: its id and spec, its backend (process
//! and socket, for the main loop to watch), and where it is plugged in.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::placement::Bar;
use crate::kinds::{Arg, Backend, DeviceSpec};
use crate::layout::VirtioMmioSlot;
use crate::supervisor::{self, SpawnedProcess};
use crate::vhost_user::connection::BackendListener;
use crate::vhost_user::control::{ControlHandle, Failures};
use crate::virtio::driver_log::DriverLog;
use crate::virtio::VirtioTransport;

/// Where a device is plugged in.
pub enum Place {
    Pci { slot: u8, bar: Bar },
    Mmio(VirtioMmioSlot),
}

pub struct Plugged {
    pub transport: Arc<dyn VirtioTransport>,
    pub place: Place,
    /// Its control thread's reports, watched by the main loop.
    pub failures: Arc<Failures>,
    /// Its control thread, to hand it a new backend.
    pub control: Option<ControlHandle>,
}

/// A backend being sought again after the last one was lost.
pub struct Recovery {
    /// When it was lost.
    pub since: Instant,
    /// Connection attempts so far.
    pub attempts: u32,
    /// When the next attempt is due; None while one is under way.
    pub next: Option<Instant>,
    /// In server mode (`vhost_mode=server`), where the new backend connects, for as long as
    /// it is sought.
    pub listener: Option<Arc<BackendListener>>,
}

impl Recovery {
    /// The wait before attempt `n` (from 0): none for the first, then 100 ms, doubling to at
    /// most 2 s, so that a backend restarted by its operator (or by us) is found soon and one
    /// that stays away costs little.
    pub fn backoff(n: u32) -> Duration {
        match n {
            0 => Duration::ZERO,
            n => Duration::from_millis(100u64 << (n - 1).min(5)).min(Duration::from_secs(2)),
        }
    }
}

/// A backend lost again within this long of coming back counts as the same crash loop (one
/// that dies as it takes up what the last left, say).
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(1);
/// Quick losses in a row taken back at once, before the waits start.
const CRASH_LOOP_ALLOWANCE: u32 = 3;

pub struct Device {
    /// Never reused while the VM runs, unlike ids: what the main loop's watches name.
    pub serial: u64,
    pub id: String,
    pub spec: DeviceSpec,
    /// Where its backend listens (for `socket=`, the user's path).
    pub socket_path: PathBuf,
    pub process: Option<SpawnedProcess>,
    /// The managed backend's arguments, as first started (to start it again the same way).
    pub spawn_args: Vec<OsString>,
    /// Our own descriptor of the connection's socket, watched for a hang-up.
    pub socket: Option<OwnedFd>,
    pub process_watched: bool,
    pub plugged: Option<Plugged>,
    pub failed: bool,
    /// Set while a new backend is sought.
    pub recovery: Option<Recovery>,
    /// Backends lost, and found again, since the device was plugged.
    pub losses: u64,
    pub recoveries: u64,
    /// When the backend last came back, and how many times in a row it was lost soon after:
    /// a backend that dies as soon as it is up waits longer each time (never a busy loop).
    pub last_recovered: Option<Instant>,
    pub crash_streak: u32,
    /// Failures after the first: a guest resetting and restarting a broken device in a loop
    /// causes one each time, so only the first few are shown.
    pub later_failures: DriverLog,
}

impl Device {
    /// "_disk0 (vhost-user-blk, pid 123)" or "share (virtio-fs backend, socket /run/x.sock)".
    pub fn label(&self) -> String {
        let backend = self.spec.kind.backend_name();
        match &self.process {
            Some(p) => format!("{} ({backend}, pid {})", self.id, p.pid()),
            None => format!(
                "{} ({backend}, socket {})",
                self.id,
                self.socket_path.display()
            ),
        }
    }

    /// Whether a lost backend is sought again rather than the device failed: an operator's
    /// backend (`socket=`, connected to again, or, in server mode, waited for again) or a
    /// managed one (started again), of a kind whose rings a new backend can take over.
    pub fn recoverable(&self) -> bool {
        matches!(
            self.spec.backend,
            Backend::Socket(_) | Backend::Listen(_) | Backend::Managed(_)
        ) && self.spec.kind.recoverable()
            && self.plugged.as_ref().is_some_and(|p| p.control.is_some())
            && !self.failed
    }

    /// The backend is gone but another may come: the device waits for it (the guest sees
    /// nothing but a pause in its traffic); attempts start shortly.
    /// `crash_limit`: a backend lost within 1 s of coming back that many times in a row is
    /// given up (0: never).
    pub fn lose(&mut self, why: &str, crash_limit: u32) {
        // Its socket's hang-up and its process's exit may both say so: one loss.
        if self.recovery.is_none() {
            self.losses += 1;
            let soon_after = self
                .last_recovered
                .is_some_and(|t| t.elapsed() < CRASH_LOOP_WINDOW);
            self.crash_streak = if soon_after { self.crash_streak + 1 } else { 0 };
            if crash_limit != 0 && self.crash_streak >= crash_limit {
                self.fail(&format!(
                    "{why}; given up: lost {} times in a row within 1 s of coming back \
                     (--backend-restarts {crash_limit})",
                    self.crash_streak + 1
                ));
                return;
            }
            eprintln!(
                "cloister: {}: {why}; waiting for the backend to come back",
                self.label()
            );
            crate::events::device(
                "backend-lost",
                &self.id,
                Some(serde_json::json!({ "reason": why })),
            );
            if self.crash_streak > 0 && self.crash_streak % 5 == 0 {
                eprintln!(
                    "cloister: {}: the backend was lost {} times in a row soon after it came back",
                    self.label(),
                    self.crash_streak + 1
                );
            }
            let wait = self.crash_streak.saturating_sub(CRASH_LOOP_ALLOWANCE);
            self.recovery = Some(Recovery {
                since: Instant::now(),
                attempts: wait,
                next: Some(Instant::now() + Recovery::backoff(wait)),
                listener: None,
            });
        }
        if let Some(c) = self.plugged.as_ref().and_then(|p| p.control.as_ref()) {
            c.lost_for_now();
        }
    }

    /// The backend is gone or the device broke: say so once and tell the device (it is marked
    /// as needing a reset).
    pub fn fail(&mut self, why: &str) {
        if self.failed {
            return;
        }
        self.failed = true;
        self.recovery = None;
        eprintln!("cloister: {}: {why}", self.label());
        self.mark_broken();
    }

    /// Tells the device its backend is gone or broken: it needs a reset (a no-op if it says so
    /// already).
    pub fn mark_broken(&self) {
        if let Some(p) = &self.plugged {
            p.transport.backend_lost();
        }
    }

    /// [`Device::fail`], or, if the device had failed already, just the line: once per
    /// backend socket or process, so never a flood.
    pub fn report(&mut self, what: &str) {
        if self.failed {
            eprintln!("cloister: {}: {what}", self.label());
        } else {
            self.fail(what);
        }
    }

    /// The managed backend's arguments, with its socket path filled in.
    pub fn backend_args(&self) -> Vec<OsString> {
        let Backend::Managed(profile) = &self.spec.backend else {
            return Vec::new();
        };
        profile
            .args
            .iter()
            .map(|a| match a {
                Arg::Plain(s) => OsString::from(s),
                Arg::Socket { before, after } => {
                    let mut s = OsString::from(before);
                    s.push(&self.socket_path);
                    s.push(after);
                    s
                }
            })
            .collect()
    }

    /// Stops a managed backend (SIGTERM, then SIGKILL) and reaps it, saying how it ended if
    /// that is news: killed, or dead of a signal other than ours (an exit status is not: we
    /// have ended its connection, and some backends, virtiofsd among them, exit 1 then).
    pub fn stop_backend(&mut self) {
        let label = self.label();
        let failed = self.failed;
        let Some(p) = self.process.as_mut() else {
            return;
        };
        let (status, killed) = p.stop(supervisor::process::STOP_GRACE);
        if killed {
            eprintln!("cloister: {label}: backend ignored SIGTERM and was killed");
        } else if let Some(s) = status.filter(|_| !failed) {
            if std::os::unix::process::ExitStatusExt::signal(&s)
                .is_some_and(|sig| sig != libc::SIGTERM)
            {
                eprintln!(
                    "cloister: {label}: backend exited with {}",
                    supervisor::describe(s)
                );
            }
        }
    }

    /// Ends the backend connection without closing descriptors the device still owns.
    pub fn disconnect(&self) {
        if let Some(socket) = &self.socket {
            // SAFETY: shutdown(2) on a socket descriptor we own; no memory involved.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_attempt_is_at_once_and_the_waits_stay_bounded() {
        assert_eq!(Recovery::backoff(0), Duration::ZERO);
        assert_eq!(Recovery::backoff(1), Duration::from_millis(100));
        assert_eq!(Recovery::backoff(2), Duration::from_millis(200));
        assert_eq!(Recovery::backoff(6), Duration::from_secs(2));
        assert_eq!(Recovery::backoff(u32::MAX), Duration::from_secs(2));
    }
}

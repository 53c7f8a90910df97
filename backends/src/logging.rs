//! Plain stderr logging: `NAME: level: message`, one line per record, for the daemon's own
//! messages and those of the vhost crates (which use the `log` facade).

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    name: &'static str,
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        // One write per line so lines from different threads don't interleave; a failed write
        // to stderr has nowhere better to be reported.
        let line = format!("{}: {level}: {}\n", self.name, record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Installs the logger; later calls keep the first configuration.
pub fn init(name: &'static str, level: LevelFilter) {
    let logger = LOGGER.get_or_init(|| StderrLogger { name, level });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
    }
}

/// Limits how often one source of messages (typically: one guest queue misbehaving) can log, so
/// a hostile guest cannot fill the host's disk through our stderr.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Returns `Some(n)` if a message may be logged now (`n` messages were suppressed since the
    /// last one), `None` if this one should be dropped.
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_suppressed() {
        let mut limit = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.check(), Some(0));
        assert_eq!(limit.check(), None);
        assert_eq!(limit.check(), None);
        limit.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(limit.check(), Some(2));
    }
}

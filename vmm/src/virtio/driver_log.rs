//! Messages a guest's driver can cause as often as it likes (a device that fails to start, a BAR
//! moved on top of another, an MSI-X route KVM refuses). The first few per device are shown,
//! then one saying the rest are not: a driver retrying in a loop can neither flood the
//! operator's log nor stall its vCPU, which holds the device's lock, on a stderr nobody reads.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

/// Messages shown per device.
const SHOWN: u32 = 10;

#[derive(Debug, PartialEq, Eq)]
enum Admit {
    Show,
    /// The last one shown.
    ShowAndSayMore,
    Drop,
}

pub struct DriverLog {
    name: String,
    said: AtomicU32,
}

impl DriverLog {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            said: AtomicU32::new(0),
        }
    }

    /// Writes to stderr, ignoring a failure (eprintln! would panic on a closed stderr, in the
    /// vCPU thread of the guest that caused the message).
    pub fn say(&self, what: std::fmt::Arguments) {
        let mut stderr = std::io::stderr();
        let _ = match self.admit() {
            Admit::Show => writeln!(stderr, "cloister: {}: {what}", self.name),
            Admit::ShowAndSayMore => writeln!(
                stderr,
                "cloister: {}: {what} (further messages about this device's driver are not shown)",
                self.name
            ),
            Admit::Drop => Ok(()),
        };
    }

    fn admit(&self) -> Admit {
        // Stops counting once past the limit, so the count never wraps round to showing again.
        match self
            .said
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < SHOWN).then_some(n + 1)
            }) {
            Ok(n) if n + 1 == SHOWN => Admit::ShowAndSayMore,
            Ok(_) => Admit::Show,
            Err(_) => Admit::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_the_first_few_then_says_so_once() {
        let log = DriverLog::new("disk0");
        let admitted: Vec<Admit> = (0..SHOWN + 5).map(|_| log.admit()).collect();
        assert!(admitted[..SHOWN as usize - 1]
            .iter()
            .all(|a| *a == Admit::Show));
        assert_eq!(admitted[SHOWN as usize - 1], Admit::ShowAndSayMore);
        assert!(admitted[SHOWN as usize..].iter().all(|a| *a == Admit::Drop));
    }
}

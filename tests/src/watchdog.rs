//! Notices a lab that stopped responding. Inside the lab every scenario is bounded by its own
//! timeout and the runner prints an END marker when it ends, killed or not; so a scenario with no
//! END well past its bound means the lab itself (the emulator or the lab's kernel) froze, not the
//! scenario. Waiting for the sum of all timeouts instead once cost a CI run 50 minutes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::outcome::{marker, BEGIN, END};
use crate::scenario::Scenario;

/// Past a scenario's own timeout: the runner's `timeout` has fired and END is due at once.
const SCENARIO_GRACE: Duration = Duration::from_secs(60);
/// From one scenario's END to the next BEGIN, or to the lab's power-off after the last.
const BETWEEN_SCENARIOS: Duration = Duration::from_secs(120);

/// Where the lab was when it stopped responding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stall {
    Booting,
    During(String),
    After(String),
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stall::Booting => write!(f, "before its first scenario"),
            Stall::During(name) => write!(
                f,
                "during scenario {name} (no end marker {} s past its own timeout)",
                SCENARIO_GRACE.as_secs()
            ),
            Stall::After(name) => write!(
                f,
                "after scenario {name} (nothing for {} s)",
                BETWEEN_SCENARIOS.as_secs()
            ),
        }
    }
}

/// Follows the console line by line and keeps the time by which the next marker is due.
pub struct Progress {
    timeouts: HashMap<String, Duration>,
    state: Mutex<State>,
}

struct State {
    deadline: Instant,
    position: Stall,
}

impl Progress {
    /// `boot`: how long the lab may take to start its first scenario.
    pub fn new(scenarios: &[Scenario], boot: Duration) -> Self {
        Progress {
            timeouts: scenarios
                .iter()
                .map(|s| (s.name.clone(), s.timeout))
                .collect(),
            state: Mutex::new(State {
                deadline: Instant::now() + boot,
                position: Stall::Booting,
            }),
        }
    }

    /// One console line.
    pub fn observe(&self, line: &str) {
        self.observe_at(line, Instant::now());
    }

    fn observe_at(&self, line: &str, now: Instant) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let Some(name) = marker(line, BEGIN) {
            // An unknown name cannot happen (the runner prints ours); give it the default.
            let timeout = self
                .timeouts
                .get(name)
                .copied()
                .unwrap_or(Duration::from_secs(120));
            state.deadline = now + timeout + SCENARIO_GRACE;
            state.position = Stall::During(name.to_string());
        } else if let Some(rest) = marker(line, END) {
            let name = rest.split_once(" rc=").map_or(rest, |(name, _)| name);
            state.deadline = now + BETWEEN_SCENARIOS;
            state.position = Stall::After(name.to_string());
        }
    }

    /// Where the lab stalled, once the next marker is overdue.
    pub fn overdue(&self) -> Option<Stall> {
        self.overdue_at(Instant::now())
    }

    fn overdue_at(&self, now: Instant) -> Option<Stall> {
        let state = self.state.lock().ok()?;
        (now > state.deadline).then(|| state.position.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress() -> (Progress, Instant) {
        let scenarios = [
            Scenario::new("a", "true").timeout(Duration::from_secs(100)),
            Scenario::new("b", "true").timeout(Duration::from_secs(10)),
        ];
        let start = Instant::now();
        (Progress::new(&scenarios, Duration::from_secs(30)), start)
    }

    #[test]
    fn a_silent_boot_is_a_stall_before_any_scenario() {
        let (progress, start) = progress();
        assert_eq!(progress.overdue_at(start + Duration::from_secs(29)), None);
        assert_eq!(
            progress.overdue_at(start + Duration::from_secs(31)),
            Some(Stall::Booting)
        );
    }

    #[test]
    fn each_scenario_gets_its_own_timeout_and_a_grace() {
        let (progress, start) = progress();
        let t = |s| start + Duration::from_secs(s);
        progress.observe_at("noise@@CLOISTER-SCENARIO-BEGIN a@@", t(5));
        assert_eq!(progress.overdue_at(t(5 + 100 + 59)), None);
        assert_eq!(
            progress.overdue_at(t(5 + 100 + 61)),
            Some(Stall::During("a".into()))
        );
        progress.observe_at("@@CLOISTER-SCENARIO-END a rc=0@@", t(50));
        progress.observe_at("@@CLOISTER-SCENARIO-BEGIN b@@", t(51));
        assert_eq!(
            progress.overdue_at(t(51 + 10 + 61)),
            Some(Stall::During("b".into()))
        );
        progress.observe_at("@@CLOISTER-SCENARIO-END b rc=124@@", t(70));
        assert_eq!(progress.overdue_at(t(70 + 119)), None);
        assert_eq!(
            progress.overdue_at(t(70 + 121)),
            Some(Stall::After("b".into()))
        );
    }
}

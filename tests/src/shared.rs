//! One lab boot shared by every test of a test binary: the first test to ask runs all the
//! binary's scenarios, the others wait for it, then each asserts on its own scenario. Tests stay
//! separate in the report while the lab boots once.

use std::sync::OnceLock;

use crate::lab::{self, LabOptions};
use crate::outcome::{LabRun, ScenarioOutcome};
use crate::scenario::Scenario;

pub struct SharedRun {
    name: &'static str,
    scenarios: fn() -> Vec<Scenario>,
    options: fn() -> LabOptions,
    run: OnceLock<Result<LabRun, String>>,
}

impl SharedRun {
    pub const fn new(
        name: &'static str,
        scenarios: fn() -> Vec<Scenario>,
        options: fn() -> LabOptions,
    ) -> Self {
        SharedRun {
            name,
            scenarios,
            options,
            run: OnceLock::new(),
        }
    }

    /// The whole run, performed on first use.
    pub fn run(&self) -> &LabRun {
        match self.try_run() {
            Ok(run) => run,
            Err(e) => panic!("{e}"),
        }
    }

    fn try_run(&self) -> Result<&LabRun, String> {
        let run = self.run.get_or_init(|| {
            lab::run(self.name, &(self.scenarios)(), &(self.options)()).map_err(|e| error_chain(&e))
        });
        run.as_ref()
            .map_err(|e| format!("lab run {} failed: {e}", self.name))
    }

    /// One scenario's outcome; a scenario that never ran fails the test with the lab console.
    pub fn scenario(&self, name: &str) -> &ScenarioOutcome {
        match self.outcome(name) {
            Ok(outcome) => outcome,
            Err(e) => panic!("{e}"),
        }
    }

    fn outcome(&self, name: &str) -> Result<&ScenarioOutcome, String> {
        self.try_run()?.scenario(name)
    }
}

impl SharedRun {
    /// Runs `checks` on scenario `name`'s outcome. Should they fail, the scenario runs once
    /// more, alone, in a fresh lab boot, and `checks` decide again; a second failure fails the
    /// test. The lab is software emulation of nested virtualization, which now and then
    /// misbehaves under load however correct the code inside (the lab's kernel oopsing in a
    /// KVM vCPU thread, a guest triple-faulting — with QEMU as the VMM too); a defect of ours
    /// fails both runs. The first failure stays in the test's output, and a pass on the second
    /// run is reported as a lab flake.
    pub fn check(&self, name: &str, checks: impl Fn(&ScenarioOutcome)) {
        let failure = match self.outcome(name) {
            Ok(first) => {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checks(first))) {
                    Ok(()) => return,
                    Err(cause) => panic_text(cause.as_ref()),
                }
            }
            // The lab died before the scenario ran, or the run failed: the same treatment.
            Err(e) => {
                eprintln!("{e}");
                e
            }
        };
        let first_line = failure.lines().next().unwrap_or_default().to_string();
        eprintln!(
            "LAB RETRY: scenario {name} failed its checks ({first_line}); running it once more, \
             alone, in a fresh lab boot"
        );
        let Some(scenario) = (self.scenarios)().into_iter().find(|s| s.name() == name) else {
            panic!("{failure}");
        };
        let retry_name = format!("{}-retry-{name}", self.name);
        let run = lab::run(&retry_name, &[scenario], &(self.options)()).unwrap_or_else(|e| {
            panic!("{failure}\n(the retry could not run: {})", error_chain(&e))
        });
        let second = run
            .scenario(name)
            .unwrap_or_else(|e| panic!("{failure}\n(retry: {e})"));
        checks(second);
        eprintln!(
            "LAB FLAKE: scenario {name} passed on its second run; the first failed: {first_line}"
        );
    }
}

fn panic_text(cause: &(dyn std::any::Any + Send)) -> String {
    cause
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| cause.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// "outer: inner: innermost", so a failure names its cause.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

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
            lab::run(self.name, &selected((self.scenarios)()), &(self.options)())
                .map_err(|e| error_chain(&e))
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
    /// Runs `checks` on scenario `name`'s outcome. Should they fail, the scenario runs again,
    /// alone, in a fresh lab boot, up to [`LAB_RETRIES`] times, and `checks` decide again; a
    /// failure on every run fails the test. The lab is software emulation of nested
    /// virtualization, which now and then misbehaves under load however correct the code
    /// inside (the lab's kernel oopsing in a KVM vCPU thread or locking up, a guest
    /// triple-faulting — with QEMU as the VMM too); a defect of ours fails every run. Each
    /// failure stays in the test's output, and a pass after one is reported as a lab flake.
    pub fn check(&self, name: &str, checks: impl Fn(&ScenarioOutcome)) {
        let mut failure = match self.outcome(name) {
            Ok(first) => match attempt(first, &checks) {
                Ok(()) => return,
                Err(e) => e,
            },
            // The lab died before the scenario ran, or the run failed: the same treatment.
            Err(e) => {
                eprintln!("{e}");
                e
            }
        };
        let Some(scenario) = (self.scenarios)().into_iter().find(|s| s.name() == name) else {
            panic!("{failure}");
        };
        let mut failures = Vec::new();
        for retry in 1..=LAB_RETRIES {
            let first_line = failure.lines().next().unwrap_or_default().to_string();
            eprintln!(
                "LAB RETRY {retry} of {LAB_RETRIES}: scenario {name} failed its checks \
                 ({first_line}); running it again, alone, in a fresh lab boot"
            );
            failures.push(first_line);
            let retry_name = match retry {
                1 => format!("{}-retry-{name}", self.name),
                n => format!("{}-retry{n}-{name}", self.name),
            };
            let outcome = lab::run(
                &retry_name,
                std::slice::from_ref(&scenario),
                &(self.options)(),
            )
            .map_err(|e| format!("the retry could not run: {}", error_chain(&e)))
            .and_then(|run| {
                let outcome = run.scenario(name)?;
                attempt(outcome, &checks)
            });
            match outcome {
                Ok(()) => {
                    eprintln!(
                        "LAB FLAKE: scenario {name} passed on run {}; the earlier runs failed: {}",
                        retry + 1,
                        failures.join(" | ")
                    );
                    return;
                }
                Err(e) => {
                    eprintln!("{e}");
                    failure = e;
                }
            }
        }
        panic!(
            "scenario {name} failed on all {} runs: {} | {failure}",
            LAB_RETRIES + 1,
            failures.join(" | ")
        );
    }
}

/// How many times a scenario whose checks failed is run again.
pub const LAB_RETRIES: usize = 2;

/// `checks` on `outcome`, their panic as an error.
fn attempt(outcome: &ScenarioOutcome, checks: &impl Fn(&ScenarioOutcome)) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checks(outcome)))
        .map_err(|cause| panic_text(cause.as_ref()))
}

/// `CLOISTER_SCENARIOS=a,b` runs only those scenarios (a developer's shortcut: the tests of
/// the others then fail, saying their scenario never started).
fn selected(all: Vec<Scenario>) -> Vec<Scenario> {
    match std::env::var("CLOISTER_SCENARIOS") {
        Ok(names) if !names.is_empty() => {
            let names: Vec<&str> = names.split(',').collect();
            all.into_iter()
                .filter(|s| names.contains(&s.name()))
                .collect()
        }
        _ => all,
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

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
        let run = self.run.get_or_init(|| {
            lab::run(self.name, &(self.scenarios)(), &(self.options)()).map_err(|e| error_chain(&e))
        });
        match run {
            Ok(run) => run,
            Err(e) => panic!("lab run {} failed: {e}", self.name),
        }
    }

    /// One scenario's outcome; a scenario that never ran fails the test with the lab console.
    pub fn scenario(&self, name: &str) -> &ScenarioOutcome {
        match self.run().scenario(name) {
            Ok(outcome) => outcome,
            Err(e) => panic!("{e}"),
        }
    }
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

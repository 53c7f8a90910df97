//! A scenario: a shell script run inside the lab (or on a hardware-KVM host), with its own files
//! and time limit. Scripts source `lab/scenario-lib.sh` and see `BIN_DIR`, `GUEST_DIR`,
//! `RESULTS_DIR`, `SCENARIO_DIR` and `PAYLOAD_DIR`.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Scenario {
    pub(crate) name: String,
    pub(crate) script: String,
    pub(crate) timeout: Duration,
    pub(crate) files: Vec<(String, Vec<u8>)>,
}

impl Scenario {
    /// `name` must be unique in a run and made of `[A-Za-z0-9_.-]`.
    pub fn new(name: &str, script: &str) -> Self {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
            "scenario name {name:?} must be made of [A-Za-z0-9_.-]"
        );
        Scenario {
            name: name.to_string(),
            script: script.to_string(),
            timeout: Duration::from_secs(120),
            files: Vec::new(),
        }
    }

    /// The scenario is killed after this long; its outcome then has no exit code.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A file the script finds as `$SCENARIO_DIR/<name>`.
    pub fn file(mut self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_string(), contents.into()));
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

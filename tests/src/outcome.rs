//! What a lab run produced: the console split per scenario, each scenario's exit code, its
//! `mark KEY VALUE` results, and the files it left in its results directory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

pub(crate) const BEGIN: &str = "@@CLOISTER-SCENARIO-BEGIN ";
pub(crate) const END: &str = "@@CLOISTER-SCENARIO-END ";
const MARK: &str = "@@CLOISTER-MARK ";

#[derive(Debug, Clone)]
pub struct ScenarioOutcome {
    pub name: String,
    /// `None` when the scenario never finished (lab crash or timeout).
    pub rc: Option<i32>,
    /// The scenario's part of the console, guest consoles included.
    pub console: String,
    pub marks: BTreeMap<String, String>,
    /// Files the scenario left in `$RESULTS_DIR`.
    pub results_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct LabRun {
    /// The whole console of the lab host, for diagnostics.
    pub console: String,
    pub scenarios: Vec<ScenarioOutcome>,
    /// Why the run ended early, if it did (timeout, lab crash).
    pub problem: Option<String>,
}

impl LabRun {
    /// Splits a console into per-scenario outcomes.
    pub fn parse(console: String, results_root: PathBuf, problem: Option<String>) -> Self {
        let mut scenarios: Vec<ScenarioOutcome> = Vec::new();
        let mut current: Option<ScenarioOutcome> = None;
        for line in console.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(rest) = marker(line, BEGIN) {
                if let Some(open) = current.take() {
                    scenarios.push(open);
                }
                current = Some(ScenarioOutcome {
                    name: rest.to_string(),
                    rc: None,
                    console: String::new(),
                    marks: BTreeMap::new(),
                    results_dir: results_root.join(rest),
                });
            } else if let Some(rest) = marker(line, END) {
                if let Some(mut open) = current.take() {
                    open.rc = rest
                        .rsplit_once(" rc=")
                        .and_then(|(_, rc)| rc.trim().parse().ok());
                    scenarios.push(open);
                }
            } else if let Some(open) = current.as_mut() {
                if let Some((key, value)) = marker(line, MARK).and_then(|m| m.split_once('=')) {
                    open.marks.insert(key.to_string(), value.to_string());
                }
                open.console.push_str(line);
                open.console.push('\n');
            }
        }
        if let Some(open) = current.take() {
            scenarios.push(open);
        }
        LabRun {
            console,
            scenarios,
            problem,
        }
    }

    pub fn scenario(&self, name: &str) -> Result<&ScenarioOutcome, String> {
        self.scenarios
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                format!(
                    "scenario {name} never started{}\n--- lab console ---\n{}",
                    self.problem
                        .as_deref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default(),
                    self.console
                )
            })
    }
}

/// The text after `prefix` on a marker line, without the closing `@@`. Markers may follow other
/// output on the same line (a guest console that did not end its line).
pub(crate) fn marker<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let start = line.find(prefix)? + prefix.len();
    line[start..].strip_suffix("@@")
}

impl ScenarioOutcome {
    pub fn mark(&self, key: &str) -> Option<&str> {
        self.marks.get(key).map(String::as_str)
    }

    /// A mark parsed as a number, or a failure that shows the console.
    pub fn mark_u64(&self, key: &str) -> u64 {
        match self.mark(key).map(str::parse::<u64>) {
            Some(Ok(value)) => value,
            other => self.fail(&format!("mark {key} is {other:?}, not a number")),
        }
    }

    /// Panics with the message and this scenario's console, so a CI log explains itself.
    pub fn fail(&self, message: &str) -> ! {
        let mut text = String::new();
        let _ = writeln!(text, "scenario {}: {message}", self.name);
        let _ = writeln!(text, "--- console of scenario {} ---", self.name);
        text.push_str(&self.console);
        panic!("{text}");
    }

    pub fn expect_rc(&self, expected: i32) -> &Self {
        if self.rc != Some(expected) {
            self.fail(&format!("exit code {:?}, expected {expected}", self.rc));
        }
        self
    }

    pub fn expect_mark(&self, key: &str, expected: &str) -> &Self {
        if self.mark(key) != Some(expected) {
            self.fail(&format!(
                "mark {key} is {:?}, expected {expected:?}",
                self.mark(key)
            ));
        }
        self
    }

    pub fn expect_console(&self, needle: &str) -> &Self {
        if !self.console.contains(needle) {
            self.fail(&format!("console does not contain {needle:?}"));
        }
        self
    }

    pub fn expect_no_console(&self, needle: &str) -> &Self {
        if self.console.contains(needle) {
            self.fail(&format!("console contains {needle:?}"));
        }
        self
    }

    /// A `key=value` field of the first console line that contains `tag` and the field, e.g.
    /// the guest's `CLOISTER-INFO cpus=2 ...` line (a test may say `TAG a=1`, then `TAG b=2`).
    pub fn field(&self, tag: &str, key: &str) -> Option<&str> {
        self.console
            .lines()
            .filter(|l| l.contains(tag))
            .find_map(|line| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_console_into_scenarios() {
        let console = "\
boot noise
@@CLOISTER-SCENARIO-BEGIN a@@
hello
guest text without newline@@CLOISTER-MARK x.rc=0@@
@@CLOISTER-SCENARIO-END a rc=3@@
@@CLOISTER-SCENARIO-BEGIN b@@
CLOISTER-INFO cpus=2 online=0-1
"
        .to_string();
        let run = LabRun::parse(console, PathBuf::from("/r"), Some("timeout".into()));
        let a = run.scenario("a").unwrap();
        assert_eq!(a.rc, Some(3));
        assert_eq!(a.mark("x.rc"), Some("0"));
        assert!(a.console.contains("hello"));
        assert_eq!(a.results_dir, PathBuf::from("/r/a"));
        let b = run.scenario("b").unwrap();
        assert_eq!(b.rc, None);
        assert_eq!(b.field("CLOISTER-INFO", "cpus"), Some("2"));
        assert_eq!(b.field("CLOISTER-INFO", "online"), Some("0-1"));
        let missing = run.scenario("c").unwrap_err();
        assert!(missing.contains("never started (timeout)"));
        assert!(missing.contains("boot noise"));
    }
}

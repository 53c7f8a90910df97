//! The vocabulary of the policies: a rule allows one system call (perhaps only with some
//! argument values) or makes it fail with an errno, and always says why.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// A check on one argument of a system call.
#[derive(Clone, Debug)]
pub struct Arg {
    index: u8,
    op: SeccompCmpOp,
    value: u64,
}

impl Arg {
    fn condition(&self) -> Result<SeccompCondition, seccompiler::BackendError> {
        // Every argument we check is an int or unsigned int in the kernel's prototype (ioctl
        // requests, fcntl commands, flags, signal numbers, socket families): compare the low
        // 32 bits only, as the kernel does.
        SeccompCondition::new(
            self.index,
            SeccompCmpArgLen::Dword,
            self.op.clone(),
            self.value,
        )
    }
}

/// Argument `index` equals `value`.
pub fn eq(index: u8, value: u64) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::Eq,
        value,
    }
}

/// Argument `index` has every bit of `mask` set.
pub fn has_bits(index: u8, mask: u64) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::MaskedEq(mask),
        value: mask,
    }
}

/// Argument `index` has no bit of `mask` set.
pub fn lacks_bits(index: u8, mask: u64) -> Arg {
    Arg {
        index,
        op: SeccompCmpOp::MaskedEq(mask),
        value: 0,
    }
}

/// How a refused system call fails, and in which modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A compatibility answer that makes libc fall back to a call the filter can check
    /// (`clone3` → ENOSYS, so glibc uses `clone`, whose flags are in a register). Kept in
    /// every mode: it is part of how the process works.
    Fallback,
    /// A policy decision (`openat` → EACCES in a backend). In `log` mode it is reported and
    /// allowed like any other call outside the policy.
    Policy,
}

/// One rule of a policy.
#[derive(Clone, Debug)]
pub enum Rule {
    /// Allowed if any of `when` holds (each a conjunction of argument checks); always, if
    /// `when` is empty.
    Allow {
        nr: i64,
        when: Vec<Vec<Arg>>,
        why: &'static str,
    },
    /// Fails with `errno`.
    Refuse {
        nr: i64,
        errno: u32,
        kind: Refusal,
        why: &'static str,
    },
}

impl Rule {
    pub fn nr(&self) -> i64 {
        match self {
            Rule::Allow { nr, .. } | Rule::Refuse { nr, .. } => *nr,
        }
    }

    pub fn why(&self) -> &'static str {
        match self {
            Rule::Allow { why, .. } | Rule::Refuse { why, .. } => why,
        }
    }
}

/// `nr`, with any arguments.
pub fn allow(nr: i64, why: &'static str) -> Rule {
    Rule::Allow {
        nr,
        when: Vec::new(),
        why,
    }
}

/// `nr` when all of `args` hold.
pub fn allow_if(nr: i64, args: Vec<Arg>, why: &'static str) -> Rule {
    Rule::Allow {
        nr,
        when: vec![args],
        why,
    }
}

/// `nr` when argument `index` is one of `values`.
pub fn allow_values(nr: i64, index: u8, values: &[u64], why: &'static str) -> Rule {
    Rule::Allow {
        nr,
        when: values.iter().map(|&v| vec![eq(index, v)]).collect(),
        why,
    }
}

/// `nr` fails with `errno`.
pub fn refuse(nr: i64, errno: i32, kind: Refusal, why: &'static str) -> Rule {
    Rule::Refuse {
        nr,
        errno: errno as u32,
        kind,
        why,
    }
}

/// Allowed system calls merged from several rules: one entry per number, unconditional if any
/// rule is, else the union of the rules' alternatives.
#[derive(Default)]
pub struct Merged {
    allowed: BTreeMap<i64, Option<Vec<Vec<Arg>>>>,
    refused: BTreeMap<u32, Vec<i64>>,
}

impl Merged {
    pub fn new(rules: &[Rule], log_mode: bool) -> Self {
        let mut merged = Merged::default();
        for rule in rules {
            match rule {
                Rule::Allow { nr, when, .. } => {
                    let entry = merged
                        .allowed
                        .entry(*nr)
                        .or_insert_with(|| Some(Vec::new()));
                    match (entry.as_mut(), when.is_empty()) {
                        (_, true) => *entry = None,
                        (Some(alternatives), false) => alternatives.extend(when.iter().cloned()),
                        (None, false) => {}
                    }
                }
                Rule::Refuse {
                    nr, errno, kind, ..
                } => {
                    if log_mode && *kind == Refusal::Policy {
                        // Reported and let through by the SIGSYS handler like any other call
                        // outside the policy.
                        continue;
                    }
                    merged.refused.entry(*errno).or_default().push(*nr);
                    // The allow-list must let it through, or its "not allowed" (a trap) would
                    // win over the errno when the kernel combines the two filters.
                    merged.allowed.insert(*nr, None);
                }
            }
        }
        merged
    }

    /// The number of distinct system calls allowed (refused ones not counted).
    pub fn allowed_count(&self) -> usize {
        let refused: Vec<i64> = self.refused.values().flatten().copied().collect();
        self.allowed
            .keys()
            .filter(|nr| !refused.contains(nr))
            .count()
    }

    /// Whether `nr` is allowed (with some arguments at least), rather than refused or absent.
    #[cfg(test)]
    pub fn allows(&self, nr: i64) -> bool {
        self.allowed.contains_key(&nr) && !self.refused.values().flatten().any(|&r| r == nr)
    }

    /// The allow-list in seccompiler's form.
    pub fn allow_rules(
        &self,
    ) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
        let mut map = BTreeMap::new();
        for (&nr, when) in &self.allowed {
            let rules = match when {
                None => Vec::new(),
                Some(alternatives) => alternatives
                    .iter()
                    .map(|args| {
                        let conditions = args
                            .iter()
                            .map(Arg::condition)
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conditions)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            map.insert(nr, rules);
        }
        Ok(map)
    }

    /// The refused system calls, grouped by errno.
    pub fn refusals(&self) -> impl Iterator<Item = (u32, &[i64])> {
        self.refused
            .iter()
            .map(|(&errno, nrs)| (errno, nrs.as_slice()))
    }
}

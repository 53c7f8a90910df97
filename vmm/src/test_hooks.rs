//! A test-only way to exercise hot-plug before the control plane exposes it. Compiled only
//! into debug builds (`cfg(debug_assertions)`); in a release build [`start`] does nothing and
//! the variable is never read. Not reachable from a guest or the command line.
//!
//! `CLOISTER_TEST_HOTPLUG="OPTION VALUE*N"` (for example `--disk path=/x.img*100`): once the VM
//! runs, a thread of its own adds that device through the hot-plug thread and removes it
//! again, N times, then says on stderr what the VM held before and after:
//! `cloister: test hook: hotplug: N rounds: devices A -> B, pci A -> B, gsis A -> B, backends
//! A -> B, fds A -> B, sockets A -> B, backend processes A -> B`. The thread is not sandboxed
//! (it counts descriptors in /proc); the hot-plug thread doing the work is.

/// The environment variable.
pub const VARIABLE: &str = "CLOISTER_TEST_HOTPLUG";

#[cfg(debug_assertions)]
mod imp {
    use std::sync::{Arc, Mutex};

    use cloister_seccomp::SeccompMode;

    use crate::device_manager::hotplug::Hotplug;
    use crate::device_manager::{DeviceManager, Resources};
    use crate::kinds::{self, DeviceSpec};

    fn parse(value: &str, seccomp: SeccompMode) -> Result<(DeviceSpec, usize), String> {
        let (spec, rounds) = value.rsplit_once('*').ok_or("no *N")?;
        let rounds = rounds.parse().map_err(|_| "N is not a number")?;
        let (option, value) = spec.split_once(' ').ok_or("no OPTION VALUE")?;
        let parse = match option {
            kinds::blk::OPTION => kinds::blk::parse,
            kinds::fs::OPTION => kinds::fs::parse,
            kinds::net::OPTION => kinds::net::parse,
            kinds::rng::OPTION => kinds::rng::parse,
            kinds::vsock::OPTION => kinds::vsock::parse,
            kinds::generic::OPTION => kinds::generic::parse,
            _ => return Err(format!("unknown option {option}")),
        };
        let spec = parse(value, seccomp).map_err(|e| crate::error_chain(&e))?;
        Ok((spec, rounds))
    }

    fn count_entries(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |d| d.count())
    }

    struct Snapshot {
        r: Resources,
        fds: usize,
        sockets: usize,
        processes: usize,
    }

    fn snapshot(m: &Mutex<DeviceManager>) -> Snapshot {
        let (r, dir, spawner) = {
            let m = m.lock().unwrap_or_else(|e| e.into_inner());
            (m.resources(), m.runtime_dir(), m.spawner_pid())
        };
        let children = spawner
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).ok())
            .unwrap_or_default();
        Snapshot {
            r,
            fds: count_entries(std::path::Path::new("/proc/self/fd")),
            sockets: dir.as_deref().map_or(0, count_entries),
            processes: children.split_whitespace().count(),
        }
    }

    pub fn start(hotplug: Hotplug, manager: Arc<Mutex<DeviceManager>>, seccomp: SeccompMode) {
        let Ok(value) = std::env::var(super::VARIABLE) else {
            return;
        };
        let (spec, rounds) = match parse(&value, seccomp) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("cloister: test hook: {}={value}: {e}", super::VARIABLE);
                return;
            }
        };
        let _ = crate::signals::spawn_helper(
            std::thread::Builder::new().name("test-hotplug".into()),
            move || {
                // The guest is running by now; one round first, so what is made once (the
                // runtime directory) is in the baseline.
                let round = |n: usize| -> Result<(), String> {
                    let info = hotplug
                        .add(spec.clone())
                        .map_err(|e| format!("round {n}: add: {}", crate::error_chain(&e)))?;
                    if n <= 1 {
                        eprintln!(
                            "cloister: test hook: hotplug: added {} at {}",
                            info.id, info.address
                        );
                    }
                    hotplug
                        .remove(&info.id)
                        .map_err(|e| format!("round {n}: remove: {}", crate::error_chain(&e)))
                };
                if let Err(e) = round(0) {
                    eprintln!("cloister: test hook: hotplug: {e}");
                    return;
                }
                let before = snapshot(&manager);
                for n in 1..=rounds {
                    if let Err(e) = round(n) {
                        eprintln!("cloister: test hook: hotplug: {e}");
                        return;
                    }
                }
                let after = snapshot(&manager);
                eprintln!(
                    "cloister: test hook: hotplug: {rounds} rounds: devices {} -> {}, pci {} -> {}, \
                     gsis {} -> {}, backends {} -> {}, fds {} -> {}, sockets {} -> {}, \
                     backend processes {} -> {}",
                    before.r.devices,
                    after.r.devices,
                    before.r.pci_devices,
                    after.r.pci_devices,
                    before.r.gsis,
                    after.r.gsis,
                    before.r.backends,
                    after.r.backends,
                    before.fds,
                    after.fds,
                    before.sockets,
                    after.sockets,
                    before.processes,
                    after.processes,
                );
            },
        );
    }
}

#[cfg(not(debug_assertions))]
mod imp {
    pub fn start(
        _hotplug: crate::device_manager::hotplug::Hotplug,
        _manager: std::sync::Arc<std::sync::Mutex<crate::device_manager::DeviceManager>>,
        _seccomp: cloister_seccomp::SeccompMode,
    ) {
    }
}

pub use imp::start;

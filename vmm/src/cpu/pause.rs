//! Parking the vCPUs: the main thread asks, kicks each vCPU out of `KVM_RUN`, and waits until
//! all of them sit here; a vCPU parked here runs no guest code until released (or the VM
//! stops).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    requested: bool,
    /// The VM is stopping: nobody parks any more, and the parked go.
    stopping: bool,
    parked: usize,
}

#[derive(Default)]
pub struct PauseGate {
    state: Mutex<State>,
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPUs that look at the gate from now on park (the caller kicks them out of KVM_RUN).
    pub fn request(&self) {
        self.lock().requested = true;
    }

    /// Lets the parked vCPUs go.
    pub fn release(&self) {
        self.lock().requested = false;
        self.changed.notify_all();
    }

    /// For good: the VM is stopping.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stopping = true;
        s.requested = false;
        self.changed.notify_all();
    }

    /// Whether a vCPU should park now (checked between KVM_RUNs).
    pub fn requested(&self) -> bool {
        self.lock().requested
    }

    /// A vCPU waits here while a pause is requested.
    pub fn park(&self) {
        let mut s = self.lock();
        s.parked += 1;
        self.changed.notify_all();
        while s.requested && !s.stopping {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
    }

    /// Waits up to `timeout` for `count` vCPUs to be parked.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.parked < count {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn vcpus_park_until_released() {
        let gate = Arc::new(PauseGate::default());
        let turns = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (gate, turns, stop) = (gate.clone(), turns.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        if gate.requested() {
                            gate.park();
                        }
                        turns.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        gate.request();
        assert!(gate.wait_parked(2, Duration::from_secs(5)));
        let before = turns.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(turns.load(Ordering::SeqCst), before, "a parked vCPU ran");
        gate.release();
        std::thread::sleep(Duration::from_millis(50));
        assert!(turns.load(Ordering::SeqCst) > before);
        gate.request();
        assert!(gate.wait_parked(2, Duration::from_secs(5)));
        stop.store(true, Ordering::SeqCst);
        gate.stop();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!gate.wait_parked(1, Duration::from_millis(10)));
    }
}

//! One virtqueue's worker: pops chains, parses them, hands requests to the engine, and returns
//! finished ones to the used ring with one notification per batch.

use std::sync::Arc;
use std::time::Duration;

use cloister_backends::logging::RateLimit;
use cloister_backends::server::GuestMemory;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::GuestMemoryAtomic;

use crate::engine::{Completion, Engine};
use crate::request::{parse, write_status, Limits, Parsed, Scratch};

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;
type State = VringState<GuestMemoryAtomic<GuestMemory>>;

pub struct QueueWorker {
    index: usize,
    engine: Engine,
    limits: Arc<Limits>,
    scratch: Scratch,
    done: Vec<Completion>,
    /// The engine ran out of slots; popping resumes when completions free some.
    throttled: bool,
    /// This connection's vring, kept so `stop` can complete in-flight requests into it.
    vring: Option<Vring>,
    guest_errors: RateLimit,
}

impl QueueWorker {
    pub fn new(index: usize, engine: Engine, limits: Arc<Limits>) -> Self {
        Self {
            index,
            engine,
            limits,
            scratch: Scratch::default(),
            done: Vec::new(),
            throttled: false,
            vring: None,
            guest_errors: RateLimit::new(Duration::from_secs(1)),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The guest added requests (or nothing: a spurious wake-up costs one look at the ring).
    pub fn kick(&mut self, vring: &Vring, mem: &Arc<GuestMemory>) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        loop {
            let mut state = vring.get_mut();
            // Without EVENT_IDX this sets VRING_USED_F_NO_NOTIFY while we work through the
            // ring; with it, notifications stay off until `enable_notification` moves
            // avail_event.
            if let Err(e) = state.disable_notification() {
                self.guest_error(format_args!("cannot disable notifications: {e}"));
            }
            self.pop_all(&mut state, mem);
            self.engine.commit(&mut self.done);
            self.return_used(&mut state);
            if self.throttled {
                // The next completion resumes popping; no kick needed meanwhile.
                return;
            }
            match state.enable_notification() {
                // Requests arrived while notifications were off: go round again.
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    self.guest_error(format_args!("cannot enable notifications: {e}"));
                    return;
                }
            }
        }
    }

    /// The engine's completion event fired.
    pub fn completions(&mut self, vring: &Vring, mem: Option<&Arc<GuestMemory>>) {
        self.engine.reap(&mut self.done);
        if !self.done.is_empty() {
            let mut state = vring.get_mut();
            self.return_used(&mut state);
        }
        if self.throttled && self.engine.has_room() {
            self.throttled = false;
            if let Some(mem) = mem {
                self.kick(vring, mem);
            }
        }
    }

    /// GET_VRING_BASE: finish everything in flight into the used ring before the frontend
    /// reads the ring's position.
    pub fn stop(&mut self) {
        self.engine.drain(true, &mut self.done);
        match self.vring.take() {
            Some(vring) => {
                let mut state = vring.get_mut();
                self.return_used(&mut state);
            }
            None => self.done.clear(),
        }
        self.throttled = false;
    }

    /// Device reset or disconnect: wait for in-flight I/O, but don't touch the guest's memory
    /// any more (its buffers may already belong to something else).
    pub fn reset(&mut self) {
        self.engine.drain(false, &mut self.done);
        self.done.clear();
        self.throttled = false;
        self.vring = None;
    }

    fn pop_all(&mut self, state: &mut State, mem: &Arc<GuestMemory>) {
        let mut chains = match state.get_queue_mut().iter(&**mem) {
            Ok(chains) => chains,
            // Kicked before the ring is set up, or after it was stopped.
            Err(virtio_queue::Error::QueueNotReady) => return,
            Err(e) => {
                self.guest_error(format_args!("bad available ring: {e}"));
                return;
            }
        };
        loop {
            if !self.engine.has_room() {
                self.throttled = true;
                return;
            }
            let Some(chain) = chains.next() else {
                return;
            };
            let head = chain.head_index();
            match parse(head, chain, mem, &self.limits, &mut self.scratch) {
                Parsed::Io(request) => self.engine.submit(request, mem, &mut self.done),
                Parsed::Done {
                    head,
                    status_addr,
                    status,
                    used_len,
                    why,
                } => {
                    if let Some(why) = why {
                        log_guest_error(
                            &mut self.guest_errors,
                            self.index,
                            format_args!("request {head}: {why} (status {status})"),
                        );
                    }
                    write_status(mem, status_addr, status);
                    self.done.push(Completion { head, used_len });
                }
                Parsed::Drop { head, why } => {
                    log_guest_error(
                        &mut self.guest_errors,
                        self.index,
                        format_args!("request {head} dropped: {why}"),
                    );
                    self.done.push(Completion { head, used_len: 0 });
                }
            }
        }
    }

    /// Puts finished requests in the used ring and notifies the guest once, if it wants to be.
    fn return_used(&mut self, state: &mut State) {
        if self.done.is_empty() {
            return;
        }
        for completion in self.done.drain(..) {
            if let Err(e) = state.add_used(completion.head, completion.used_len) {
                log_guest_error(
                    &mut self.guest_errors,
                    self.index,
                    format_args!("cannot return request {}: {e}", completion.head),
                );
            }
        }
        // With EVENT_IDX this checks used_event against everything added since the last
        // check, so a batch costs at most one interrupt.
        let notify = state.needs_notification().unwrap_or(true);
        if notify {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("queue {}: cannot signal the guest: {e}", self.index);
            }
        }
    }

    fn guest_error(&mut self, message: std::fmt::Arguments<'_>) {
        log_guest_error(&mut self.guest_errors, self.index, message);
    }
}

fn log_guest_error(limit: &mut RateLimit, queue: usize, message: std::fmt::Arguments<'_>) {
    if let Some(suppressed) = limit.check() {
        if suppressed > 0 {
            log::warn!("queue {queue}: {message} ({suppressed} similar messages suppressed)");
        } else {
            log::warn!("queue {queue}: {message}");
        }
    }
}

//! A device's control thread: it owns the vhost-user connection and makes the requests that
//! start and stop the backend's queues, so that no vCPU thread waits on a backend while it
//! holds a transport's lock. Starting is asynchronous (the driver's DRIVER_OK write returns at
//! once; a kick that comes before the backend has its rings stays pending in the kick
//! eventfd); stopping waits, because the driver may reuse the rings' memory as soon as the
//! reset is done. Commands run in the order given, so a reset after a start waits for it.
//!
//! A failure ends the connection and is reported through [`Failures`]: the device manager's
//! main loop then marks the device as needing a reset, from a thread that holds no device lock.
//!
//! The thread keeps what the running rings were started with, so that a new connection (a
//! backend restarted after it died) can be handed over and the device started on it again
//! where the last backend left off ([`Control::reconnect`]).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cloister_seccomp::ThreadRole;
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Connection, Inflight, VringSetup};
use crate::memory::GuestMemoryMmap;

/// One ring to start: this process's addresses of its parts, and its eventfds.
pub struct Ring {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
}

enum Command {
    Start {
        features: u64,
        rings: Vec<Ring>,
    },
    Stop {
        done: SyncSender<()>,
    },
    /// The backend is gone: drop the connection. `coming_back`: a new one is being sought, so
    /// a start meanwhile waits for it rather than fails.
    Lost {
        coming_back: bool,
    },
    /// The device is going: the thread ends (handles may still hold senders).
    Quit,
    /// A new backend: replay the running device on it.
    Reconnect {
        conn: Box<Connection>,
        done: SyncSender<Result<(), String>>,
    },
    /// The VM pauses: stop the started rings (the backend finishes what it took) and keep
    /// where each stopped.
    Pause {
        done: SyncSender<()>,
    },
    /// The VM resumes: start the rings again where they stopped.
    Resume {
        done: SyncSender<()>,
    },
}

/// Where a control thread reports what went wrong: the message is kept and the eventfd
/// signalled, for the main loop to pick up.
pub struct Failures {
    pub event: EventFd,
    messages: Mutex<Vec<String>>,
}

impl Failures {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Failures {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            messages: Mutex::new(Vec::new()),
        }))
    }

    fn report(&self, message: String) {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message);
        let _ = self.event.write(1);
    }

    /// What was reported since the last call.
    pub fn take(&self) -> Vec<String> {
        let _ = self.event.read();
        std::mem::take(&mut *self.messages.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

pub struct Control {
    commands: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    /// The connection's socket, to end a request in progress when the device goes.
    socket: OwnedFd,
    name: String,
}

impl Control {
    /// Starts `name`'s control thread with the connection. `in_order`: its backend returns
    /// requests in the order it takes them (see [`DeviceKind::completes_in_order`]).
    ///
    /// [`DeviceKind::completes_in_order`]: super::kind::DeviceKind::completes_in_order
    pub fn start(
        name: &str,
        conn: Connection,
        memory: GuestMemoryMmap,
        failures: Arc<Failures>,
        in_order: bool,
    ) -> std::io::Result<Self> {
        let socket = conn.socket_dup()?;
        let (tx, rx) = mpsc::channel();
        let owner = Owner {
            name: name.to_string(),
            conn: Some(conn),
            memory,
            started: Vec::new(),
            active: None,
            inflight: None,
            in_order,
            awaiting: false,
            paused: None,
            failures,
        };
        let thread = crate::signals::spawn_helper(
            std::thread::Builder::new().name(format!("{name}-ctl")),
            move || {
                if let Err(e) = cloister_seccomp::enter_thread(ThreadRole::VmmDeviceControl) {
                    owner.failures.report(format!(
                        "its control thread cannot enter its sandbox: {}",
                        crate::error_chain(&e)
                    ));
                    return;
                }
                owner.serve(rx)
            },
        )?;
        Ok(Control {
            commands: Some(tx),
            thread: Some(thread),
            socket,
            name: name.to_string(),
        })
    }

    /// Queues a start; returns at once.
    pub fn start_rings(&self, features: u64, rings: Vec<Ring>) {
        self.send(Command::Start { features, rings });
    }

    /// Stops every started ring, after whatever was queued before; returns when done (each
    /// operation has its deadline, so this cannot wait for ever).
    pub fn stop_rings(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.send(Command::Stop { done }) {
            let _ = wait.recv();
        }
    }

    pub fn lost(&self) {
        self.send(Command::Lost { coming_back: false });
    }

    /// What the device manager keeps to hand the device a new backend later.
    pub fn handle(&self) -> Option<ControlHandle> {
        self.commands.as_ref().map(|tx| ControlHandle {
            commands: tx.clone(),
        })
    }

    /// See [`ControlHandle::reconnect`].
    pub fn reconnect(&self, conn: Connection) -> Result<(), String> {
        match self.handle() {
            Some(h) => h.reconnect(conn),
            None => Err("the device's control thread is gone".into()),
        }
    }

    fn send(&self, c: Command) -> bool {
        self.commands.as_ref().is_some_and(|tx| tx.send(c).is_ok())
    }
}

/// Reaches a device's control thread from outside its transport: the device manager hands
/// the device a new backend through it without taking the transport's lock.
#[derive(Clone)]
pub struct ControlHandle {
    commands: Sender<Command>,
}

impl ControlHandle {
    /// Stops the running rings for a VM pause, so that the backend touches no guest memory
    /// until [`ControlHandle::resume`]; waits (each request has its deadline).
    pub fn pause(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.commands.send(Command::Pause { done }).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Starts the rings a pause stopped, where they stopped; waits for the requests.
    pub fn resume(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.commands.send(Command::Resume { done }).is_ok() {
            let _ = wait.recv();
        }
    }

    /// The backend is gone and a new one is being sought: the connection is dropped, and the
    /// driver's starts and stops meanwhile are kept for the new backend, not failed.
    pub fn lost_for_now(&self) {
        let _ = self.commands.send(Command::Lost { coming_back: true });
    }

    /// Hands the device a new connection (the last one is gone) and, if the driver had started
    /// it, starts it there as it was: the acknowledged features, the memory table, and each
    /// ring from where the used ring says the last backend got to. Waits for the replay.
    pub fn reconnect(&self, conn: Connection) -> Result<(), String> {
        let (done, wait) = mpsc::sync_channel(1);
        let sent = self.commands.send(Command::Reconnect {
            conn: Box::new(conn),
            done,
        });
        if sent.is_err() {
            return Err("the device's control thread is gone".into());
        }
        wait.recv()
            .unwrap_or_else(|_| Err("the device's control thread is gone".into()))
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // Ends a request in progress, then the thread (its queue closes).
        // SAFETY: shutdown(2) on a socket descriptor we own; no memory involved.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        // Closing our sender is not enough: the device manager's handles hold others.
        self.send(Command::Quit);
        self.commands = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                let _ = writeln!(
                    std::io::stderr(),
                    "cloister: {}: its control thread panicked",
                    self.name
                );
            }
        }
    }
}

/// What the control thread owns.
struct Owner {
    name: String,
    /// `None` once the backend is gone, or out of step after a failed request.
    conn: Option<Connection>,
    memory: GuestMemoryMmap,
    /// Queues the backend is serving.
    started: Vec<usize>,
    /// What the driver started the device with, until it resets it: replayed on a new
    /// connection.
    active: Option<Active>,
    /// Where the backend records what it has in flight, while the driver runs the device:
    /// handed to the next backend if this one dies.
    inflight: Option<Inflight>,
    in_order: bool,
    /// The backend is gone and a new one is being sought.
    awaiting: bool,
    /// The VM is paused: where each ring stopped (empty if none was running, or if the
    /// backend changed meanwhile: then the rings resume from the used ring).
    paused: Option<Vec<(usize, u16)>>,
    failures: Arc<Failures>,
}

struct Active {
    features: u64,
    rings: Vec<Ring>,
}

impl Owner {
    fn serve(mut self, commands: Receiver<Command>) {
        while let Ok(c) = commands.recv() {
            match c {
                Command::Start { features, rings } => {
                    // Without a backend, while a new one is sought, the start waits for it.
                    let started = match self.awaiting {
                        true if self.conn.is_none() => Ok(()),
                        _ => self.start(features, &rings, Base::Zero),
                    };
                    if let Err(e) = started {
                        self.fail(e);
                    }
                    // Kept even when the start failed: a new backend gets it.
                    self.active = Some(Active { features, rings });
                }
                Command::Stop { done } => {
                    self.active = None;
                    self.stop();
                    // Nothing is in flight after a reset; the next start asks for a new one.
                    self.inflight = None;
                    let _ = done.send(());
                }
                Command::Lost { coming_back } => {
                    self.awaiting = coming_back;
                    self.drop_connection();
                }
                Command::Reconnect { conn, done } => {
                    let _ = done.send(self.reconnect(*conn));
                }
                Command::Pause { done } => {
                    self.pause();
                    let _ = done.send(());
                }
                Command::Resume { done } => {
                    self.resume();
                    let _ = done.send(());
                }
                Command::Quit => break,
            }
        }
    }

    fn drop_connection(&mut self) {
        self.conn = None;
        self.started.clear();
    }

    fn fail(&mut self, what: String) {
        self.drop_connection();
        self.failures.report(what);
    }

    /// Starts `rings` on the backend, each from `base`; on failure, says what failed (the
    /// caller drops the connection).
    fn start(&mut self, features: u64, rings: &[Ring], base: Base) -> Result<(), String> {
        let Some(conn) = self.conn.as_mut() else {
            return Err("cannot start the device: the backend is not connected".into());
        };
        let started = &mut self.started;
        let memory = &self.memory;
        let inflight = &mut self.inflight;
        let r = conn.operation("the device start", |conn| {
            conn.set_features(features)?;
            conn.set_mem_table(memory)?;
            // A new backend for running rings gets what the last one recorded; otherwise the
            // backend makes a new, empty region.
            match inflight.as_ref() {
                // The same backend, resuming: it keeps its region.
                Some(_) if matches!(base, Base::At(_)) => {}
                Some(kept) if matches!(base, Base::Used) && conn.tracks_inflight() => {
                    conn.set_inflight(kept)?
                }
                _ => {
                    let queues = rings.iter().map(|r| r.index + 1).max().unwrap_or(0);
                    let size = rings.iter().map(|r| r.size).max().unwrap_or(0);
                    *inflight =
                        conn.get_inflight(u16::try_from(queues).unwrap_or(u16::MAX), size)?;
                }
            }
            for ring in rings {
                conn.start_vring(&VringSetup {
                    index: ring.index,
                    size: ring.size,
                    desc: ring.desc,
                    avail: ring.avail,
                    used: ring.used,
                    base: base.of(ring),
                    kick: &ring.kick,
                    call: &ring.call,
                })?;
                started.push(ring.index);
            }
            conn.barrier()
        });
        if let Err(e) = r {
            return Err(format!(
                "cannot start the device: {}",
                crate::error_chain(&e)
            ));
        }
        // A driver may kick before DRIVER_OK (virtio-rng queues its one request in probe), and
        // a backend that sees the kick before SET_VRING_ENABLE consumes it and drops it
        // (vhost-user-backend does): with one request outstanding, the queue would wait for
        // ever. A kick now, once the backend has handled the enables (the barrier above), costs
        // it one look at its rings. (After a reconnect it also covers kicks the dead backend
        // never read: they are in the same eventfds, but a kick is cheap and a lost one is not.)
        for ring in rings {
            let _ = ring.kick.write(1);
        }
        // A backend that died may have put completions in a used ring without interrupting
        // the guest; with EVENT_IDX the driver then waits for an interrupt at a used index
        // already passed, which its successor will never send (Linux's virtio-net stops a
        // full transmit queue that way, for good). One interrupt per ring makes the driver
        // look (a spurious one costs it a look at its used ring).
        if matches!(base, Base::Used) {
            for ring in rings {
                let _ = ring.call.write(1);
            }
        }
        Ok(())
    }

    fn pause(&mut self) {
        if self.paused.is_some() {
            return;
        }
        let mut bases = Vec::new();
        if let Some(conn) = self.conn.as_mut() {
            let started = std::mem::take(&mut self.started);
            let r = conn.operation("the pause", |conn| {
                for &q in &started {
                    let base = conn.stop_vring(q)?;
                    bases.push((q, base as u16));
                }
                Ok(())
            });
            if let Err(e) = r {
                self.fail(format!(
                    "cannot stop the rings for a pause: {}",
                    crate::error_chain(&e)
                ));
                bases.clear();
            }
        }
        self.paused = Some(bases);
    }

    fn resume(&mut self) {
        let Some(bases) = self.paused.take() else {
            return;
        };
        let Some(active) = self.active.take() else {
            return;
        };
        // Where each ring stopped, if this backend stopped them; else (a new backend came
        // while paused, or none is here yet) the used ring says.
        let base = if bases.is_empty() {
            Base::Used
        } else {
            Base::At(&bases)
        };
        if self.conn.is_some() {
            if let Err(e) = self.start(active.features, &active.rings, base) {
                self.fail(e);
            }
        }
        self.active = Some(active);
    }

    /// A new backend in place of the lost one: it must offer what the device was started with,
    /// then gets the running rings, each from the last backend's used index.
    fn reconnect(&mut self, conn: Connection) -> Result<(), String> {
        self.drop_connection();
        self.awaiting = false;
        let Some(active) = self.active.take() else {
            self.conn = Some(conn);
            return Ok(());
        };
        let offered = conn.negotiated().features;
        let missing = active.features & !offered;
        let queues = conn.negotiated().queues;
        let needed = active.rings.iter().map(|r| r.index + 1).max().unwrap_or(0) as u64;
        let checked = if missing != 0 {
            Err(format!(
                "the new backend lacks features the driver uses ({missing:#x})"
            ))
        } else if queues < needed {
            Err(format!(
                "the new backend serves {queues} queues, the device runs {needed}"
            ))
        } else {
            Ok(())
        };
        if checked.is_ok() {
            self.conn = Some(conn);
        }
        if checked.is_ok() && self.paused.is_some() {
            // The rings start on it when the VM resumes, from the used ring.
            self.paused = Some(Vec::new());
            self.active = Some(active);
            return Ok(());
        }
        if checked.is_ok() && !self.in_order && self.inflight.is_none() {
            let _ = writeln!(
                std::io::stderr(),
                "cloister: {}: the backend does not track requests in flight: those the last one \
                 had not finished are taken again from the used ring's index, and may be lost or \
                 repeated",
                self.name
            );
        }
        let checked = checked.and_then(|()| self.start(active.features, &active.rings, Base::Used));
        if checked.is_err() {
            self.drop_connection();
        }
        self.active = Some(active);
        checked
    }

    fn stop(&mut self) {
        let started = std::mem::take(&mut self.started);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let mut stopping = 0;
        let r = conn.operation("the device reset", |conn| {
            for &q in &started {
                stopping = q;
                conn.stop_vring(q)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            self.fail(format!(
                "cannot stop queue {stopping}: {}",
                crate::error_chain(&e)
            ));
        }
    }
}

/// Where a ring starts on the backend.
#[derive(Clone, Copy)]
enum Base<'a> {
    /// At 0: the driver has just set the ring up.
    Zero,
    /// Where the backend said it stopped each ring (`GET_VRING_BASE`), for a resume.
    At(&'a [(usize, u16)]),
    /// At the used ring's index: the requests before it are done; the ones after it, which a
    /// dead backend may have taken and not finished, are taken again. (Right for a backend
    /// that completes requests in order; one that does not needs in-flight tracking.)
    Used,
}

impl Base<'_> {
    fn of(self, ring: &Ring) -> u16 {
        match self {
            Base::Zero => 0,
            Base::At(bases) => match bases.iter().find(|(q, _)| *q == ring.index) {
                Some(&(_, base)) => base,
                None => Base::Used.of(ring),
            },
            // The used ring's index is the little-endian u16 after its flags. Read byte by byte
            // (the driver chose the address: it need not be aligned) and volatile (the driver
            // may write it at any time).
            Base::Used => {
                let at = ring.used as usize + 2;
                // SAFETY: `used` is this process's address of the ring's used ring, checked to
                // lie in guest memory when the ring was started, and guest memory stays mapped
                // while the device exists (the owner holds the mapping).
                let bytes = unsafe {
                    [
                        std::ptr::read_volatile(at as *const u8),
                        std::ptr::read_volatile((at + 1) as *const u8),
                    ]
                };
                u16::from_le_bytes(bytes)
            }
        }
    }
}

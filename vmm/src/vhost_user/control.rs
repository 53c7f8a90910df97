//! A device's control thread: it owns the vhost-user connection and makes the requests that
//! start and stop the backend's queues, so that no vCPU thread waits on a backend while it
//! holds a transport's lock. Starting is asynchronous (the driver's DRIVER_OK write returns at
//! once; a kick that comes before the backend has its rings stays pending in the kick
//! eventfd); stopping waits, because the driver may reuse the rings' memory as soon as the
//! reset is done. Commands run in the order given, so a reset after a start waits for it.
//!
//! A failure ends the connection and is reported through [`Failures`]: the device manager's
//! main loop then marks the device as needing a reset, from a thread that holds no device lock.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cloister_seccomp::ThreadRole;
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Connection, VringSetup};
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
    /// The backend is gone: drop the connection.
    Lost,
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
    /// Starts `name`'s control thread with the connection.
    pub fn start(
        name: &str,
        conn: Connection,
        memory: GuestMemoryMmap,
        failures: Arc<Failures>,
    ) -> std::io::Result<Self> {
        let socket = conn.socket_dup()?;
        let (tx, rx) = mpsc::channel();
        let owner = Owner {
            conn: Some(conn),
            memory,
            started: Vec::new(),
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
        self.send(Command::Lost);
    }

    fn send(&self, c: Command) -> bool {
        self.commands.as_ref().is_some_and(|tx| tx.send(c).is_ok())
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // Ends a request in progress, then the thread (its queue closes).
        // SAFETY: shutdown(2) on a socket descriptor we own; no memory involved.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
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
    /// `None` once the backend is gone, or out of step after a failed request.
    conn: Option<Connection>,
    memory: GuestMemoryMmap,
    /// Queues the backend is serving.
    started: Vec<usize>,
    failures: Arc<Failures>,
}

impl Owner {
    fn serve(mut self, commands: Receiver<Command>) {
        while let Ok(c) = commands.recv() {
            match c {
                Command::Start { features, rings } => self.start(features, &rings),
                Command::Stop { done } => {
                    self.stop();
                    let _ = done.send(());
                }
                Command::Lost => self.drop_connection(),
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

    fn start(&mut self, features: u64, rings: &[Ring]) {
        let Some(conn) = self.conn.as_mut() else {
            self.failures
                .report("cannot start the device: the backend is not connected".into());
            return;
        };
        let started = &mut self.started;
        let memory = &self.memory;
        let r = conn.operation("the device start", |conn| {
            conn.set_features(features)?;
            conn.set_mem_table(memory)?;
            for ring in rings {
                conn.start_vring(&VringSetup {
                    index: ring.index,
                    size: ring.size,
                    desc: ring.desc,
                    avail: ring.avail,
                    used: ring.used,
                    kick: &ring.kick,
                    call: &ring.call,
                })?;
                started.push(ring.index);
            }
            conn.barrier()
        });
        if let Err(e) = r {
            self.fail(format!(
                "cannot start the device: {}",
                crate::error_chain(&e)
            ));
            return;
        }
        // A driver may kick before DRIVER_OK (virtio-rng queues its one request in probe), and
        // a backend that sees the kick before SET_VRING_ENABLE consumes it and drops it
        // (vhost-user-backend does): with one request outstanding, the queue would wait for
        // ever. A kick now, once the backend has handled the enables (the barrier above), costs
        // it one look at its rings.
        for ring in rings {
            let _ = ring.kick.write(1);
        }
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

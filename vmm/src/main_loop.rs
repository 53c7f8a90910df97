//! The main thread from start to exit: it sets up what every VM needs (the sandbox's reporter,
//! the spawner process, the API server), builds the VM the command line or the API asks for,
//! runs it, and between VMs serves the API's commands.

use std::sync::Arc;

use crate::api::{self, vm_config::ProcessOptions};
use crate::config::{self, Cli, VmConfig};
use crate::exit::ApiStop;
use crate::lifecycle::{self, Command, Inbox, InboxState, Refusal, VmState};
use crate::signals::SignalFd;
use crate::supervisor::Spawner;
use crate::vm::MainEvents;
use crate::{ConfigError, Error, ExitReason, Vm, VmError};

/// Validates the command line, builds the VM (or, with `--api-socket` and no `--kernel`,
/// waits for the API to ask for one) and runs it.
pub fn run(cli: &Cli) -> Result<ExitReason, Error> {
    let host_ram =
        config::host_ram_bytes().map_err(|e| VmError::Io("read the host's memory size", e))?;
    // Parsed before anything starts, so that a wrong option costs nothing.
    let first = match &cli.kernel {
        Some(_) => Some(VmConfig::from_cli(cli, host_ram)?),
        None => None,
    };
    if let Some(value) = &cli.event_monitor {
        crate::events::open(value).map_err(|why| ConfigError::EventMonitor {
            value: value.clone(),
            why,
        })?;
    }
    crate::events::emit("vmm", "starting", None);
    let listener = cli
        .api_socket
        .as_deref()
        .map(api::Listener::open)
        .transpose()?;
    // Before any thread exists: the reporter of forbidden system calls, then the spawner,
    // forked while this process is one thread; then the threads.
    cloister_seccomp::init("cloister", cli.seccomp).map_err(VmError::from)?;
    let spawner = Spawner::start(crate::kinds::BACKEND_PROGRAMS)
        .map_err(|e| VmError::Io("start the spawner process", e))?;
    // Termination signals are taken through a signalfd by this thread only; blocking them
    // before any thread starts means the others inherit the mask and never see them.
    let signals = SignalFd::termination().map_err(|e| VmError::Io("set up signal handling", e))?;
    let Some(listener) = listener else {
        let Some(cfg) = first else {
            return Err(ConfigError::NoKernel.into());
        };
        crate::events::emit("vm", "booting", None);
        let vm = Vm::new(&cfg, spawner)?;
        crate::events::emit("vm", "booted", None);
        let reason = vm.run(&MainEvents::new(&signals, None));
        crate::events::emit("vm", "shutdown", None);
        crate::events::emit("vmm", "shutdown", None);
        return Ok(reason?);
    };
    let (control, inbox) = lifecycle::channel().map_err(|e| VmError::Io("create an eventfd", e))?;
    let process = ProcessOptions {
        seccomp: cli.seccomp,
        backend_restarts: cli.backend_restarts,
    };
    let mut server = api::start(listener, control, process)
        .map_err(|e| VmError::Io("start the API thread", e))?;
    let mut owner = Owner {
        inbox,
        host_ram,
        spawner,
        ran: false,
        process,
    };
    let reason = owner.serve(first, &signals);
    // A `vmm.shutdown` reply is on its way: the server writes it, then ends.
    if matches!(reason, Ok(ExitReason::Api(ApiStop::Vmm))) {
        server.finish();
    }
    if owner.ran {
        server.keep_socket_file();
    }
    crate::events::emit("vmm", "shutdown", None);
    reason
}

struct Owner {
    inbox: Inbox,
    host_ram: u64,
    spawner: Arc<Spawner>,
    /// A VM has run: its sandbox (the main thread's) outlives it, so this process runs no
    /// other. (A VM that failed to build never entered it.)
    ran: bool,
    process: ProcessOptions,
}

/// What the main thread does next.
enum Next {
    Boot(Option<lifecycle::Reply>),
    Exit(ExitReason),
}

/// Why a boot did not end in a VM that stopped normally.
enum BootFailure {
    /// The VM could not be built: the API's caller is told, and the VMM stays.
    Build(Error),
    /// The VM failed while it ran: the process ends, as it does for a guest that fails.
    Run(Error),
}

impl Owner {
    /// Boots `first` if given, then serves commands until the process should end.
    fn serve(&mut self, first: Option<VmConfig>, signals: &SignalFd) -> Result<ExitReason, Error> {
        let mut next = None;
        if let Some(cfg) = first {
            self.set(Some(Arc::new(cfg)), Some(VmState::Created));
            next = Some(Next::Boot(None));
        }
        loop {
            let step = match next.take() {
                Some(step) => step,
                None => self.wait(signals)?,
            };
            match step {
                Next::Exit(reason) => return Ok(reason),
                Next::Boot(reply) => {
                    let from_api = reply.is_some();
                    match self.boot(reply, signals) {
                        Ok(Some(reason)) => return Ok(reason),
                        Ok(None) => {}
                        // The command line's VM failing to build ends the process, with
                        // the error; the API's is answered and the VMM stays.
                        Err(BootFailure::Build(e)) if !from_api => return Err(e),
                        Err(BootFailure::Build(_)) => {}
                        Err(BootFailure::Run(e)) => return Err(e),
                    }
                }
            }
        }
    }

    fn set(&self, config: Option<Arc<VmConfig>>, state: Option<VmState>) {
        let mut shared = self.inbox.shared();
        shared.config = config;
        shared.state = state;
    }

    /// Builds and runs the configured VM. `None`: the VM stopped and the VMM stays (the API
    /// shut it down); `Some`: the process should end, for that reason.
    fn boot(
        &mut self,
        reply: Option<lifecycle::Reply>,
        signals: &SignalFd,
    ) -> Result<Option<ExitReason>, BootFailure> {
        let Some(cfg) = self.inbox.shared().config.clone() else {
            answer(
                reply,
                Err(Refusal::new(404, "no VM is created (vm.create first)")),
            );
            return Ok(None);
        };
        if self.ran {
            answer(reply, Err(ran_already()));
            return Ok(None);
        }
        crate::events::emit("vm", "booting", None);
        let vm = match Vm::new(&cfg, self.spawner.clone()) {
            Ok(vm) => vm,
            Err(e) => {
                let status = if matches!(e, Error::Config(_)) {
                    400
                } else {
                    500
                };
                answer(reply, Err(Refusal::new(status, crate::error_chain(&e))));
                return Err(BootFailure::Build(e));
            }
        };
        {
            let mut shared = self.inbox.shared();
            shared.running = Some(vm.running());
            shared.state = Some(VmState::Running);
        }
        answer(reply, Ok(()));
        crate::events::emit("vm", "booted", None);
        self.ran = true;
        let events = MainEvents::new(signals, Some(&self.inbox));
        let reason = vm.run(&events);
        self.inbox.shared().running = None;
        crate::events::emit("vm", "shutdown", None);
        let stopping = events.stopping.take();
        let reason = match reason {
            Ok(reason) => reason,
            Err(e) => {
                self.inbox.shared().state = Some(VmState::Shutdown);
                for reply in stopping {
                    let _ = reply.send(Err(Refusal::new(500, crate::error_chain(&e))));
                }
                return Err(BootFailure::Run(e.into()));
            }
        };
        match reason {
            ExitReason::Api(ApiStop::Shutdown) => {
                self.inbox.shared().state = Some(VmState::Shutdown);
            }
            ExitReason::Api(ApiStop::Delete) => {
                self.set(None, None);
                crate::events::emit("vm", "deleted", None);
            }
            _ => self.inbox.shared().state = Some(VmState::Shutdown),
        }
        for reply in stopping {
            let _ = reply.send(Ok(()));
        }
        match reason {
            ExitReason::Api(ApiStop::Shutdown | ApiStop::Delete) => {
                eprintln!("cloister: {reason}");
                Ok(None)
            }
            // The guest stopped, or the VMM was asked to: the process ends, as Cloud
            // Hypervisor's does.
            reason => Ok(Some(reason)),
        }
    }

    /// Waits for a command or a termination signal while no VM runs.
    fn wait(&mut self, signals: &SignalFd) -> Result<Next, Error> {
        loop {
            while let Some((command, reply)) = self.inbox.next() {
                if let Some(next) = self.command(command, reply) {
                    return Ok(next);
                }
            }
            match self.inbox.check() {
                InboxState::Idle => {}
                InboxState::Pending => continue,
                InboxState::Gone => {
                    return Err(VmError::Io(
                        "serve the API",
                        std::io::Error::other("the API thread has ended"),
                    )
                    .into())
                }
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.inbox.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: signals.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: a valid array of pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VmError::Io("wait for events", e).into());
            }
            if fds[1].revents != 0 {
                if let Some(signo) = signals.read() {
                    return Ok(Next::Exit(ExitReason::Signal(signo)));
                }
            }
        }
    }

    /// A command while no VM runs; `Some` when the main thread has something else to do.
    fn command(&mut self, command: Command, reply: lifecycle::Reply) -> Option<Next> {
        let state = self.inbox.shared().state;
        let result = match command {
            Command::Create(body) => {
                if state.is_some() {
                    Err(Refusal::new(
                        409,
                        "a VM is already created (vm.delete it first)",
                    ))
                } else {
                    self.create(&body)
                }
            }
            Command::Boot => {
                if state == Some(VmState::Created) {
                    return Some(Next::Boot(Some(reply)));
                }
                Err(match state {
                    None => Refusal::new(404, "no VM is created (vm.create first)"),
                    _ => ran_already(),
                })
            }
            Command::Shutdown | Command::Pause | Command::Resume => Err(match state {
                None => Refusal::new(404, "no VM is created"),
                _ => Refusal::new(405, "the VM is not running"),
            }),
            Command::Delete => {
                if state.is_some() {
                    crate::events::emit("vm", "deleted", None);
                }
                self.set(None, None);
                Ok(())
            }
            Command::ShutdownVmm => {
                let _ = reply.send(Ok(()));
                return Some(Next::Exit(ExitReason::Api(ApiStop::Vmm)));
            }
        };
        let _ = reply.send(result);
        None
    }

    /// `vm.create`: the body as a command line, checked as the command line is.
    fn create(&mut self, body: &[u8]) -> Result<(), Refusal> {
        let cli = api::vm_config::vm_config(body, &self.process)
            .map_err(|e| Refusal::new(400, e.to_string()))?;
        let cfg = VmConfig::from_cli(&cli, self.host_ram)
            .map_err(|e| Refusal::new(400, crate::error_chain(&e)))?;
        self.set(Some(Arc::new(cfg)), Some(VmState::Created));
        Ok(())
    }
}

fn ran_already() -> Refusal {
    Refusal::new(
        500,
        "this cloister has run a VM already, and its sandbox is set for that one: start a new \
         cloister for another",
    )
}

fn answer(reply: Option<lifecycle::Reply>, result: Result<(), Refusal>) {
    if let Some(reply) = reply {
        let _ = reply.send(result);
    }
}

//! Building the VM from a [`VmConfig`] and running it until it stops.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use cloister_seccomp::ThreadRole;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, Initramfs, Kernel};
use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::cpu::pause::PauseGate;
use crate::cpu::{cpuid, msrs, Vcpu, VcpuContext, VcpuError};
use crate::device_manager::hotplug::{self, Hotplug};
use crate::device_manager::placement::{Placement, PlacementError};
use crate::device_manager::{Buses, DeviceManager, DeviceManagerError};
use crate::devices::acpi_hotplug::{self, AcpiHotplug};
use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_PORT, ACPI_PM_PORT_LEN};
use crate::devices::console_output::{self, ConsoleWriter};
use crate::devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::pvpanic::{PvPanic, PVPANIC_PORT};
use crate::devices::serial::{Output, SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use crate::devices::{Bus, BusDevice, BusError};
pub use crate::exit::ExitReason;
use crate::exit::{ApiStop, ExitLatch};
use crate::irqchip::{self, IrqchipError};
use crate::layout::{
    RamLayout, ACPI_GED_GSI, ACPI_HOTPLUG_START, KVM_IDENTITY_MAP_START, KVM_TSS_START,
    PCI_ECAM_BUS_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START,
};
use crate::lifecycle::{Command, Inbox, Refusal, RunningVm, VmState};
use crate::memory::{GuestRam, MemoryError};
use crate::pci::bus::{CONFIG_IO_LEN, CONFIG_IO_PORT};
use crate::pci::{PciConfigIo, PciConfigMmio, PciRoot};
use crate::signals::SignalFd;
use crate::supervisor::Spawner;
use crate::terminal::RawTerminal;
use crate::vm_ops::{KvmVmOps, VmOps};

/// A failure of the VMM or KVM (not of the user's input).
#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error(transparent)]
    Irqchip(#[from] IrqchipError),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(BootError),
    #[error("cannot add a device to the bus")]
    Bus(#[from] BusError),
    #[error("cannot {0}")]
    Io(&'static str, #[source] io::Error),
    #[error("cannot build the {0} list")]
    Fam(&'static str, #[source] vmm_sys_util::fam::Error),
    #[error("cannot {0}")]
    Signal(&'static str, #[source] vmm_sys_util::errno::Error),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error("cannot lay out the PCI windows")]
    Placement(#[from] PlacementError),
    #[error("cannot enter the sandbox")]
    Sandbox(#[from] cloister_seccomp::Error),
}

/// How long the guest's last console output may take to get out once the VM has stopped.
const CONSOLE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A VM ready to run: memory loaded, devices attached, vCPUs configured.
pub struct Vm {
    // Kept alive for the VM's lifetime: KVM needs the VM fd, vCPUs need the VM.
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    vcpus: Vec<Vcpu>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: Arc<ExitLatch>,
    serial: Arc<SerialDevice>,
    /// Moves the UART's output to stdout or the console file, off the vCPU threads.
    console_writer: ConsoleWriter,
    /// stdin feeds the UART (`--serial tty`).
    console_input: bool,
    /// Every virtio device and its backend, watched by the main loop while the guest runs,
    /// changed by the hot-plug thread, stopped when the VM ends.
    devices: Arc<Mutex<DeviceManager>>,
    /// Adds and removes devices while the VM runs.
    hotplug: Hotplug,
    /// Tells the guest of devices added and to be removed, and of the power button.
    acpi_hotplug: Arc<AcpiHotplug>,
    /// Where the vCPUs park while the VM is paused.
    pause_gate: Arc<PauseGate>,
    /// Set while paused: the guest's clock when it paused.
    paused: Option<kvm_bindings::kvm_clock_data>,
    seccomp: cloister_seccomp::SeccompMode,
}

impl Vm {
    /// Builds the VM; `spawner` starts its managed backends. User errors come back as
    /// [`crate::Error::Config`] (exit status 2), VMM and KVM failures as [`crate::Error::Vm`].
    pub fn new(cfg: &VmConfig, spawner: Arc<Spawner>) -> Result<Self, crate::Error> {
        // Everything the user named is opened first, so mistakes are reported before any
        // KVM work.
        let kernel = Kernel::open(&cfg.kernel).map_err(|source| ConfigError::Kernel {
            path: cfg.kernel.clone(),
            source,
        })?;
        let initramfs = match &cfg.initramfs {
            Some(path) => Some(
                Initramfs::open(path).map_err(|source| ConfigError::Initramfs {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let serial_out: Output = match &cfg.serial {
            SerialConfig::Tty => Box::new(io::stdout()),
            SerialConfig::Off => Box::new(io::sink()),
            SerialConfig::File(path) => {
                Box::new(
                    File::create(path).map_err(|source| ConfigError::SerialFile {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
        };

        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vcpu_count = cfg.cpus.boot;
        let kvm_max = kvm.get_max_vcpus();
        if vcpu_count > kvm_max {
            return Err(ConfigError::CpusAboveKvmMax {
                value: format!("boot={vcpu_count}"),
                requested: vcpu_count,
                max: kvm_max,
            }
            .into());
        }
        // Every option is checked now; the devices' backends start while we build the VM.
        cfg.check_files()?;
        let mut devices = DeviceManager::new(&cfg.devices, spawner, cfg.backend_restarts)
            .map_err(VmError::from)?;
        let vm_fd = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::Kvm("create the VM", e))?,
        );
        // Needed on Intel (real-mode emulation via VMX); harmless elsewhere. Both live in the
        // MMIO hole, outside guest RAM.
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|e| VmError::Kvm("set the identity map address", e))?;
        vm_fd
            .set_tss_address(KVM_TSS_START as usize)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;
        // Memory slots go in before the irqchip: creating the irqchip registers in-kernel
        // devices, and the first memslot change after that waits several milliseconds for an
        // SRCU grace period (measured 5-10 ms per VM on this host, versus 0.3 ms before).
        let ram = GuestRam::new(RamLayout::new(cfg.memory.size)).map_err(VmError::from)?;
        ram.register(&vm_fd).map_err(VmError::from)?;
        irqchip::setup(&vm_fd).map_err(VmError::from)?;

        let exit = Arc::new(ExitLatch::new().map_err(|e| VmError::Io("create an eventfd", e))?);
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());

        let serial_irq =
            EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Io("create an eventfd", e))?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|e| VmError::Kvm("register the serial port's irqfd", e))?;
        let (console_output, console_writer) = console_output::start(serial_out)
            .map_err(|e| VmError::Io("start the console writer thread", e))?;
        let serial = Arc::new(
            SerialDevice::new(serial_irq, Box::new(console_output))
                .map_err(|e| VmError::Io("create an eventfd", e))?,
        );
        let add =
            |dev: Arc<dyn BusDevice>, base: u16, len: u64| io_bus.insert(dev, u64::from(base), len);
        add(serial.clone(), COM1_PORT, COM1_PORT_LEN).map_err(VmError::from)?;
        add(
            Arc::new(I8042::new(exit.clone())),
            I8042_PORT,
            I8042_PORT_LEN,
        )
        .map_err(VmError::from)?;
        add(
            Arc::new(AcpiPm::new(exit.clone())),
            ACPI_PM_PORT,
            ACPI_PM_PORT_LEN,
        )
        .map_err(VmError::from)?;
        add(Arc::new(PvPanic::new(exit.clone())), PVPANIC_PORT, 1).map_err(VmError::from)?;

        // PCI bus 0 and the devices (on it or on virtio-mmio). BARs start where firmware would
        // have put them: 64-bit ones above RAM.
        let vm_ops: Arc<dyn VmOps> = Arc::new(KvmVmOps::new(vm_fd.clone()));
        let pci = Arc::new(PciRoot::new());
        let pci_mmio64 = ram.layout.pci_mmio64_window();
        let placement = Placement::new(pci.clone(), pci_mmio64, (PCI_MMIO_START, PCI_MMIO_SIZE))
            .map_err(VmError::from)?;
        let virtio_mmio = devices
            .attach(Buses {
                memory: ram.memory.clone(),
                vm: vm_ops,
                mmio_bus: mmio_bus.clone(),
                placement,
            })
            .map_err(VmError::from)?;
        io_bus
            .insert(
                Arc::new(PciConfigIo::new(pci.clone())),
                u64::from(CONFIG_IO_PORT),
                CONFIG_IO_LEN,
            )
            .map_err(VmError::from)?;
        mmio_bus
            .insert(
                Arc::new(PciConfigMmio::new(pci)),
                PCI_ECAM_START,
                PCI_ECAM_BUS_SIZE,
            )
            .map_err(VmError::from)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("get the supported CPUID", e))?;
        let mut base_cpuid = supported.as_slice().to_vec();
        if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            cpuid::enable_tsc_deadline(&mut base_cpuid);
        }

        let entry = boot::setup(
            &ram,
            kernel,
            initramfs,
            &cfg.cmdline,
            cpuid::has_1g_pages(&base_cpuid),
        )
        .map_err(|e| boot_error(cfg, e))?;
        // After the kernel, so nothing in its file can overwrite them.
        let platform = acpi::Platform {
            vcpus: vcpu_count,
            pci_mmio64,
            virtio_mmio,
        };
        acpi::create_tables(&ram.memory, &platform).map_err(VmError::from)?;

        let msrs = msrs::boot_msrs().map_err(|e| VmError::Fam("MSR", e))?;
        let mut vcpus = Vec::with_capacity(vcpu_count);
        for index in 0..vcpu_count {
            let vcpu = Vcpu::new(&vm_fd, index).map_err(VmError::from)?;
            let mut entries = base_cpuid.clone();
            cpuid::patch(&mut entries, index as u32, vcpu_count as u32);
            let cpuid = CpuId::from_entries(&entries).map_err(|e| VmError::Fam("CPUID", e))?;
            let boot = (index == 0).then_some((&ram.memory, &entry));
            vcpu.configure(&cpuid, &msrs, boot).map_err(VmError::from)?;
            vcpus.push(vcpu);
        }

        // Devices come and go from here on through the hot-plug thread; started last, so that
        // no failure above leaves it holding the device manager (whose last owner must be
        // this thread, which may remove the runtime directory).
        let rules = devices.landlock_rules();
        let devices = Arc::new(Mutex::new(devices));
        let ged_irq =
            EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Io("create an eventfd", e))?;
        vm_fd
            .register_irqfd(&ged_irq, ACPI_GED_GSI)
            .map_err(|e| VmError::Kvm("register the ACPI event interrupt's irqfd", e))?;
        let acpi_hotplug = Arc::new(AcpiHotplug::new(ged_irq));
        mmio_bus
            .insert(acpi_hotplug.clone(), ACPI_HOTPLUG_START, acpi_hotplug::LEN)
            .map_err(VmError::from)?;
        let hotplug = hotplug::start(devices.clone(), rules, acpi_hotplug.clone())
            .map_err(|e| VmError::Io("start the hot-plug thread", e))?;

        Ok(Vm {
            _kvm: kvm,
            vm_fd,
            ram,
            vcpus,
            io_bus,
            mmio_bus,
            exit,
            serial,
            console_writer,
            console_input: cfg.serial == SerialConfig::Tty,
            devices,
            hotplug,
            acpi_hotplug,
            pause_gate: Arc::new(PauseGate::default()),
            paused: None,
            seccomp: cfg.seccomp,
        })
    }

    /// Guest RAM (for tests and, later, vhost-user backends).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Adds and removes devices while the VM runs (the control plane's way in).
    pub fn hotplug(&self) -> Hotplug {
        self.hotplug.clone()
    }

    /// What the API reads of the VM while it runs.
    pub fn running(&self) -> RunningVm {
        RunningVm {
            devices: self.devices.clone(),
            hotplug: self.hotplug.clone(),
            acpi: self.acpi_hotplug.clone(),
        }
    }

    fn devices(&self) -> MutexGuard<'_, DeviceManager> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the guest until it powers off, reboots, panics or fails, or we get SIGINT,
    /// SIGTERM or SIGHUP. The terminal is restored before this returns.
    pub fn run(mut self, events: &MainEvents) -> Result<ExitReason, VmError> {
        crate::cpu::vcpu::install_kick_handler()
            .map_err(|e| VmError::Signal("install the vCPU kick handler", e))?;
        // In the background, stdin's terminal belongs to the foreground job: output only.
        self.console_input &= crate::terminal::Stdin::probe().readable();
        let _terminal = if self.console_input {
            Some(
                RawTerminal::enable()
                    .map_err(|e| VmError::Io("set the terminal to raw mode", e))?,
            )
        } else {
            None
        };

        let stop = Arc::new(AtomicBool::new(false));
        let ctx = VcpuContext {
            io_bus: self.io_bus.clone(),
            mmio_bus: self.mmio_bus.clone(),
            exit: self.exit.clone(),
            stop: stop.clone(),
            pause: self.pause_gate.clone(),
        };
        let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        for vcpu in self.vcpus.drain(..) {
            let ctx = ctx.clone();
            let index = vcpu.index;
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let exit = ctx.exit.clone();
                    // Confined before its first KVM_RUN, so before any guest input.
                    if let Err(e) = cloister_seccomp::enter_thread(ThreadRole::VmmVcpu) {
                        exit.request(ExitReason::VcpuFailure {
                            vcpu: index,
                            detail: format!("cannot enter its sandbox: {}", crate::error_chain(&e)),
                        });
                        return;
                    }
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run(ctx)));
                    if r.is_err() {
                        exit.request(ExitReason::VcpuFailure {
                            vcpu: index,
                            detail: "vCPU thread panicked".into(),
                        });
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }

        crate::test_hooks::start(self.hotplug.clone(), self.devices.clone(), self.seccomp);
        // The VM is built, the backends connected and the vCPUs started (they confine
        // themselves): now this thread, before it reads stdin or a backend's socket.
        let result = match spawn_error {
            None => self
                .enter_sandbox()
                .and_then(|()| self.wait_for_exit(events, &threads)),
            Some(e) => Err(VmError::Io("start a vCPU thread", e)),
        };

        stop.store(true, Ordering::Release);
        self.pause_gate.stop();
        self.devices().disconnect();
        for t in &threads {
            // A thread that already finished is still joinable, so the handle is valid.
            let _ = t.kill(crate::cpu::vcpu::kick_signal());
        }
        for t in threads {
            let _ = t.join();
        }
        self.finish_console();
        self.devices().shutdown();
        result
    }

    /// Lets the console writer put out the guest's last words, for a moment; says what the
    /// output did not take.
    fn finish_console(&mut self) {
        let finished = self.console_writer.finish(CONSOLE_DRAIN_TIMEOUT);
        if let Some(kind) = finished.failed {
            eprintln!("cloister: warning: the console output failed ({kind})");
        }
        if finished.lost > 0 {
            eprintln!(
                "cloister: warning: {} bytes of the guest's console output were dropped: the \
                 output did not keep up",
                finished.lost
            );
        }
    }

    /// Confines the main thread: the vmm-main seccomp policy, Landlock access to the backends'
    /// sockets and the runtime directory only, no capabilities.
    fn enter_sandbox(&self) -> Result<(), VmError> {
        let rules = self.devices().landlock_rules();
        let entered = cloister_seccomp::enter(ThreadRole::VmmMain, &rules)?;
        if let Some(warning) = entered.landlock.warning() {
            eprintln!("cloister: warning: {warning}");
        }
        Ok(())
    }

    /// The main thread's loop: waits for an exit request or a signal, and pumps stdin into
    /// the UART, never faster than the guest drains its FIFO.
    ///
    /// It also watches the devices' backends: a socket hang-up, a managed backend's exit or a
    /// failed device start is reported and the device marked as needing a reset, and the guest
    /// keeps running; an operator's backend whose rings a new one can take over is sought
    /// again instead, with backoff, on the hot-plug thread. This is
    /// poll(2) rather than epoll: stdin may be a regular file or /dev/null, which epoll refuses.
    fn wait_for_exit(
        &mut self,
        events: &MainEvents,
        vcpus: &[JoinHandle<()>],
    ) -> Result<ExitReason, VmError> {
        let signals = events.signals;
        let drained = self
            .serial
            .drained_event()
            .map_err(|e| VmError::Io("create an eventfd", e))?;
        let mut stdin_open = self.console_input;
        let mut stdin_paused = false;
        let mut buf = [0u8; 64];
        loop {
            if let Some(reason) = self.exit.reason() {
                return Ok(reason);
            }
            let mut fds = vec![
                pollfd(self.exit.eventfd().as_raw_fd()),
                pollfd(signals.fd()),
                pollfd(if stdin_open && !stdin_paused {
                    libc::STDIN_FILENO
                } else {
                    -1
                }),
                pollfd(if stdin_open && stdin_paused {
                    drained.as_raw_fd()
                } else {
                    -1
                }),
                pollfd(events.inbox.map_or(-1, Inbox::fd)),
            ];
            let (watches, next_recovery) = {
                let devices = self.devices();
                (devices.watches(), devices.next_recovery())
            };
            fds.extend(watches.iter().map(|&(fd, events, _)| libc::pollfd {
                fd,
                events,
                revents: 0,
            }));
            // Until the next attempt at a lost backend is due, if any (rounded up: a wake-up a
            // millisecond early would find nothing due and go round for nothing).
            let timeout = next_recovery.map_or(-1, |t| {
                let wait = t.saturating_duration_since(std::time::Instant::now());
                i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            });
            // SAFETY: a valid array of pollfds; negative fds are ignored by poll.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VmError::Io("wait for events", e));
            }
            if fds[4].revents != 0 {
                self.serve_commands(events, vcpus);
            }
            if fds[1].revents != 0 {
                if let Some(signo) = signals.read() {
                    self.exit.request(ExitReason::Signal(signo));
                }
            }
            if fds[2].revents != 0 {
                let space = self.serial.fifo_capacity().min(buf.len());
                if space == 0 {
                    // Clear stale "drained" events, then wait for a fresh one unless the guest
                    // emptied the FIFO in between.
                    let _ = drained.read();
                    stdin_paused = self.serial.fifo_capacity() == 0;
                    continue;
                }
                match read_stdin(&mut buf[..space]) {
                    Ok(0) => stdin_open = false,
                    Ok(n) => {
                        self.serial.enqueue_input(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => stdin_open = false,
                }
            }
            if fds[3].revents != 0 {
                let _ = drained.read();
                stdin_paused = false;
            }
            for (pfd, &(_, _, watch)) in fds[5..].iter().zip(&watches) {
                if pfd.revents != 0 {
                    self.devices().on_event(watch);
                }
            }
            // Attempts at lost backends run on the hot-plug thread, which may connect.
            let due = self.devices().due_recoveries(std::time::Instant::now());
            for serial in due {
                self.hotplug.recover(serial);
            }
        }
    }
}

impl Vm {
    /// The API's commands while the VM runs: those that stop it are answered once it has
    /// stopped (by whoever ran it), the others at once.
    fn serve_commands(&mut self, events: &MainEvents, vcpus: &[JoinHandle<()>]) {
        let Some(inbox) = events.inbox else {
            return;
        };
        while let Some((command, reply)) = inbox.next() {
            let stop = match command {
                Command::Pause => {
                    let paused = self.pause(vcpus);
                    if paused.is_ok() {
                        inbox.shared().state = Some(VmState::Paused);
                    }
                    let _ = reply.send(paused);
                    continue;
                }
                Command::Resume => {
                    let resumed = self.resume();
                    if resumed.is_ok() {
                        inbox.shared().state = Some(VmState::Running);
                    }
                    let _ = reply.send(resumed);
                    continue;
                }
                Command::Create(_) => {
                    let _ = reply.send(Err(Refusal::new(409, "a VM is already created")));
                    continue;
                }
                Command::Boot => {
                    let _ = reply.send(Err(Refusal::new(405, "the VM is already running")));
                    continue;
                }
                Command::Shutdown => ApiStop::Shutdown,
                Command::Delete => ApiStop::Delete,
                Command::ShutdownVmm => ApiStop::Vmm,
            };
            self.exit.request(ExitReason::Api(stop));
            events.stopping.borrow_mut().push(reply);
        }
    }
}

impl Vm {
    /// Parks every vCPU, stops every device's rings (the backends finish what they took and
    /// touch guest memory no more) and keeps the guest's clock, so that it does not jump when
    /// the VM resumes.
    fn pause(&mut self, vcpus: &[JoinHandle<()>]) -> Result<(), Refusal> {
        if self.paused.is_some() {
            return Err(Refusal::new(405, "the VM is already paused"));
        }
        crate::events::emit("vm", "pausing", None);
        self.pause_gate.request();
        for t in vcpus {
            let _ = t.kill(crate::cpu::vcpu::kick_signal());
        }
        if !self.pause_gate.wait_parked(vcpus.len(), PAUSE_TIMEOUT) {
            self.pause_gate.release();
            return Err(Refusal::new(
                500,
                format!(
                    "the vCPUs did not stop within {} s",
                    PAUSE_TIMEOUT.as_secs()
                ),
            ));
        }
        // The clock as the vCPUs left it, before the time the rings take to stop.
        let clock = match self.vm_fd.get_clock() {
            Ok(clock) => clock,
            Err(e) => {
                self.pause_gate.release();
                return Err(Refusal::new(
                    500,
                    format!("cannot read the guest's clock: {e}"),
                ));
            }
        };
        // Without the device manager's lock: a backend may take its time.
        let controls = self.devices().controls();
        for control in &controls {
            control.pause();
        }
        self.paused = Some(clock);
        crate::events::emit("vm", "paused", None);
        Ok(())
    }

    /// Undoes [`Vm::pause`]: the rings where they stopped, the clock where it was, the vCPUs
    /// running.
    fn resume(&mut self) -> Result<(), Refusal> {
        let Some(mut clock) = self.paused.take() else {
            return Err(Refusal::new(405, "the VM is not paused"));
        };
        crate::events::emit("vm", "resuming", None);
        let controls = self.devices().controls();
        for control in &controls {
            control.resume();
        }
        // Only the clock's value: with KVM_CLOCK_REALTIME set, KVM would add the time spent
        // paused. Set last, just before the vCPUs run.
        clock.flags = 0;
        if let Err(e) = self.vm_fd.set_clock(&clock) {
            eprintln!("cloister: warning: cannot set the guest's clock back: {e}");
        }
        self.pause_gate.release();
        crate::events::emit("vm", "resumed", None);
        Ok(())
    }
}

/// How long the vCPUs have to leave KVM_RUN when the VM pauses.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the main thread waits on besides the VM: the termination signals, and the API's
/// commands if there is an API.
pub struct MainEvents<'a> {
    pub signals: &'a SignalFd,
    pub inbox: Option<&'a Inbox>,
    /// Replies to the commands that stopped the VM, sent once it has stopped.
    pub stopping: std::cell::RefCell<Vec<crate::lifecycle::Reply>>,
}

impl<'a> MainEvents<'a> {
    pub fn new(signals: &'a SignalFd, inbox: Option<&'a Inbox>) -> Self {
        MainEvents {
            signals,
            inbox,
            stopping: Default::default(),
        }
    }
}

impl Drop for Vm {
    /// The backends, the spawner and the runtime directory go with the VM, from this thread,
    /// whatever path ended it: the hot-plug thread, which may hold the manager longer, may not
    /// remove files or reap processes.
    fn drop(&mut self) {
        self.devices().shutdown();
        self.acpi_hotplug.clear_eject_sink();
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Maps a boot failure to the option that caused it.
fn boot_error(cfg: &VmConfig, e: BootError) -> crate::Error {
    match e {
        BootError::Kernel(source) => ConfigError::Kernel {
            path: cfg.kernel.clone(),
            source,
        }
        .into(),
        BootError::Initramfs(source) => ConfigError::Initramfs {
            path: cfg.initramfs.clone().unwrap_or_default(),
            source,
        }
        .into(),
        BootError::CmdlineTooLong { len, max } => ConfigError::CmdlineTooLong { len, max }.into(),
        e @ BootError::Memory(_) => VmError::Boot(e).into(),
    }
}

/// Reads what is there from fd 0, unbuffered: std's `Stdin` would read ahead into its own
/// buffer, where bytes beyond what the UART's FIFO takes would sit unseen by poll(2) until
/// more input came.
fn read_stdin(buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read(2) into a buffer we own, at most its length.
    let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

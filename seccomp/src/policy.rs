//! The seccomp policy of each thread role: a common base plus what the role does, each rule
//! with the reason it is there.
//!
//! The lists come from running each process under `strace -f` through its tests and real
//! workloads (boot, disk I/O, guest resets, backend disconnects, stop signals), checked with
//! `--seccomp=log`, which names every call a policy misses. What glibc and Rust's std do
//! behind our back (thread start and exit, the allocator, signal returns) is in [`base`] and
//! [`spawns_threads`].
//!
//! Inheritance matters: a thread inherits its creator's filter, and a filter can only be
//! narrowed. A role that creates threads after entering the sandbox (a backend's main thread)
//! must therefore allow what those threads need until they install their own.

use std::convert::TryInto;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

use crate::rules::{
    allow, allow_if, allow_values, has_bits, lacks_bits, refuse, Merged, Refusal, Rule,
};
use crate::{trap, Error, SeccompMode};

/// Every kind of thread in every Cloister process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// `cloister`'s main thread once the VM is built: its event loop (signals, stdin, backend
    /// sockets and processes), stopping the vCPUs and the backends, the runtime directory.
    VmmMain,
    /// A `cloister` vCPU thread: KVM_RUN and the devices it reaches (UART, PCI and virtio
    /// transports). It talks to no backend: device starts and stops are the control threads'.
    VmmVcpu,
    /// The request watchdog of one vhost-user connection in `cloister`.
    VmmWatchdog,
    /// One device's control thread in `cloister`: the vhost-user requests that start and stop
    /// its queues.
    VmmDeviceControl,
    /// `cloister`'s hot-plug thread: adds devices to the running VM (connects to a backend,
    /// negotiates, starts the device's threads; the spawner process starts managed backends)
    /// and removes them.
    VmmHotplug,
    /// `cloister`'s console writer: moves the guest's serial output to stdout or its file.
    VmmConsole,
    /// `cloister`'s API server: takes HTTP requests on the API socket (bound before it
    /// confines itself), answers what it can from the VMM's state and hands the rest to the
    /// main and hot-plug threads.
    VmmApi,
    /// `vhost-user-blk`'s main thread (the serve loop), and the vhost-user control thread it
    /// starts for each connection, which keeps this policy.
    BlkMain,
    /// A `vhost-user-blk` queue worker: guest requests to io_uring or preadv/pwritev.
    BlkWorker,
    /// `vhost-user-net`'s main thread (the serve loop, or the client's connect loop), and the
    /// vhost-user control thread it starts for each connection.
    NetMain,
    /// A `vhost-user-net` worker: frames between its queue pairs and their tap queues, and
    /// (thread 0) the control queue.
    NetWorker,
    /// A backend's signal thread: SIGTERM/SIGINT become a stop request.
    BackendSignals,
}

impl ThreadRole {
    /// Every role, for listings and tests.
    pub const ALL: [ThreadRole; 12] = [
        ThreadRole::VmmMain,
        ThreadRole::VmmVcpu,
        ThreadRole::VmmWatchdog,
        ThreadRole::VmmDeviceControl,
        ThreadRole::VmmHotplug,
        ThreadRole::VmmConsole,
        ThreadRole::VmmApi,
        ThreadRole::BlkMain,
        ThreadRole::BlkWorker,
        ThreadRole::NetMain,
        ThreadRole::NetWorker,
        ThreadRole::BackendSignals,
    ];

    /// The name used in messages and in the test hooks.
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::VmmMain => "vmm-main",
            ThreadRole::VmmVcpu => "vmm-vcpu",
            ThreadRole::VmmWatchdog => "vmm-watchdog",
            ThreadRole::VmmDeviceControl => "vmm-device-control",
            ThreadRole::VmmHotplug => "vmm-hotplug",
            ThreadRole::VmmConsole => "vmm-console",
            ThreadRole::VmmApi => "vmm-api",
            ThreadRole::BlkMain => "blk-main",
            ThreadRole::BlkWorker => "blk-worker",
            ThreadRole::NetMain => "net-main",
            ThreadRole::NetWorker => "net-worker",
            ThreadRole::BackendSignals => "backend-signals",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The role's rules: the base plus its own groups.
    pub fn rules(self) -> Vec<Rule> {
        let groups: Vec<Vec<Rule>> = match self {
            // It starts every thread it will have (vCPUs, watchdogs, console writer) before it
            // confines itself.
            ThreadRole::VmmMain => vec![base(), vmm_main()],
            ThreadRole::VmmVcpu => vec![base(), vmm_vcpu()],
            ThreadRole::VmmWatchdog => vec![base(), vmm_watchdog()],
            ThreadRole::VmmDeviceControl => vec![base(), vmm_device_control()],
            // Inherited by the device threads it starts, until they narrow it.
            ThreadRole::VmmHotplug => vec![
                base(),
                spawns_threads(),
                vmm_hotplug(),
                vmm_server_mode(),
                vmm_watchdog(),
                vmm_device_control(),
            ],
            ThreadRole::VmmConsole => vec![base(), vmm_console()],
            ThreadRole::VmmApi => vec![base(), vmm_api()],
            ThreadRole::BlkMain => vec![
                base(),
                spawns_threads(),
                backend_main(),
                backend_connect(),
                vhost_user_control(),
                inflight_region(),
                // Inherited by the threads it starts, until they narrow it.
                vring_worker(),
                blk_io(),
                backend_signals(),
                no_new_files(),
            ],
            ThreadRole::BlkWorker => vec![base(), vring_worker(), blk_io(), no_new_files()],
            ThreadRole::NetMain => vec![
                base(),
                spawns_threads(),
                backend_main(),
                backend_connect(),
                vhost_user_control(),
                tap_settings(),
                // Inherited by the threads it starts, until they narrow it.
                vring_worker(),
                net_io(),
                backend_signals(),
                no_new_files(),
            ],
            ThreadRole::NetWorker => vec![
                base(),
                vring_worker(),
                net_io(),
                tap_settings(),
                no_new_files(),
            ],
            ThreadRole::BackendSignals => vec![base(), backend_signals(), no_new_files()],
        };
        groups.into_iter().flatten().collect()
    }

    /// How many distinct system calls the role may make.
    pub fn allowed_count(self) -> usize {
        Merged::new(&self.rules(), false).allowed_count()
    }
}

/// The filters for `role` in `mode`, in installation order.
pub fn compile(role: ThreadRole, mode: SeccompMode) -> Result<(Vec<BpfProgram>, usize), Error> {
    let log_mode = mode == SeccompMode::Log;
    let merged = Merged::new(&role.rules(), log_mode);
    let build = |source| Error::Build {
        role: role.name(),
        source,
    };
    let arch = seccompiler::TargetArch::x86_64;
    let mut programs = Vec::new();
    // Refusals first: a filter per errno, letting everything else through to the allow-list.
    for (errno, nrs) in merged.refusals() {
        let rules = nrs.iter().map(|&nr| (nr, Vec::new())).collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch,
        )
        .map_err(build)?;
        programs.push(filter.try_into().map_err(build)?);
    }
    let allow = SeccompFilter::new(
        merged.allow_rules().map_err(build)?,
        // Both modes trap; the SIGSYS handler reports, then dies (true) or makes the call
        // itself (log).
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch,
    )
    .map_err(build)?;
    let mut program: BpfProgram = allow.try_into().map_err(build)?;
    if log_mode {
        program = trap::with_passthrough(program);
    }
    programs.push(program);
    Ok((programs, merged.allowed_count()))
}

/// Installs `role`'s filters on the calling thread; returns how many system calls it allows.
pub(crate) fn install(role: ThreadRole, mode: SeccompMode) -> Result<usize, Error> {
    let (programs, count) = compile(role, mode)?;
    for program in &programs {
        seccompiler::apply_filter(program).map_err(|source| Error::Install {
            role: role.name(),
            source,
        })?;
    }
    Ok(count)
}

/// `PROT_EXEC` clear in argument `index`: no new executable memory, so injected code cannot
/// be made runnable.
fn no_exec(index: u8) -> crate::rules::Arg {
    lacks_bits(index, libc::PROT_EXEC as u64)
}

fn ioctl_code(dir: u64, nr: u64, size: usize) -> u64 {
    const KVMIO: u64 = 0xAE;
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

fn io(nr: u64) -> u64 {
    ioctl_code(0, nr, 0)
}

fn iow<T>(nr: u64) -> u64 {
    ioctl_code(1, nr, std::mem::size_of::<T>())
}

fn ior<T>(nr: u64) -> u64 {
    ioctl_code(2, nr, std::mem::size_of::<T>())
}

/// The KVM ioctls a running VM needs, by name, for the policies and their tests.
pub mod kvm {
    use super::{io, ior, iow};
    use kvm_bindings::{
        kvm_clock_data, kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_regs, kvm_sregs,
    };

    pub fn run() -> u64 {
        io(0x80)
    }
    pub fn get_regs() -> u64 {
        ior::<kvm_regs>(0x81)
    }
    pub fn get_sregs() -> u64 {
        ior::<kvm_sregs>(0x83)
    }
    pub fn irqfd() -> u64 {
        iow::<kvm_irqfd>(0x76)
    }
    pub fn ioeventfd() -> u64 {
        iow::<kvm_ioeventfd>(0x79)
    }
    pub fn set_gsi_routing() -> u64 {
        iow::<kvm_irq_routing>(0x6a)
    }
    pub fn set_clock() -> u64 {
        iow::<kvm_clock_data>(0x7b)
    }
    pub fn get_clock() -> u64 {
        ior::<kvm_clock_data>(0x7c)
    }
}

/// Every thread of every process.
fn base() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(
            SYS_futex,
            "mutexes, condition variables, thread joins (std, glibc)",
        ),
        allow(
            SYS_rt_sigreturn,
            "return from a signal handler (vCPU kick, SIGSYS report)",
        ),
        allow(
            SYS_rt_sigprocmask,
            "glibc blocks signals around thread start and exit",
        ),
        allow(
            SYS_sigaltstack,
            "std removes a thread's alternate signal stack when it ends",
        ),
        allow(
            SYS_restart_syscall,
            "a sleep or wait resumed after a stop signal (SIGSTOP/SIGCONT)",
        ),
        allow_if(
            SYS_mmap,
            vec![no_exec(2)],
            "the allocator, thread stacks, and (backends) guest memory; never executable",
        ),
        allow_if(
            SYS_mprotect,
            vec![no_exec(2)],
            "glibc's malloc grows its heaps, thread stack guard pages; never executable",
        ),
        allow(
            SYS_munmap,
            "the allocator, thread stacks, guest memory tables that are replaced",
        ),
        allow(SYS_mremap, "the allocator grows large blocks in place"),
        allow(
            SYS_madvise,
            "glibc releases an ended thread's stack and trims freed memory",
        ),
        allow(SYS_brk, "glibc's main heap"),
        allow(
            SYS_write,
            "log lines on stderr (and the forbidden-call report itself), eventfd signalling",
        ),
        allow(SYS_exit, "a thread ends"),
        allow(SYS_exit_group, "the process ends"),
        allow(
            SYS_gettid,
            "glibc and std ask for the thread id (locks, thread names)",
        ),
        allow(SYS_getrandom, "std seeds each thread's HashMap hasher"),
        allow(SYS_sched_yield, "spinning locks back off"),
        allow(
            SYS_clock_gettime,
            "the vDSO falls back to the system call on some clock sources",
        ),
        allow(SYS_clock_nanosleep, "std::thread::sleep"),
        allow(SYS_nanosleep, "std::thread::sleep on older glibc"),
        allow_values(
            SYS_prctl,
            0,
            &[PR_GET_NAME as u64],
            "the SIGSYS report names the thread",
        ),
    ]
}

/// glibc's internal signal for broadcasting set*id calls to every thread (`__SIGRTMIN + 1`).
const SIGSETXID: u64 = 33;

/// Threads that start other threads after entering the sandbox. The new thread runs these
/// before it can install its own, narrower filter, and then needs the calls that do that.
fn spawns_threads() -> Vec<Rule> {
    use libc::*;
    vec![
        allow_if(SYS_clone, vec![has_bits(0, CLONE_THREAD as u64)], "threads only (CLONE_THREAD): never a new process"),
        refuse(SYS_clone3, ENOSYS, Refusal::Fallback, "glibc then uses clone, whose flags the filter can check (clone3 passes them in memory)"),
        allow_values(SYS_rt_sigaction, 0, &[SIGSETXID], "glibc installs its set*id broadcast handler when it creates the process's first thread; no other signal"),
        allow(SYS_set_robust_list, "glibc, in each new thread"),
        allow(SYS_rseq, "glibc registers restartable sequences in each new thread"),
        allow(SYS_sched_getaffinity, "glibc, in each new thread"),
        allow_values(SYS_prctl, 0, &[PR_SET_NAME as u64], "std names each new thread"),
        // A new thread confines itself: each of these can only take rights away.
        allow_values(
            SYS_prctl,
            0,
            &[PR_SET_NO_NEW_PRIVS as u64, PR_CAPBSET_DROP as u64, PR_CAP_AMBIENT as u64, PR_SET_SECUREBITS as u64],
            "a new thread drops its privileges (it can only lose them)",
        ),
        allow(SYS_capget, "a new thread looks at its capabilities before dropping them"),
        allow(SYS_capset, "a new thread drops its capabilities (without CAP_SETPCAP it can only lower them)"),
        allow_values(SYS_seccomp, 0, &[SECCOMP_SET_MODE_FILTER as u64], "a new thread stacks its own, narrower filter"),
        allow(SYS_landlock_create_ruleset, "a new thread makes its own, narrower Landlock domain"),
        allow(SYS_landlock_restrict_self, "a new thread makes its own, narrower Landlock domain"),
    ]
}

fn vmm_main() -> Vec<Rule> {
    use libc::*;
    let kick = SIGRTMIN() as u64;
    vec![
        allow(SYS_poll, "the main loop waits on the exit eventfd, the signalfd, stdin, backend sockets and pidfds"),
        allow(SYS_ppoll, "poll on libcs that implement it with ppoll"),
        allow(SYS_read, "the signalfd, stdin for the guest console, eventfds, the spawner's replies"),
        allow(SYS_close, "descriptors dropped at exit, a backend connection that hung up"),
        allow(SYS_eventfd2, "the console's 'FIFO drained' eventfd"),
        allow_values(SYS_fcntl, 1, &[F_GETFD as u64, F_SETFD as u64, F_GETFL as u64, F_SETFL as u64, F_DUPFD_CLOEXEC as u64], "descriptor flags and duplicates (eventfds, sockets)"),
        allow_values(SYS_ioctl, 1, &[TCGETS, TCSETS], "restores the terminal's settings when the VM ends"),
        allow_values(SYS_ioctl, 1, &[kvm::ioeventfd(), kvm::irqfd(), kvm::set_gsi_routing()], "devices are unwired from KVM as they are dropped"),
        allow_values(SYS_tgkill, 2, &[kick], "kicks the vCPU threads out of KVM_RUN with the kick signal, and nothing else"),
        allow_values(SYS_ioctl, 1, &[kvm::get_clock(), kvm::set_clock()], "keeps the guest's clock across a pause"),
        allow(SYS_getpid, "glibc's pthread_kill asks for the pid it passes to tgkill"),
        allow(SYS_shutdown, "ends the backend connections when the VM stops, and one that went bad"),
        allow_if(SYS_openat, vec![has_bits(2, O_DIRECTORY as u64)], "opens the runtime directory to remove it at exit: directories only (O_DIRECTORY), and Landlock limits them to that one"),
        allow(SYS_getdents64, "lists the runtime directory to remove it"),
        allow(SYS_unlinkat, "removes the runtime directory and the sockets left in it"),
        allow(SYS_newfstatat, "std checks file types while removing the runtime directory"),
        allow(SYS_statx, "std checks file types while removing the runtime directory"),
        allow(SYS_fstat, "std checks file types while removing the runtime directory"),
    ]
}

fn vmm_vcpu() -> Vec<Rule> {
    use libc::*;
    vec![
        allow_values(SYS_ioctl, 1, &[kvm::run()], "runs the guest"),
        allow_values(SYS_ioctl, 1, &[kvm::get_regs(), kvm::get_sregs()], "reads the registers to describe a vCPU failure"),
        allow_values(SYS_ioctl, 1, &[kvm::ioeventfd(), kvm::irqfd(), kvm::set_gsi_routing()], "the guest moves a BAR, programs MSI-X or activates a device: notifications and interrupts are rewired in KVM"),
        allow(SYS_eventfd2, "an MSI-X vector without an interrupt eventfd yet gets one"),
        allow_values(SYS_fcntl, 1, &[F_GETFD as u64, F_DUPFD_CLOEXEC as u64], "duplicates the eventfds a device start hands to the backend"),
        allow(SYS_close, "eventfds dropped on a device reset"),
        allow(SYS_read, "eventfds, when an interrupt has to be delivered the slow way"),
        allow(SYS_shutdown, "a device removed while this vCPU was in one of its registers is dropped here: its connection is shut down"),
        allow(SYS_poll, "the guest reads MSI-X pending bits: whether a masked vector's eventfd was signalled (zero timeout)"),
        allow(SYS_ppoll, "poll on libcs that implement it with ppoll"),
    ]
}

fn vmm_watchdog() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(
            SYS_shutdown,
            "shuts a vhost-user socket down when a request outlives its deadline",
        ),
        allow(
            SYS_close,
            "drops its socket duplicate when the connection goes",
        ),
    ]
}

/// The hot-plug thread: connecting to and negotiating with a new device's backend, wiring it
/// into KVM, asking the spawner for managed backends, and undoing all of it on removal.
fn vmm_hotplug() -> Vec<Rule> {
    use libc::*;
    vec![
        allow_values(SYS_socket, 0, &[AF_UNIX as u64], "a unix socket to a new device's backend; no other family"),
        allow(SYS_connect, "connects to a new device's backend (Landlock limits where, from ABI 9)"),
        allow(SYS_sendmsg, "vhost-user negotiation with a new device's backend"),
        allow(SYS_recvmsg, "vhost-user replies"),
        allow(SYS_shutdown, "ends a removed device's connection"),
        allow(SYS_read, "the spawner's replies"),
        allow(SYS_close, "descriptors of removed devices and failed connections"),
        allow(SYS_eventfd2, "a new device's notification, interrupt and failure eventfds"),
        allow_values(SYS_fcntl, 1, &[F_GETFD as u64, F_DUPFD_CLOEXEC as u64], "duplicates of a new connection's socket; std checks descriptors it closes (debug builds)"),
        allow_values(SYS_ioctl, 1, &[FIONBIO], "a connected socket is made blocking again (std's set_nonblocking)"),
        allow(SYS_pidfd_open, "watches a new managed backend's exit"),
        allow_values(SYS_ioctl, 1, &[kvm::ioeventfd(), kvm::irqfd(), kvm::set_gsi_routing()], "a removed device's notifications and interrupts are unwired from KVM"),
        allow(SYS_unlink, "removes a removed managed backend's socket file (Landlock: the runtime directory only)"),
        allow(SYS_unlinkat, "unlink on libcs that implement it with unlinkat"),
    ]
}

/// Server mode (`vhost_mode=server`): the hot-plug thread listens again on the path of a
/// device whose backend was lost, for the backend started again to connect.
fn vmm_server_mode() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(
            SYS_bind,
            "listens again on a server-mode device's socket path (Landlock: its directory only)",
        ),
        allow(SYS_listen, "the same socket"),
        allow(SYS_accept4, "takes the restarted backend's connection"),
        allow(SYS_poll, "waits a moment for that connection"),
        allow(SYS_ppoll, "poll on libcs that implement it with ppoll"),
        allow(
            SYS_statx,
            "checks that what is in the way at the path is a stale socket before replacing it",
        ),
        allow(SYS_newfstatat, "the same, where std falls back to fstatat"),
    ]
}

/// A device's control thread: the vhost-user requests that start and stop its queues.
fn vmm_device_control() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(
            SYS_sendmsg,
            "vhost-user requests (with eventfds and the memory table's memfds)",
        ),
        allow(SYS_recvmsg, "vhost-user replies"),
        allow(
            SYS_shutdown,
            "drops a backend connection that failed a request",
        ),
        allow(
            SYS_close,
            "eventfds handed over, and the connection when the device goes",
        ),
        allow_values(
            SYS_fcntl,
            1,
            &[F_GETFD as u64],
            "std checks that a descriptor it closes is open (debug builds)",
        ),
    ]
}

/// The console writer; the base has write(2), its job.
fn vmm_console() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(SYS_close, "closes the console file when the VM ends"),
        allow_values(
            SYS_fcntl,
            1,
            &[F_GETFD as u64],
            "std checks that a descriptor it closes is open (debug builds)",
        ),
    ]
}

/// The API server: its socket is bound before it confines itself; it opens nothing.
fn vmm_api() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(SYS_accept4, "takes a client's connection"),
        allow(
            SYS_recvmsg,
            "a request, with the descriptors a client passes (tap queues)",
        ),
        allow(
            SYS_sendto,
            "the reply (std writes to a Unix stream with send, MSG_NOSIGNAL)",
        ),
        allow(
            SYS_close,
            "a client's connection, and descriptors no request used",
        ),
        allow_values(
            SYS_setsockopt,
            1,
            &[SOL_SOCKET as u64],
            "a receive timeout on each connection, so a slow client is dropped",
        ),
        allow(SYS_getpid, "vmm.ping reports the process id"),
        allow_values(
            SYS_fcntl,
            1,
            &[F_GETFD as u64],
            "std checks that a descriptor it closes is open (debug builds)",
        ),
    ]
}

/// A backend's serve loop.
fn backend_main() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(SYS_poll, "waits for a frontend or a stop request"),
        allow(SYS_ppoll, "poll on libcs that implement it with ppoll"),
        allow(SYS_accept4, "accepts the frontend on the socket bound before the sandbox"),
        allow(SYS_unlink, "removes the socket file when the daemon stops (Landlock limits it to the socket's directory)"),
        allow(SYS_epoll_create1, "vhost-user-backend makes an epoll per worker thread for each connection"),
        allow(SYS_eventfd2, "exit events for each connection's worker threads"),
    ]
}

/// What the vhost-user control thread (inside vhost-user-backend) does with the frontend's
/// requests.
fn vhost_user_control() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(
            SYS_recvmsg,
            "vhost-user requests, with the memory table's and vrings' descriptors",
        ),
        allow(SYS_sendmsg, "vhost-user replies"),
        allow(SYS_shutdown, "ends a connection"),
        allow(
            SYS_close,
            "descriptors of an old memory table, vring eventfds, a connection",
        ),
        allow(
            SYS_epoll_ctl,
            "registers vring kick eventfds and io_uring completions with the workers' epolls",
        ),
        allow_values(
            SYS_fcntl,
            1,
            &[
                F_GETFD as u64,
                F_SETFD as u64,
                F_GETFL as u64,
                F_SETFL as u64,
                F_DUPFD_CLOEXEC as u64,
            ],
            "descriptor flags and duplicates (sockets, eventfds)",
        ),
        allow_values(
            SYS_ioctl,
            1,
            &[FIONBIO],
            "makes the accepted socket non-blocking",
        ),
        allow(
            SYS_dup,
            "vhost-user-backend duplicates descriptors it keeps",
        ),
        allow(SYS_fstat, "sizes a memory table region's descriptor"),
        refuse(
            SYS_getsockopt,
            EPERM,
            Refusal::Policy,
            "vhost-user-backend checks a socket the frontend hands over (SET_BACKEND_REQ_FD, GPU_SET_SOCKET; neither is offered): the request fails and the connection ends, not the daemon",
        ),
    ]
}

/// The in-flight region a frontend asks for (`GET_INFLIGHT_FD`): made by the relay thread.
fn inflight_region() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(
            SYS_memfd_create,
            "makes the in-flight region the frontend keeps across backend restarts",
        ),
        allow(SYS_ftruncate, "sizes the in-flight region"),
    ]
}

/// A vring worker thread of vhost-user-backend.
fn vring_worker() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(
            SYS_epoll_wait,
            "waits for kicks, I/O completions and the exit event",
        ),
        allow(
            SYS_epoll_pwait,
            "epoll_wait on libcs that implement it with epoll_pwait",
        ),
        allow(SYS_read, "consumes kick and exit eventfds"),
        allow(
            SYS_close,
            "drops the last reference to a replaced memory table (its mapping and descriptor)",
        ),
        allow_values(
            SYS_fcntl,
            1,
            &[F_GETFD as u64],
            "std checks that a descriptor it closes is open (debug builds), e.g. a replaced memory table's",
        ),
    ]
}

/// The block device's I/O, on the image opened before the sandbox.
fn blk_io() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(SYS_io_uring_enter, "submits requests and reaps completions (the ring only takes reads, writes, fsync and fallocate on the image: IORING_REGISTER_RESTRICTIONS)"),
        allow(SYS_preadv, "the sync engine, and requests io_uring cannot take"),
        allow(SYS_preadv2, "a lone buffered read tries the page cache first (RWF_NOWAIT)"),
        allow(SYS_pwritev, "buffered writes go straight to the page cache, and the sync engine"),
        allow(SYS_fdatasync, "VIRTIO_BLK_T_FLUSH"),
        allow(SYS_fallocate, "VIRTIO_BLK_T_DISCARD and WRITE_ZEROES (punch hole, zero range)"),
        allow(SYS_poll, "a worker sharing its thread with other queues checks the thread's epoll for their events (never waits)"),
        allow(SYS_ppoll, "poll on libcs that implement it with ppoll"),
    ]
}

/// A client backend (`--client`) connects to the frontend's socket, again after each
/// disconnect (Landlock allows that one directory only); and every connection goes through a
/// relay (`cloister_backends::relay`) over an abstract socket of the process's own.
fn backend_connect() -> Vec<Rule> {
    use libc::*;
    vec![
        allow_values(
            SYS_socket,
            0,
            &[AF_UNIX as u64],
            "a unix socket to connect to the frontend (--client)",
        ),
        allow(SYS_connect, "connects to the frontend's socket (--client), and the relay to its own abstract socket"),
        allow(SYS_bind, "the relay's abstract socket (no file) between a frontend and vhost-user-backend"),
        allow(SYS_listen, "the relay's abstract socket"),
    ]
}

/// The tap ioctls, on the descriptors opened before the sandbox: nothing that needs
/// CAP_NET_ADMIN, which the process no longer has anyway.
fn tap_settings() -> Vec<Rule> {
    use libc::SYS_ioctl;
    vec![allow_values(
        SYS_ioctl,
        1,
        &[0x4004_54d8, 0x4004_54d0, 0x4004_54d9],
        "TUNSETVNETHDRSZ and TUNSETOFFLOAD when the driver acknowledges its features or changes its offloads, TUNSETQUEUE when it changes the queue pairs in use",
    )]
}

/// Frames between the guest and the tap.
fn net_io() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(SYS_read, "reads a frame from a tap queue"),
        allow(
            SYS_readv,
            "reads a frame from a tap queue straight into the guest's receive buffers",
        ),
        allow(
            SYS_io_uring_enter,
            "sends a batch of frames (the ring only takes writev on its tap queue: IORING_REGISTER_RESTRICTIONS)",
        ),
        allow(SYS_poll, "a worker polling its transmit queue checks the thread's epoll for other events (never waits)"),
        allow(SYS_ppoll, "poll on libcs that implement it with ppoll"),
        allow(
            SYS_writev,
            "writes a frame to a tap queue, straight from guest memory",
        ),
    ]
}

/// A backend's signal thread.
fn backend_signals() -> Vec<Rule> {
    use libc::*;
    vec![
        allow(SYS_rt_sigtimedwait, "sigwait for SIGTERM and SIGINT"),
        allow(
            SYS_shutdown,
            "shuts the live connection down on a stop request",
        ),
        allow(
            SYS_unlink,
            "removes the socket file when it ends the process itself (a second signal, a stop past its grace)",
        ),
    ]
}

/// A backend opens nothing once it serves: a compromised one cannot reach new files.
fn no_new_files() -> Vec<Rule> {
    use libc::*;
    let why = "no new files once serving; EACCES rather than a kill, so a library that probes for a file carries on";
    vec![
        refuse(SYS_open, EACCES, Refusal::Policy, why),
        refuse(SYS_openat, EACCES, Refusal::Policy, why),
        refuse(SYS_openat2, EACCES, Refusal::Policy, why),
        refuse(SYS_creat, EACCES, Refusal::Policy, why),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_says_why() {
        for role in ThreadRole::ALL {
            for rule in role.rules() {
                assert!(
                    rule.why().len() > 10,
                    "{}: rule for {} has no reason",
                    role.name(),
                    rule.nr()
                );
            }
        }
    }

    /// docs/threat-model.md quotes each role's size in its table: "... (`ROLE`) | N | ...".
    #[test]
    fn policy_sizes_are_the_documented_ones() {
        let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/threat-model.md");
        let text = std::fs::read_to_string(doc).unwrap();
        for role in ThreadRole::ALL {
            let marker = format!("(`{}`) |", role.name());
            let quoted = text
                .lines()
                .find_map(|l| l.split_once(&marker))
                .and_then(|(_, rest)| rest.split('|').next())
                .and_then(|n| n.trim().parse::<usize>().ok());
            assert_eq!(
                quoted,
                Some(role.allowed_count()),
                "{doc}: the size quoted for {}",
                role.name()
            );
        }
    }

    #[test]
    fn kvm_ioctl_numbers() {
        // As strace prints them.
        assert_eq!(kvm::run(), 0xAE80);
        assert_eq!(kvm::get_regs(), 0x8090_AE81);
        assert_eq!(kvm::get_sregs(), 0x8138_AE83);
        assert_eq!(kvm::irqfd(), 0x4020_AE76);
        assert_eq!(kvm::ioeventfd(), 0x4040_AE79);
        assert_eq!(kvm::set_gsi_routing(), 0x4008_AE6A);
    }

    #[test]
    fn every_role_compiles_in_every_mode() {
        for role in ThreadRole::ALL {
            for mode in [SeccompMode::True, SeccompMode::Log] {
                let (programs, count) = compile(role, mode).unwrap();
                assert!(!programs.is_empty());
                assert!(
                    programs.iter().all(|p| p.len() < 4096),
                    "BPF programs are limited to 4096 instructions"
                );
                assert!(count > 10, "{}: {count}", role.name());
            }
            assert_eq!(ThreadRole::from_name(role.name()), Some(role));
        }
    }

    #[test]
    fn narrower_roles_are_within_their_creators() {
        // A worker, a signal thread and the control thread run under their backend's main
        // filter until they install theirs: what they need must be in it.
        for (creator, roles) in [
            (
                ThreadRole::BlkMain,
                [ThreadRole::BlkWorker, ThreadRole::BackendSignals],
            ),
            (
                ThreadRole::NetMain,
                [ThreadRole::NetWorker, ThreadRole::BackendSignals],
            ),
        ] {
            let main = Merged::new(&creator.rules(), false);
            for role in roles {
                for rule in role.rules() {
                    if matches!(rule, Rule::Refuse { .. }) {
                        continue;
                    }
                    assert!(
                        main.allows(rule.nr()),
                        "{} needs {} which {} does not allow",
                        role.name(),
                        crate::syscall_names::name(rule.nr()).unwrap_or("?"),
                        creator.name()
                    );
                }
            }
        }
    }

    #[test]
    fn blk_roles_refuse_open_and_vmm_threads_cannot_fork() {
        for role in [
            ThreadRole::BlkMain,
            ThreadRole::BlkWorker,
            ThreadRole::NetMain,
            ThreadRole::NetWorker,
            ThreadRole::BackendSignals,
        ] {
            let refused: Vec<i64> = Merged::new(&role.rules(), false)
                .refusals()
                .flat_map(|(_, nrs)| nrs.to_vec())
                .collect();
            assert!(refused.contains(&libc::SYS_openat), "{}", role.name());
        }
        assert_none_allows(
            &ThreadRole::ALL,
            &[
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_setuid,
            ],
        );
    }

    fn assert_none_allows(roles: &[ThreadRole], syscalls: &[i64]) {
        for role in roles {
            let merged = Merged::new(&role.rules(), false);
            for &nr in syscalls {
                assert!(!merged.allows(nr), "{} allows {nr}", role.name());
            }
        }
    }

    #[test]
    fn vcpus_never_talk_to_backends() {
        // A slow or hostile backend must not be able to hold a vCPU: vhost-user requests are
        // the device control threads'.
        assert_none_allows(
            &[ThreadRole::VmmVcpu],
            &[libc::SYS_sendmsg, libc::SYS_recvmsg],
        );
    }

    #[test]
    fn only_threads_that_start_threads_may_confine_new_ones() {
        // cloister's main thread starts all of its threads before it confines itself; the VMM's
        // other threads never start any.
        assert_none_allows(
            &[
                ThreadRole::VmmMain,
                ThreadRole::VmmVcpu,
                ThreadRole::VmmWatchdog,
                ThreadRole::VmmDeviceControl,
                ThreadRole::VmmConsole,
                ThreadRole::VmmApi,
            ],
            &[
                libc::SYS_clone,
                libc::SYS_seccomp,
                libc::SYS_landlock_create_ruleset,
                libc::SYS_landlock_restrict_self,
                libc::SYS_capset,
            ],
        );
        assert!(Merged::new(&ThreadRole::BlkMain.rules(), false).allows(libc::SYS_clone));
    }
}

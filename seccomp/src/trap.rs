//! Naming a forbidden system call.
//!
//! Every filter answers a call outside its policy with `SECCOMP_RET_TRAP`: the kernel skips
//! the call and sends SIGSYS, whose handler here writes one line to stderr naming the call
//! (number and name), the thread and its role. Then:
//! - `--seccomp=true`: the handler makes another forbidden call. SIGSYS is blocked while its
//!   handler runs, so the kernel resets it to its default action and the process dies of
//!   SIGSYS, as with `SECCOMP_RET_KILL_PROCESS`, but after saying why.
//! - `--seccomp=log`: the handler makes the call itself, through a trampoline whose address
//!   the log-mode filter lets through unconditionally, and puts the result in the
//!   interrupted context: the program carries on as if the call had been allowed. Each
//!   (thread role, system call) pair is reported once.
//!
//! The handler is async-signal-safe: no allocation, no locks, only `write`, `prctl` and the
//! trampoline.

use std::cell::Cell;
use std::ffi::c_void;
use std::io;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicU8, Ordering};

use seccompiler::{sock_filter, BpfProgram};

use crate::line::Line;
use crate::policy::ThreadRole;
use crate::syscall_names;
use crate::SeccompMode;

static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);
const MODE_UNSET: u8 = 0;
const MODE_TRUE: u8 = 1;
const MODE_LOG: u8 = 2;

/// The process name (a `&'static str` leaked into a thin pointer: `&'static &'static str`).
static PROCESS: AtomicPtr<&'static str> = AtomicPtr::new(std::ptr::null_mut());

thread_local! {
    /// This thread's role, as an index into `ThreadRole::ALL` plus one (0: none yet, the
    /// thread runs under the filter it inherited). Const-initialised without a destructor, so
    /// the handler reads it with a plain TLS load.
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

/// One bit per (role, system call) already reported in log mode.
const ROLE_SLOTS: usize = ThreadRole::ALL.len() + 1;
const NR_BITS: usize = 512;
static REPORTED: [AtomicU64; ROLE_SLOTS * NR_BITS / 64] =
    [const { AtomicU64::new(0) }; ROLE_SLOTS * NR_BITS / 64];

pub(crate) fn configure(process: &'static str, mode: SeccompMode) {
    let name: &'static &'static str = Box::leak(Box::new(process));
    PROCESS.store(std::ptr::from_ref(name).cast_mut(), Ordering::Release);
    let mode = match mode {
        SeccompMode::True => MODE_TRUE,
        SeccompMode::Log => MODE_LOG,
        SeccompMode::False => MODE_UNSET,
    };
    MODE.store(mode, Ordering::Release);
}

pub(crate) fn set_thread_role(role: &'static str) {
    let index = ThreadRole::ALL
        .iter()
        .position(|r| r.name() == role)
        .map_or(0, |i| i as u8 + 1);
    ROLE.with(|r| r.set(index));
}

/// Installs the SIGSYS handler (process-wide).
pub(crate) fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we fill in a handler with the SA_SIGINFO
    // signature and an empty mask (SIGSYS itself is blocked while it runs: no SA_NODEFER).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

// The trampoline of log mode: `passthrough(nr, a0, ..., a5)` makes system call `nr`. The
// log-mode filter allows any call whose return address is `cloister_seccomp_passthrough_ret`.
std::arch::global_asm!(
    ".pushsection .text.cloister_seccomp_passthrough,\"ax\",@progbits",
    ".globl cloister_seccomp_passthrough",
    ".hidden cloister_seccomp_passthrough",
    ".type cloister_seccomp_passthrough,@function",
    "cloister_seccomp_passthrough:",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "mov rdx, rcx",
    "mov r10, r8",
    "mov r8, r9",
    "mov r9, [rsp + 8]",
    "syscall",
    ".globl cloister_seccomp_passthrough_ret",
    ".hidden cloister_seccomp_passthrough_ret",
    "cloister_seccomp_passthrough_ret:",
    "ret",
    ".size cloister_seccomp_passthrough, . - cloister_seccomp_passthrough",
    ".popsection",
);

extern "C" {
    fn cloister_seccomp_passthrough(
        nr: i64,
        a0: u64,
        a1: u64,
        a2: u64,
        a3: u64,
        a4: u64,
        a5: u64,
    ) -> i64;
    static cloister_seccomp_passthrough_ret: u8;
}

fn passthrough_address() -> u64 {
    // Only the address of the label is taken.
    std::ptr::addr_of!(cloister_seccomp_passthrough_ret) as u64
}

/// A system call through the trampoline (allowed by the log-mode filter, or by none).
fn passthrough(nr: i64, args: [u64; 6]) -> i64 {
    // SAFETY: a raw system call; callers pass what the interrupted code passed, or calls
    // with valid pointers of their own.
    unsafe {
        cloister_seccomp_passthrough(nr, args[0], args[1], args[2], args[3], args[4], args[5])
    }
}

/// Prefixes `program` with "a call from the trampoline is allowed" (log mode only: it would
/// hand a compromised process a way around the filter).
pub(crate) fn with_passthrough(program: BpfProgram) -> BpfProgram {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    // struct seccomp_data: nr (4), arch (4), instruction_pointer (8, the address after the
    // `syscall` instruction), args.
    const IP_LOW: u32 = 8;
    const IP_HIGH: u32 = 12;
    let ip = passthrough_address();
    let stmt = |code, k| sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k, jf| sock_filter {
        code: JEQ_K,
        jt: 0,
        jf,
        k,
    };
    let mut out = vec![
        stmt(LD_W_ABS, IP_LOW),
        jeq(ip as u32, 3),
        stmt(LD_W_ABS, IP_HIGH),
        jeq((ip >> 32) as u32, 1),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ];
    out.extend(program);
    out
}

/// `struct siginfo` as filled in for SIGSYS (`_sigsys` in the kernel's union).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut c_void,
    syscall: i32,
    arch: u32,
}

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;

/// Writes `line` to stderr, through the trampoline when a SIGSYS handler must not trap again.
fn write_line(line: &Line, through_trampoline: bool) {
    let bytes = line.bytes();
    if through_trampoline {
        let args = [2, bytes.as_ptr() as u64, bytes.len() as u64, 0, 0, 0];
        passthrough(libc::SYS_write, args);
    } else {
        line.write_stderr();
    }
}

/// The calling thread's name (`comm`), through PR_GET_NAME, which every policy allows.
fn thread_name(buf: &mut [u8; 16], through_trampoline: bool) -> &[u8] {
    let args = [
        libc::PR_GET_NAME as u64,
        buf.as_mut_ptr() as u64,
        0,
        0,
        0,
        0,
    ];
    let ok = if through_trampoline {
        passthrough(libc::SYS_prctl, args) == 0
    } else {
        // SAFETY: PR_GET_NAME writes at most 16 bytes into `buf`.
        unsafe { libc::prctl(libc::PR_GET_NAME, buf.as_mut_ptr()) == 0 }
    };
    if !ok {
        return b"?";
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    &buf[..len]
}

fn first_report(role: u8, nr: i64) -> bool {
    let Ok(bit) = usize::try_from(nr) else {
        return true;
    };
    if bit >= NR_BITS {
        return true;
    }
    let index = usize::from(role) * NR_BITS + bit;
    let mask = 1u64 << (index % 64);
    REPORTED[index / 64].fetch_or(mask, Ordering::Relaxed) & mask == 0
}

extern "C" fn on_sigsys(_signal: i32, info: *mut libc::siginfo_t, context: *mut c_void) {
    let log_mode = MODE.load(Ordering::Acquire) == MODE_LOG;
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS it has the `_sigsys` layout.
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    let process = PROCESS.load(Ordering::Acquire);
    let process: &str = if process.is_null() {
        "cloister"
    } else {
        // SAFETY: set once from a leaked `&'static &'static str`.
        unsafe { *process }
    };
    let nr = i64::from(info.syscall);
    let role = ROLE.with(Cell::get);
    let mut line = Line::new();
    line.str(process).str(": seccomp: ");
    if info.code != SYS_SECCOMP {
        line.str("SIGSYS from outside the filter; stopping\n");
        write_line(&line, log_mode);
        die();
    }
    let mut name = [0u8; 16];
    line.str(if log_mode {
        "system call "
    } else {
        "forbidden system call "
    })
    .str(syscall_names::name(nr).unwrap_or("unknown"))
    .str(" (")
    .num(nr as u64)
    .str(") in thread '")
    .push(thread_name(&mut name, log_mode))
    .str("' (policy ")
    .str(match role {
        0 => "inherited from its creator",
        r => ThreadRole::ALL[usize::from(r) - 1].name(),
    })
    .str(")");
    if !log_mode {
        line.str("; stopping the process (--seccomp=log would let it run and report it)\n");
        write_line(&line, false);
        die();
    }
    if first_report(role, nr) {
        line.str(" is not in the policy; allowed (--seccomp=log)\n");
        write_line(&line, true);
    }
    // SAFETY: for SA_SIGINFO handlers the third argument is the interrupted ucontext.
    let context = unsafe { &mut *context.cast::<libc::ucontext_t>() };
    let regs = &mut context.uc_mcontext.gregs;
    let arg = |r: i32| regs[r as usize] as u64;
    let args = [
        arg(libc::REG_RDI),
        arg(libc::REG_RSI),
        arg(libc::REG_RDX),
        arg(libc::REG_R10),
        arg(libc::REG_R8),
        arg(libc::REG_R9),
    ];
    // A thread created here would start on its new stack inside this handler's frame, and a
    // vfork child would share it: those are answered ENOSYS (glibc then tries clone, which
    // the handler makes for a plain fork).
    let new_stack = nr == libc::SYS_clone && (args[1] != 0 || args[0] & libc::CLONE_VM as u64 != 0);
    let result = if nr == libc::SYS_clone3 || nr == libc::SYS_vfork || new_stack {
        -i64::from(libc::ENOSYS)
    } else {
        passthrough(nr, args)
    };
    regs[libc::REG_RAX as usize] = result;
}

/// Dies of SIGSYS: a call outside every policy, made while SIGSYS is blocked (we are in its
/// handler), makes the kernel reset SIGSYS to its default action and deliver it.
fn die() -> ! {
    const OUTSIDE_EVERY_POLICY: i64 = 1023;
    // SAFETY: raw system calls without pointer arguments.
    unsafe {
        libc::syscall(OUTSIDE_EVERY_POLICY);
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
    unreachable!("exit_group returned");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_makes_calls() {
        let pid = passthrough(libc::SYS_getpid, [0; 6]);
        assert_eq!(pid, i64::from(std::process::id()));
        let bad = passthrough(libc::SYS_close, [u64::MAX >> 33, 0, 0, 0, 0, 0]);
        assert_eq!(bad, -i64::from(libc::EBADF));
    }

    #[test]
    fn reports_each_role_and_call_once() {
        assert!(first_report(3, 500));
        assert!(!first_report(3, 500));
        assert!(first_report(2, 500));
        assert!(first_report(3, 4000));
        assert!(first_report(3, 4000));
    }
}

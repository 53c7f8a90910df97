//! A backend process cloister started: spawned in a clean state, watched through a pidfd,
//! stopped and reaped with the VM.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;

/// How long a backend gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, Error)]
pub enum ProcessError {
    #[error("cannot find {name} next to {} or in PATH", .exe_dir.display())]
    NotFound { name: String, exe_dir: PathBuf },
    #[error("cannot start {}", .0.display())]
    Spawn(PathBuf, #[source] io::Error),
    #[error("cannot watch process {0}")]
    Pidfd(u32, #[source] io::Error),
    #[error("{0} is not a backend cloister starts")]
    Refused(String),
    #[error("{0}")]
    Remote(String),
    #[error("cannot reach the spawner process")]
    Spawner(#[source] io::Error),
}

/// The backend program: next to our own executable first (a build tree or an install
/// prefix ships them together), then `PATH`.
pub fn find_program(name: &str) -> Result<PathBuf, ProcessError> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let beside = exe_dir.join(name);
    if is_executable(&beside) {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or(ProcessError::NotFound {
            name: name.to_string(),
            exe_dir,
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub struct ManagedProcess {
    child: Child,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
}

impl ManagedProcess {
    /// Starts `program` with `args`: an empty environment, stdin and stdout on /dev/null,
    /// stderr shared with us (its log lines are useful next to ours), its own process group
    /// (terminal signals meant for us do not reach it; we stop it ourselves, in order), no
    /// descriptor of ours beyond stdio, SIGTERM when we die, and its own mount and network
    /// namespaces (no network at all: a backend talks to us over a named unix socket, which
    /// works across network namespaces) and, unless we are root, its own user namespace (see
    /// [`private_namespaces`]). Where the host refuses namespaces, a warning says so and the
    /// backend starts without them.
    ///
    /// Must be called from the main thread: PR_SET_PDEATHSIG fires when the *thread* that
    /// forked the child exits, and the main thread lives as long as the process.
    /// Starts `program` with `args`; it inherits `keep` at their numbers (everything else
    /// above stderr is closed on exec).
    pub fn spawn(
        program: &Path,
        args: &[OsString],
        keep: Vec<OwnedFd>,
    ) -> Result<Self, ProcessError> {
        let raw: Vec<RawFd> = keep.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        let maps = IdMaps::ours();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (unshare, open, write, close, prctl, getppid, close_range, fcntl) on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                private_namespaces(&maps)?;
                // After unshare, which may change credentials: set it last.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // We may have died before the prctl: then nobody would ever stop the child.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                close_on_exec_from(3);
                for &fd in &raw {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| ProcessError::Spawn(program.to_path_buf(), e))?;
        let pid = child.id();
        // Not reaped yet, so the pid cannot have been reused.
        let pidfd = pidfd_open(pid).map_err(|e| ProcessError::Pidfd(pid, e))?;
        Ok(ManagedProcess {
            child,
            pidfd,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Readable once the process has exited.
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// The exit status, reaping the process if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        wait_pidfd(self.pidfd.as_raw_fd(), timeout);
        self.try_wait()
    }

    /// SIGTERM to its process group, SIGKILL after `grace`; reaps it. Returns how it ended and
    /// whether it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        if let Some(s) = self.try_wait() {
            return (Some(s), false);
        }
        self.signal_group(libc::SIGTERM);
        if let Some(s) = self.wait_timeout(grace) {
            return (Some(s), false);
        }
        self.signal_group(libc::SIGKILL);
        self.status = self.child.wait().ok();
        (self.status, true)
    }

    fn signal_group(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the group we created for this child (its pgid is its pid); the
        // child is not reaped yet, so the id still names it.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), signal) };
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

/// The contents of `/proc/self/{uid,gid}_map` for a user namespace that maps only our own
/// user and group, to themselves; formatted before the fork.
struct IdMaps {
    root: bool,
    uid: [u8; 32],
    uid_len: usize,
    gid: [u8; 32],
    gid_len: usize,
}

impl IdMaps {
    fn ours() -> Self {
        // SAFETY: geteuid and getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut maps = IdMaps {
            root: uid == 0,
            uid: [0; 32],
            uid_len: 0,
            gid: [0; 32],
            gid_len: 0,
        };
        let line = |id: u32, buf: &mut [u8; 32]| {
            let text = format!("{id} {id} 1\n");
            buf[..text.len()].copy_from_slice(text.as_bytes());
            text.len()
        };
        maps.uid_len = line(uid, &mut maps.uid);
        maps.gid_len = line(gid, &mut maps.gid);
        maps
    }
}

/// In the child, between fork and exec: new mount and network namespaces and, for a
/// non-root user, a new user namespace mapping only that user and group to themselves, so the
/// backend opens its image with exactly the permissions it had (its ids are the same) and
/// holds no capability outside its namespace. Root gets no user namespace: its backend
/// opens images root owns or may override, then drops every capability itself; inside a user
/// namespace it could no longer open images of other users.
///
/// A host that refuses namespaces (a container, `user.max_user_namespaces=0`) gets a warning
/// and a backend without them; a map that cannot be written after the user namespace exists
/// is an error (the backend could not create its socket).
fn private_namespaces(maps: &IdMaps) -> io::Result<()> {
    let user = if maps.root { 0 } else { libc::CLONE_NEWUSER };
    // SAFETY: unshare with flags only.
    if unsafe { libc::unshare(user | libc::CLONE_NEWNS | libc::CLONE_NEWNET) } != 0 {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        warn_no_namespaces(errno);
        return Ok(());
    }
    if user != 0 {
        write_proc(c"/proc/self/setgroups", b"deny")?;
        write_proc(c"/proc/self/uid_map", &maps.uid[..maps.uid_len])?;
        write_proc(c"/proc/self/gid_map", &maps.gid[..maps.gid_len])?;
    }
    Ok(())
}

/// open, write, close: async-signal-safe.
fn write_proc(path: &std::ffi::CStr, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: a NUL-terminated path and a buffer of `bytes.len()` bytes.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let error = io::Error::last_os_error();
        libc::close(fd);
        if n != bytes.len() as isize {
            return Err(error);
        }
    }
    Ok(())
}

/// One line on stderr, formatted without allocating (we are between fork and exec).
fn warn_no_namespaces(errno: i32) {
    cloister_seccomp::line::Line::new()
        .str("cloister: warning: cannot give a backend its own namespaces (unshare: errno ")
        .num(u64::from(errno.unsigned_abs()))
        .str("); it shares cloister's network\n")
        .write_stderr();
}

/// "status 1", "signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(sig)) => format!("signal {sig} ({})", signal_name(sig)),
        _ => status.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS, a seccomp violation",
        _ => "unknown signal",
    }
}

/// Waits up to `timeout` for the process behind `pidfd` to exit (the caller then looks at its
/// status; an interrupted wait just means it looks sooner).
pub(crate) fn wait_pidfd(pidfd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Marks every descriptor from `first` up close-on-exec (async-signal-safe). Ours are mostly
/// O_CLOEXEC already, but not all (eventfds, KVM's), and a backend must get none of them.
fn close_on_exec_from(first: u32) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes descriptor flags.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if r == 0 {
        return;
    }
    // Kernels before 5.11: one fcntl per possible descriptor.
    // SAFETY: sysconf and fcntl are async-signal-safe; fcntl on a closed fd just fails.
    unsafe {
        let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(0, 1 << 16) as i32;
        for fd in first as i32..max {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ManagedProcess {
        ManagedProcess::spawn(
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn exit_status_and_description() {
        let mut p = sh("exit 3");
        let s = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(describe(s), "status 3");
        let mut p = sh("kill -9 $$");
        let s = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(describe(s), "signal 9 (SIGKILL)");
    }

    #[test]
    fn clean_environment_and_no_inherited_descriptors() {
        let leak = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let fd = leak.as_raw_fd();
        // Exit 0 only if the environment is empty (sh adds a few of its own variables) and
        // our non-CLOEXEC eventfd did not make it across.
        let mut p = sh(&format!(
            "[ -z \"$HOME$USER$CARGO\" ] && [ ! -e /proc/self/fd/{fd} ] && exit 0; exit 1"
        ));
        let s = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(s.code(), Some(0));
    }

    #[test]
    fn backends_get_their_own_namespaces() {
        // Exit 0 only if the child's network and mount namespaces differ from ours.
        let ours = |ns: &str| std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let net = ours("net");
        let mnt = ours("mnt");
        let user = ours("user");
        let mut p = sh(&format!(
            "[ \"$(readlink /proc/self/ns/net)\" != '{}' ] && [ \"$(readlink /proc/self/ns/mnt)\" != '{}' ] && exit 0; exit 1",
            net.display(),
            mnt.display()
        ));
        let s = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(s.code(), Some(0));
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            // A user namespace in which we are still ourselves.
            let mut p = sh(&format!(
                "[ \"$(readlink /proc/self/ns/user)\" != '{}' ] && [ \"$(id -u)\" = {} ] && exit 0; exit 1",
                user.display(),
                unsafe { libc::geteuid() }
            ));
            let s = p.wait_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(s.code(), Some(0));
        }
    }

    #[test]
    fn stop_escalates_to_sigkill() {
        // Ignores SIGTERM.
        let mut p = sh("trap '' TERM; while :; do sleep 1; done");
        // Let the trap be installed.
        std::thread::sleep(Duration::from_millis(200));
        let (status, killed) = p.stop(Duration::from_millis(200));
        assert!(killed);
        assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
        let mut q = sh("while :; do sleep 1; done");
        let (status, killed) = q.stop(Duration::from_secs(10));
        assert!(!killed);
        assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGTERM));
    }

    #[test]
    fn finds_programs_in_path() {
        assert!(find_program("sh").is_ok());
        assert!(matches!(
            find_program("no-such-backend-anywhere"),
            Err(ProcessError::NotFound { .. })
        ));
    }
}

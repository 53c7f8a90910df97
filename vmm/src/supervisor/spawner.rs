//! The spawner: a small process cloister forks first thing, while it is still one thread and
//! holds neither guest memory nor KVM, which starts, watches and stops the managed backends on
//! its request. Why a process of its own:
//!
//! - a backend started by a sandboxed thread would inherit that thread's seccomp filter and
//!   Landlock domain, which are the VMM's, not what the backend needs (and a domain cannot
//!   grow to take in a directory named by a device added later);
//! - so devices can be added while the VM runs, after every VMM thread is confined, without
//!   any VMM thread being allowed to `fork` or `execve`.
//!
//! It answers requests on a `SOCK_SEQPACKET` socket pair: start a backend (by name: only the
//! programs in [`crate::kinds::BACKEND_PROGRAMS`], found next to cloister or on `PATH`), report
//! one's exit status, stop one. It dies with cloister (`PR_SET_PDEATHSIG`), and its backends
//! die with it; when cloister closes the socket it stops them and exits. It is not sandboxed
//! (the backends it starts must not inherit a filter); what it can be made to do is start
//! those programs, as cloister itself could before it confined itself.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloister_tap::{Interface, InterfaceConfig, TapQueue};

use super::process::{self, ManagedProcess, ProcessError, STOP_GRACE};
use crate::kinds::TapRequest;

const OP_SPAWN: u8 = b'S';
/// A spawn with a tap: the spawner opens it and hands its queues over as `--tap-fd`s.
const OP_SPAWN_WITH_TAP: u8 = b'N';
const OP_STATUS: u8 = b'W';
const OP_STOP: u8 = b'T';
const REPLY_PID: u8 = b'P';
const REPLY_RUNNING: u8 = b'R';
const REPLY_EXITED: u8 = b'X';
const REPLY_ERROR: u8 = b'E';
/// Largest request or reply.
const MAX_MESSAGE: usize = 64 * 1024;

pub struct Spawner {
    socket: Mutex<OwnedFd>,
    pid: libc::pid_t,
    programs: &'static [&'static str],
}

impl Spawner {
    /// Forks the spawner. Must be called while the process has one thread (fork copies only
    /// the caller). `programs` are the names it may start.
    pub fn start(programs: &'static [&'static str]) -> io::Result<Arc<Self>> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair fills two descriptors we own right after.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors nothing else owns.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        // SAFETY: fork in a single-threaded process; the child only runs `serve`.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                drop(ours);
                serve(theirs, parent, programs)
            }
            pid => Ok(Arc::new(Spawner {
                socket: Mutex::new(ours),
                pid,
                programs,
            })),
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Starts `program` (one of the allowed names) with `args`, and with `tap`'s queues as
    /// `--tap-fd` descriptors if it asks for one.
    pub fn spawn(
        self: &Arc<Self>,
        program: &str,
        args: &[OsString],
        tap: Option<&TapRequest>,
    ) -> Result<SpawnedProcess, ProcessError> {
        if !self.programs.contains(&program) {
            return Err(ProcessError::Refused(program.to_string()));
        }
        let mut msg = match tap {
            None => vec![OP_SPAWN],
            Some(tap) => {
                let mut msg = vec![OP_SPAWN_WITH_TAP];
                for field in tap_fields(tap) {
                    msg.extend_from_slice(field.as_bytes());
                    msg.push(0);
                }
                msg
            }
        };
        msg.extend_from_slice(program.as_bytes());
        for a in args {
            msg.push(0);
            msg.extend_from_slice(a.as_bytes());
        }
        let reply = self.request(&msg).map_err(ProcessError::Spawner)?;
        match reply.split_first() {
            Some((&REPLY_PID, rest)) if rest.len() == 4 => {
                let pid = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                // Not reaped until we ask, so the pid cannot have been reused.
                let pidfd = match process::pidfd_open(pid) {
                    Ok(fd) => fd,
                    Err(e) => {
                        // Unwatched, it must not run.
                        self.stop(pid, STOP_GRACE);
                        return Err(ProcessError::Pidfd(pid, e));
                    }
                };
                Ok(SpawnedProcess {
                    pid,
                    pidfd,
                    spawner: Arc::clone(self),
                    status: None,
                    stopped: false,
                })
            }
            Some((&REPLY_ERROR, text)) => Err(ProcessError::Remote(
                String::from_utf8_lossy(text).into_owned(),
            )),
            _ => Err(ProcessError::Spawner(bad_reply())),
        }
    }

    /// One request, one reply, one caller at a time.
    fn request(&self, msg: &[u8]) -> io::Result<Vec<u8>> {
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        send(socket.as_raw_fd(), msg)?;
        let reply = recv(socket.as_raw_fd())?;
        if reply.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spawner process is gone",
            ));
        }
        Ok(reply)
    }

    /// The exit status of `pid` if it has exited (and is then reaped), or `None`.
    fn status(&self, pid: u32) -> Option<ExitStatus> {
        let mut msg = vec![OP_STATUS];
        msg.extend_from_slice(&pid.to_le_bytes());
        exited(&self.request(&msg).ok()?).map(|(s, _)| s)
    }

    /// SIGTERM, SIGKILL after `grace`; the status and whether it had to be killed.
    fn stop(&self, pid: u32, grace: Duration) -> (Option<ExitStatus>, bool) {
        let mut msg = vec![OP_STOP];
        msg.extend_from_slice(&pid.to_le_bytes());
        msg.extend_from_slice(&(grace.as_millis().min(u32::MAX as u128) as u32).to_le_bytes());
        match self.request(&msg).ok().as_deref().and_then(exited) {
            Some((s, killed)) => (Some(s), killed),
            None => (None, false),
        }
    }
}

impl Drop for Spawner {
    /// Closing the socket tells it to stop what is left and exit. It is not waited for: the
    /// last owner may be a thread that may not reap (it exits with cloister, which reaps it or
    /// leaves it to init).
    fn drop(&mut self) {
        let socket = self.socket.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn bad_reply() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a malformed reply from the spawner",
    )
}

fn exited(reply: &[u8]) -> Option<(ExitStatus, bool)> {
    match reply {
        [REPLY_EXITED, a, b, c, d, killed] => Some((
            ExitStatus::from_raw(i32::from_le_bytes([*a, *b, *c, *d])),
            *killed != 0,
        )),
        _ => None,
    }
}

fn send(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: write(2) of a buffer we own; SEQPACKET sends it whole or not at all.
    let n = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        // SAFETY: read(2) into a buffer we own, at most its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A backend the spawner started.
pub struct SpawnedProcess {
    pid: u32,
    pidfd: OwnedFd,
    spawner: Arc<Spawner>,
    status: Option<ExitStatus>,
    stopped: bool,
}

impl SpawnedProcess {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Readable once the process has exited.
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() && !self.stopped {
            self.status = self.spawner.status(self.pid);
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        process::wait_pidfd(self.pidfd.as_raw_fd(), timeout);
        self.try_wait()
    }

    /// SIGTERM to its process group, SIGKILL after `grace`; reaped. Returns how it ended and
    /// whether it had to be killed.
    pub fn stop(&mut self, grace: Duration) -> (Option<ExitStatus>, bool) {
        if self.stopped {
            return (self.status, false);
        }
        self.stopped = true;
        let (status, killed) = self.spawner.stop(self.pid, grace);
        self.status = self.status.or(status);
        (self.status, killed)
    }
}

impl Drop for SpawnedProcess {
    fn drop(&mut self) {
        self.stop(STOP_GRACE);
    }
}

/// Closes every descriptor above stdio except `keep`.
fn close_all_but(keep: RawFd) {
    let keep = keep as libc::c_uint;
    // SAFETY: close_range on ranges of our own descriptors; none is in use by other threads
    // (the spawner has one).
    unsafe {
        if keep > 3 {
            libc::syscall(libc::SYS_close_range, 3u32, keep - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32);
    }
}

/// The spawner's life: requests until cloister closes the socket or dies.
fn serve(socket: OwnedFd, parent: libc::pid_t, programs: &[&str]) -> ! {
    // SAFETY: prctl and setpgid with constant arguments. Dies with cloister; out of the
    // terminal's process group, so Ctrl-C and hang-ups meant for cloister do not reach it.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, c"cloister-spawn".as_ptr(), 0, 0, 0);
        libc::setpgid(0, 0);
        if libc::getppid() != parent {
            libc::_exit(0);
        }
    }
    // Nothing of cloister's but stdio and its socket: not /dev/kvm, not the kernel's file.
    close_all_but(socket.as_raw_fd());
    let mut children: HashMap<u32, ManagedProcess> = HashMap::new();
    loop {
        let msg = match recv(socket.as_raw_fd()) {
            Ok(m) if !m.is_empty() => m,
            _ => break,
        };
        let reply = handle(&msg, &mut children, programs);
        if send(socket.as_raw_fd(), &reply).is_err() {
            break;
        }
    }
    for p in children.values_mut() {
        p.stop(STOP_GRACE);
    }
    // SAFETY: ends the spawner without running cloister's exit handlers (it is a fork).
    unsafe { libc::_exit(0) }
}

/// A tap request as the spawner's message carries it: name, queues, ip, mask, MAC, MTU
/// (empty when not given).
fn tap_fields(tap: &TapRequest) -> [String; 6] {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let i = &tap.interface;
    [
        tap.name.clone(),
        tap.queues.to_string(),
        opt(i.ip.map(|a| a.to_string())),
        opt(i.mask.map(|a| a.to_string())),
        opt(i.mac.map(|m| m.to_string())),
        opt(i.mtu.map(|m| m.to_string())),
    ]
}

fn parse_tap(fields: &[&[u8]]) -> Result<TapRequest, String> {
    let text = |i: usize| -> Result<&str, String> {
        std::str::from_utf8(fields.get(i).copied().unwrap_or_default())
            .map_err(|_| "a tap field is not UTF-8".to_string())
    };
    fn opt<T: std::str::FromStr>(s: &str) -> Result<Option<T>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| format!("bad tap field '{s}'"))
    }
    Ok(TapRequest {
        name: text(0)?.to_string(),
        queues: text(1)?
            .parse()
            .map_err(|_| "bad tap queue count".to_string())?,
        interface: InterfaceConfig {
            ip: opt(text(2)?)?,
            mask: opt(text(3)?)?,
            mac: opt::<cloister_tap::MacAddr>(text(4)?)?,
            mtu: opt(text(5)?)?,
        },
    })
}

/// Opens the tap's queues (creating the tap if it does not exist) and configures its host
/// side; the descriptors are the backend's `--tap-fd`s.
fn open_tap(tap: &TapRequest) -> Result<OpenedTap, cloister_tap::Error> {
    let name = if tap.name.is_empty() {
        cloister_tap::DEFAULT_NAME_PATTERN
    } else {
        &tap.name
    };
    let queues = TapQueue::open_queues(name, usize::from(tap.queues.max(1)))?;
    let mut mtu = tap.interface.mtu;
    if let Some(first) = queues.first() {
        let interface = Interface::new(first.name())?;
        interface.configure(&tap.interface)?;
        mtu = Some(interface.mtu()?);
    }
    Ok(OpenedTap {
        fds: queues.into_iter().map(TapQueue::into_fd).collect(),
        mtu,
    })
}

/// A tap's queues for a backend, and its MTU (the backend runs in a network namespace of its
/// own, where it cannot look the tap up by name).
struct OpenedTap {
    fds: Vec<OwnedFd>,
    mtu: Option<u16>,
}

fn handle(msg: &[u8], children: &mut HashMap<u32, ManagedProcess>, programs: &[&str]) -> Vec<u8> {
    let error = |text: String| {
        let mut r = vec![REPLY_ERROR];
        r.extend_from_slice(text.as_bytes());
        r
    };
    let pid_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(msg.get(at..at + 4)?.try_into().ok()?))
    };
    let exited_reply = |s: ExitStatus, killed: bool| {
        let mut r = vec![REPLY_EXITED];
        r.extend_from_slice(&s.into_raw().to_le_bytes());
        r.push(u8::from(killed));
        r
    };
    match msg.first() {
        Some(&op @ (OP_SPAWN | OP_SPAWN_WITH_TAP)) => {
            let fields: Vec<&[u8]> = msg[1..].split(|&b| b == 0).collect();
            let (tap, rest) = if op == OP_SPAWN_WITH_TAP && fields.len() >= 6 {
                match parse_tap(&fields[..6]) {
                    Ok(tap) => (Some(tap), &fields[6..]),
                    Err(e) => return error(e),
                }
            } else {
                (None, &fields[..])
            };
            let name =
                String::from_utf8_lossy(rest.first().copied().unwrap_or_default()).into_owned();
            if !programs.contains(&name.as_str()) {
                return error(ProcessError::Refused(name).to_string());
            }
            let mut args: Vec<OsString> = rest
                .iter()
                .skip(1)
                .map(|a| OsString::from_vec(a.to_vec()))
                .collect();
            let fds = match tap.as_ref().map(open_tap).transpose() {
                Ok(Some(opened)) => {
                    // The MTU is said when the request did not (it then set it itself).
                    if let (Some(mtu), Some(None)) =
                        (opened.mtu, tap.as_ref().map(|t| t.interface.mtu))
                    {
                        args.push(OsString::from(format!("--mtu={mtu}")));
                    }
                    opened.fds
                }
                Ok(None) => Vec::new(),
                Err(e) => return error(crate::error_chain(&e)),
            };
            // The backend inherits them at the numbers they have here.
            args.extend(
                fds.iter()
                    .map(|fd| OsString::from(format!("--tap-fd={}", fd.as_raw_fd()))),
            );
            let spawned = process::find_program(&name)
                .and_then(|path| ManagedProcess::spawn(&path, &args, fds));
            match spawned {
                Ok(p) => {
                    let pid = p.pid();
                    children.insert(pid, p);
                    let mut r = vec![REPLY_PID];
                    r.extend_from_slice(&pid.to_le_bytes());
                    r
                }
                Err(e) => error(crate::error_chain(&e)),
            }
        }
        Some(&OP_STATUS) => match pid_at(1).and_then(|pid| children.get_mut(&pid)) {
            Some(p) => match p.try_wait() {
                Some(s) => exited_reply(s, false),
                None => vec![REPLY_RUNNING],
            },
            None => error("no such backend".into()),
        },
        Some(&OP_STOP) => {
            let grace = pid_at(5).map_or(STOP_GRACE, |ms| Duration::from_millis(ms.into()));
            match pid_at(1).and_then(|pid| children.remove(&pid)) {
                Some(mut p) => match p.stop(grace) {
                    (Some(s), killed) => exited_reply(s, killed),
                    (None, _) => error("lost track of the backend".into()),
                },
                None => error("no such backend".into()),
            }
        }
        _ => error("unknown request".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROGRAMS: &[&str] = &["sh"];

    #[test]
    fn starts_reports_and_stops_only_what_it_may() {
        let spawner = Spawner::start(PROGRAMS).unwrap();
        let mut p = spawner
            .spawn("sh", &["-c".into(), "exit 3".into()], None)
            .unwrap();
        let s = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(s.code(), Some(3));
        let mut q = spawner
            .spawn(
                "sh",
                &["-c".into(), "while :; do sleep 1; done".into()],
                None,
            )
            .unwrap();
        assert!(q.try_wait().is_none());
        let (status, killed) = q.stop(Duration::from_secs(10));
        assert!(!killed);
        assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGTERM));
        assert!(matches!(
            spawner.spawn("rm", &["-rf".into(), "/".into()], None),
            Err(ProcessError::Refused(_))
        ));
        // The spawner still answers after a refusal, and says when a program is missing.
        let missing = Spawner::start(&["no-such-backend-anywhere"]).unwrap();
        let Err(e) = missing.spawn("no-such-backend-anywhere", &[], None) else {
            panic!("started a program that does not exist");
        };
        assert!(e.to_string().contains("cannot find"), "{e}");
    }

    #[test]
    fn a_backend_gets_the_queues_of_the_tap_it_asks_for() {
        // In a network namespace of this test thread's own, which the spawner inherits.
        // SAFETY: unshare(2) with a constant flag; affects only this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "SKIPPED a_backend_gets_the_queues_of_the_tap_it_asks_for: no network namespace ({})",
                io::Error::last_os_error()
            );
            return;
        }
        let out = std::env::temp_dir().join(format!("cloister-spawn-tap-{}", std::process::id()));
        let spawner = Spawner::start(PROGRAMS).unwrap();
        let tap = TapRequest {
            name: "cltest0".into(),
            queues: 2,
            interface: InterfaceConfig {
                ip: Some("192.168.250.1".parse().unwrap()),
                mask: Some("255.255.255.0".parse().unwrap()),
                mac: Some("02:00:00:00:00:09".parse().unwrap()),
                mtu: Some(9000),
            },
        };
        let script = format!(
            "for a in \"$0\" \"$1\"; do readlink /proc/$$/fd/${{a#--tap-fd=}}; done >{0}; echo \"$0 $1\" | sed 's/[0-9]//g' >>{0}; exec sleep 30",
            out.display()
        );
        let mut p = spawner
            .spawn("sh", &["-c".into(), script.into()], Some(&tap))
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.lines().count() >= 3 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(text, "/dev/net/tun\n/dev/net/tun\n--tap-fd= --tap-fd=\n");
        let interface = Interface::new("cltest0").unwrap();
        assert_eq!(interface.mtu().unwrap(), 9000);
        assert_eq!(interface.mac().unwrap().to_string(), "02:00:00:00:00:09");
        // The tap goes with the backend that holds it.
        p.stop(Duration::from_secs(10));
        let _ = std::fs::remove_file(&out);
        let gone = Interface::new("cltest0").unwrap().mtu().is_err();
        assert!(gone, "the tap outlived its backend");
        // A tap the kernel cannot make is the spawner's answer, not a crash.
        let bad = TapRequest {
            name: "cltest1".into(),
            queues: 1,
            interface: InterfaceConfig {
                // Multicast: no interface may have it.
                mac: Some("01:00:00:00:00:01".parse().unwrap()),
                ..InterfaceConfig::default()
            },
        };
        let e = spawner.spawn("sh", &["-c".into(), "true".into()], Some(&bad));
        assert!(
            matches!(e, Err(ProcessError::Remote(_))),
            "{:?}",
            e.map(|p| p.pid())
        );
    }

    #[test]
    fn its_backends_die_with_it() {
        let spawner = Spawner::start(PROGRAMS).unwrap();
        let mut p = spawner
            .spawn(
                "sh",
                &["-c".into(), "while :; do sleep 1; done".into()],
                None,
            )
            .unwrap();
        // SAFETY: SIGKILL to the spawner, our child.
        unsafe { libc::kill(spawner.pid(), libc::SIGKILL) };
        // The backend's death signal fires; the pidfd says when it is gone (whoever reaps it).
        let mut pfd = libc::pollfd {
            fd: p.pidfd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(ready, 1, "the backend outlived the spawner");
        // Asking a dead spawner is an answer too, not a hang.
        assert_eq!(p.stop(Duration::from_millis(100)), (None, false));
    }
}

//! Test harness: runs the real `vhost-user-blk` binary on a scratch image and connects to it
//! with the test frontend from `cloister-backends`.

#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cloister_backends::test_frontend::blk::{
    features_wanted, header, TestBlk, HEADER_LEN, STATUS_UNTOUCHED, VIRTIO_BLK_T_OUT,
};
use cloister_backends::test_frontend::Buffer;
use vm_memory::{Bytes, GuestAddress};

pub const BINARY: &str = env!("CARGO_BIN_EXE_vhost-user-blk");
pub const IMAGE_SIZE: u64 = 16 << 20;

/// A scratch directory removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cloister-blk-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// An image of `size` bytes filled with a recognisable pattern (byte = offset / 512 % 251).
    pub fn image(&self, size: u64) -> PathBuf {
        let path = self.path("disk.img");
        let mut file = File::create(&path).expect("create image");
        let mut block = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < size {
            for (i, byte) in block.iter_mut().enumerate() {
                *byte = pattern_byte(offset + i as u64);
            }
            let len = (size - offset).min(block.len() as u64) as usize;
            file.write_all(&block[..len]).expect("write image");
            offset += len as u64;
        }
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn pattern_byte(offset: u64) -> u8 {
    ((offset / 512) % 251) as u8
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// FNV-1a, to compare buffers by checksum in assertion messages.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = OpenOptions::new()
        .read(true)
        .open(path)
        .expect("open image");
    file.seek(SeekFrom::Start(offset)).expect("seek image");
    let mut out = vec![0u8; len];
    file.read_exact(&mut out).expect("read image");
    out
}

/// A running daemon; killed on drop if the test didn't stop it.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub log: PathBuf,
    pub scratch: Scratch,
}

impl Daemon {
    /// Starts the daemon on a fresh pattern-filled image with `args` added.
    pub fn start(name: &str, args: &[&str]) -> Self {
        let scratch = Scratch::new(name);
        let image = scratch.image(IMAGE_SIZE);
        Self::start_with(scratch, image, args)
    }

    pub fn start_with(scratch: Scratch, image: PathBuf, args: &[&str]) -> Self {
        let socket = scratch.path("blk.sock");
        let log = scratch.path("daemon.log");
        let child = Command::new(BINARY)
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(&image)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create log"))
            .spawn()
            .expect("spawn vhost-user-blk");
        let mut daemon = Self {
            child: Some(child),
            socket,
            image,
            log,
            scratch,
        };
        daemon.wait_for_socket();
        daemon
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.try_wait() {
                panic!("daemon exited early with {status}: {}", self.log_text());
            }
            // A connect that succeeds would be taken as a frontend; existence is enough.
            if self.socket.exists() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no socket after 10 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn connect(&self, queues: usize) -> TestBlk {
        self.connect_with(queues, 256, features_wanted())
    }

    pub fn connect_with(&self, queues: usize, queue_size: u16, wanted: u64) -> TestBlk {
        TestBlk::connect(&self.socket, queues, queue_size, wanted)
            .unwrap_or_else(|e| panic!("connect: {e:?}; daemon log: {}", self.log_text()))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn alive(&mut self) -> bool {
        self.try_wait().is_none()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` and waits (at most 10 s) for the exit status.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored signal {signal}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon must still be running (callers check that their connection still works).
    pub fn assert_serves(&mut self) {
        assert!(self.alive(), "daemon died: {}", self.log_text());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the binary with `args` (no daemon expected) and returns (status, stderr).
pub fn run_cli(args: &[&str]) -> (ExitStatus, String) {
    let output = Command::new(BINARY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vhost-user-blk");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Connecting is how a frontend shows up; used to check a socket is live.
pub fn socket_accepts(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// One read or write request's own guest buffers (header, data, status), for tests that keep
/// many requests in flight at once.
pub struct Slot {
    pub header: GuestAddress,
    pub data: GuestAddress,
    pub status: GuestAddress,
    pub len: u32,
    pub write: bool,
}

impl Slot {
    /// Allocates the buffers in the frontend's RAM and writes the header.
    pub fn new(blk: &TestBlk, kind: u32, sector: u64, len: u32) -> Self {
        let ram = blk.ram();
        let slot = Self {
            header: ram.alloc(u64::from(HEADER_LEN), 16).unwrap(),
            data: ram.alloc(u64::from(len), 4096).unwrap(),
            status: ram.alloc(1, 1).unwrap(),
            len,
            write: kind == VIRTIO_BLK_T_OUT,
        };
        ram.memory()
            .write_slice(&header(kind, sector), slot.header)
            .unwrap();
        slot
    }

    /// Queues the request on `queue` (not yet published: see `SplitQueue::notify`).
    pub fn add(&self, blk: &mut TestBlk, queue: usize) -> u16 {
        blk.ram()
            .memory()
            .write_obj(STATUS_UNTOUCHED, self.status)
            .unwrap();
        let data = if self.write {
            Buffer::readable(self.data, self.len)
        } else {
            Buffer::writable(self.data, self.len)
        };
        blk.queue(queue)
            .add(&[
                Buffer::readable(self.header, HEADER_LEN),
                data,
                Buffer::writable(self.status, 1),
            ])
            .unwrap()
    }

    /// The status byte the device wrote.
    pub fn status(&self, blk: &TestBlk) -> u8 {
        blk.ram().memory().read_obj(self.status).unwrap()
    }
}

/// utime + stime of the whole process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// 100 ms after the last request, the daemon uses at most 3 % of a CPU over 1 s.
pub fn assert_goes_idle(daemon: &Daemon, what: &str) {
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(daemon.pid()) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        spent * 100 <= hz * 3,
        "{what} used {spent} ticks ({hz}/s) in 1 s"
    );
}

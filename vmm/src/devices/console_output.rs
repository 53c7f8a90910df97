//! The UART's output side. A vCPU writing to the serial port only appends to a bounded buffer;
//! a writer thread of its own moves the bytes to stdout or the console file in batches. So a
//! reader of our stdout that stalls (a paused terminal, a full pipe nobody drains) never stalls
//! a vCPU: past the buffer's bound, output is dropped and counted, and said at exit.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cloister_seccomp::ThreadRole;

/// Guest output held while the writer is behind: a whole verbose boot log (typically 50–100
/// KiB) fits.
pub const BUFFER_LIMIT: usize = 256 << 10;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Bytes that found the buffer full, or that the output refused.
    dropped: u64,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    /// That batch's size.
    in_flight: usize,
    /// The output failed; everything after is dropped.
    failed: Option<io::ErrorKind>,
    closing: bool,
    /// The writer sleeps on `work`: only then does new output need a wake-up (a system call,
    /// which per byte would cost more than the write it saves).
    writer_idle: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// New bytes, or closing.
    work: Condvar,
    /// The writer finished a batch.
    progress: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the UART writes to: never blocks on the real output.
pub struct ConsoleOutput {
    shared: Arc<Shared>,
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.failed.is_some() || pending.bytes.len() + buf.len() > BUFFER_LIMIT {
            pending.dropped += buf.len() as u64;
        } else {
            pending.bytes.extend_from_slice(buf);
            if pending.writer_idle {
                pending.writer_idle = false;
                self.shared.work.notify_one();
            }
        }
        // Accepted either way: the UART has nothing better to do with a refused byte.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How the console's output ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Guest output that never reached the output (dropped, or still queued at the deadline).
    pub lost: u64,
    /// Why the output stopped taking bytes, if it did.
    pub failed: Option<io::ErrorKind>,
}

/// The writer thread.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`; the returned [`ConsoleOutput`] goes to the UART.
pub fn start(out: Box<dyn Write + Send>) -> io::Result<(ConsoleOutput, ConsoleWriter)> {
    start_with_role(out, Some(ThreadRole::VmmConsole))
}

fn start_with_role(
    mut out: Box<dyn Write + Send>,
    role: Option<ThreadRole>,
) -> io::Result<(ConsoleOutput, ConsoleWriter)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        work: Condvar::new(),
        progress: Condvar::new(),
    });
    let s = shared.clone();
    let thread = crate::signals::spawn_helper(
        std::thread::Builder::new().name("console".into()),
        move || {
            if let Some(role) = role {
                if let Err(e) = cloister_seccomp::enter_thread(role) {
                    eprintln!(
                        "cloister: error: the console writer cannot enter its sandbox: {}",
                        crate::error_chain(&e)
                    );
                    std::process::exit(1);
                }
            }
            write_batches(&s, &mut *out);
        },
    )?;
    Ok((
        ConsoleOutput {
            shared: shared.clone(),
        },
        ConsoleWriter {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches(shared: &Shared, out: &mut dyn Write) {
    let mut batch = Vec::new();
    loop {
        {
            let mut pending = shared.lock();
            pending.writing = false;
            pending.in_flight = 0;
            shared.progress.notify_all();
            while pending.bytes.is_empty() && !pending.closing {
                pending.writer_idle = true;
                pending = shared.work.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
            pending.writer_idle = false;
            if pending.bytes.is_empty() {
                return;
            }
            std::mem::swap(&mut batch, &mut pending.bytes);
            pending.writing = true;
            pending.in_flight = batch.len();
        }
        let result = out.write_all(&batch).and_then(|()| out.flush());
        if let Err(e) = result {
            let mut pending = shared.lock();
            // What reached the output before the error is unknown: count the whole batch.
            pending.dropped += batch.len() as u64;
            pending.failed = Some(e.kind());
            pending.dropped += pending.bytes.len() as u64;
            pending.bytes.clear();
        }
        batch.clear();
    }
}

impl ConsoleWriter {
    /// Writes out what is queued, waiting at most `timeout` for the output to take it; what
    /// it did not take by then counts as lost.
    pub fn finish(&mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let mut pending = self.shared.lock();
        pending.closing = true;
        self.shared.work.notify_one();
        while !pending.bytes.is_empty() || pending.writing {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            pending = self
                .shared
                .progress
                .wait_timeout(pending, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let done = pending.bytes.is_empty() && !pending.writing;
        // A batch stuck in a write counts whole: how much of it got out is unknown.
        let lost = pending.dropped + (pending.bytes.len() + pending.in_flight) as u64;
        let failed = pending.failed;
        drop(pending);
        if done {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
        // Otherwise the writer is stuck in a write that will never finish: it goes with the
        // process.
        Finished { lost, failed }
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        // A VM that failed to build: let the thread end (it writes what is queued first).
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// An output that records what it gets.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<u8>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_arrive_in_order() {
        let recorder = Recorder::default();
        let (mut uart_side, mut writer) =
            start_with_role(Box::new(recorder.clone()), None).unwrap();
        let mut expected = Vec::new();
        for i in 0..10_000u32 {
            let byte = [(i % 251) as u8];
            uart_side.write_all(&byte).unwrap();
            expected.push(byte[0]);
        }
        let finished = writer.finish(Duration::from_secs(10));
        assert_eq!(
            finished,
            Finished {
                lost: 0,
                failed: None
            }
        );
        assert_eq!(*recorder.0.lock().unwrap(), expected);
    }

    #[test]
    fn a_stalled_output_never_blocks_the_writer_side() {
        // A pipe nobody reads: its buffer fills and the writer thread blocks in write(2).
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the array on success.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: F_GETPIPE_SZ on the pipe just made.
        let capacity = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
        assert!(capacity > 0);
        // SAFETY: fresh descriptors owned here.
        let (_read_end, write_end) = unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from(OwnedFd::from_raw_fd(fds[1])),
            )
        };
        let (mut uart_side, mut writer) = start_with_role(Box::new(write_end), None).unwrap();
        let total = 16 * BUFFER_LIMIT;
        let started = Instant::now();
        let chunk = [b'x'; 4096];
        for _ in 0..total / chunk.len() {
            uart_side.write_all(&chunk).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the UART side waited for the output"
        );
        let finished = writer.finish(Duration::from_millis(200));
        // Only what the pipe's own buffer took got out.
        assert!(
            finished.lost as usize >= total - capacity as usize,
            "{finished:?}, pipe capacity {capacity}"
        );
        assert!(finished.lost as usize <= total, "{finished:?}");
    }

    #[test]
    fn a_failed_output_counts_what_it_lost() {
        let (mut uart_side, mut writer) = start_with_role(Box::new(Broken), None).unwrap();
        uart_side.write_all(b"hello\n").unwrap();
        let first = {
            // Let the writer meet the error before more arrives.
            let deadline = Instant::now() + Duration::from_secs(5);
            while writer.shared.lock().failed.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            writer.shared.lock().failed
        };
        assert_eq!(first, Some(io::ErrorKind::BrokenPipe));
        uart_side.write_all(b"more").unwrap();
        let finished = writer.finish(Duration::from_secs(5));
        assert_eq!(finished.lost, 10);
        assert_eq!(finished.failed, Some(io::ErrorKind::BrokenPipe));
    }
}

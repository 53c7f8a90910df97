//! Transmitting a batch of frames with one system call: an io_uring of `writev`s on the tap.
//!
//! A tap takes one frame per write, so at small frames the system call itself (entry, seccomp,
//! descriptor lookup) is a good part of a frame's cost; one `io_uring_enter` per batch of up
//! to 64 frames saves most of it (bench/net measures both). The kernel runs a tap's writes
//! inline, in submission order, during the call.
//!
//! io_uring operations are not seen by seccomp, so the ring restricts itself before it is
//! enabled (IORING_REGISTER_RESTRICTIONS): `writev` only, only on the registered tap queue.

use std::io;
use std::os::fd::RawFd;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};

pub struct TxRing {
    ring: IoUring,
}

impl TxRing {
    /// A ring for batches of up to `batch` frames on tap queue `tap`. Made at start-up, before
    /// the sandbox.
    pub fn new(tap: RawFd, batch: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(batch * 2)
            .setup_submit_all()
            .setup_r_disabled()
            .build(batch)?;
        let submitter = ring.submitter();
        submitter.register_files(&[tap])?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ];
        submitter.register_restrictions(&mut allowed)?;
        submitter.register_enable_rings()?;
        Ok(Self { ring })
    }

    /// Writes each frame (a range of `iovecs`) to the tap and waits for all of them; `results`
    /// gets, per frame, what its `writev` returned (a byte count, or a negated errno).
    ///
    /// On an error of the ring itself the caller must drop the ring: frames already submitted
    /// may still be written, but none can be submitted twice.
    ///
    /// # Safety
    /// Every iovec must point to memory readable for its length until this returns.
    pub unsafe fn send(
        &mut self,
        iovecs: &[libc::iovec],
        frames: &[(usize, usize)],
        results: &mut [i32],
    ) -> io::Result<()> {
        for (i, &(start, end)) in frames.iter().enumerate() {
            let iov = &iovecs[start..end];
            let sqe = opcode::Writev::new(types::Fixed(0), iov.as_ptr(), iov.len() as u32)
                .build()
                .user_data(i as u64);
            // SAFETY: the iovecs outlive the call, which waits for every completion; the SQ
            // has room for a whole batch (callers send at most `batch` frames).
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                return Err(io::Error::other("the submission queue is full"));
            }
        }
        let mut waiting = frames.len();
        while waiting > 0 {
            match self.ring.submit_and_wait(waiting) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                    *slot = cqe.result();
                }
                waiting = waiting.saturating_sub(1);
            }
        }
        Ok(())
    }
}

//! The io_uring engine: many requests in flight per queue, completed in whatever order the
//! kernel finishes them.
//!
//! Each request takes a slot (its iovecs, the guest memory it points into, its progress) and
//! its SQEs carry the slot index as `user_data`. Submissions are batched: the queue pushes
//! every request it popped, then `commit` makes one `io_uring_enter`. Completions that happen
//! inline (buffered reads from the page cache) are reaped right away; the rest wake the queue's
//! worker through its epoll, which watches the ring's own descriptor: it is readable exactly
//! while completions wait in the CQ. (An eventfd registered with the ring would also be
//! signalled for the inline completions, costing a wake-up or a read per batch.)

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use cloister_backends::server::GuestMemory;
use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::GuestAddress;

use crate::disk::{advance_iovecs, Disk};
use crate::engine::{iovecs, Completes, Completion};
use crate::request::{write_status, Operation, Range, Request, STATUS_IOERR, STATUS_OK};

/// Index of the image's descriptors in the ring's fixed-file table.
const FILE_MAIN: u32 = 0;
const FILE_BUFFERED: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Fallocate,
}

struct Slot {
    head: u16,
    status_addr: GuestAddress,
    used_ok: u32,
    kind: Kind,
    /// Host buffers of a read or write, advanced past what already moved.
    iovecs: Vec<libc::iovec>,
    iov_start: usize,
    offset: u64,
    remaining: usize,
    file: u32,
    ranges: Vec<Range>,
    /// SQEs of this request still in the kernel.
    outstanding: u32,
    status: u8,
    /// Keeps the guest memory the iovecs point into mapped until the kernel is done with it,
    /// even if the frontend replaces the memory table meanwhile.
    mem: Option<Arc<GuestMemory>>,
    /// Given up on by a drain that could not wait for it: when it completes after all, it
    /// belongs to no ring any more, only its slot comes back.
    abandoned: bool,
}

impl Slot {
    fn new() -> Self {
        Self {
            head: 0,
            status_addr: GuestAddress(0),
            used_ok: 0,
            kind: Kind::Flush,
            iovecs: Vec::new(),
            iov_start: 0,
            offset: 0,
            remaining: 0,
            file: FILE_MAIN,
            ranges: Vec::new(),
            outstanding: 0,
            status: STATUS_OK,
            mem: None,
            abandoned: false,
        }
    }
}

pub struct UringEngine {
    ring: IoUring,
    disk: Arc<Disk>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    /// SQEs pushed but not yet handed to the kernel.
    unsubmitted: bool,
    /// While draining for a reset: finish requests without touching guest memory.
    discard: bool,
    cqes: Vec<(u64, i32)>,
    /// Buffered reads of the current batch, not yet pushed: see `commit`.
    deferred: Vec<u32>,
}

// SAFETY: the raw pointers (iovecs) point into guest memory that the slot's `mem` keeps
// mapped; the engine is owned by one queue and used under its mutex, one thread at a time.
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// A ring with room for `slots` requests in flight. Created at start-up, before the
    /// sandbox, and reused by every connection.
    ///
    /// io_uring operations are not seen by seccomp, so the ring restricts itself
    /// (IORING_REGISTER_RESTRICTIONS) before it is enabled: it takes only the operations below,
    /// only on the image's registered descriptors (IOSQE_FIXED_FILE required), and no further
    /// registration. A compromised worker can read and write its own image through it, and
    /// nothing else.
    pub fn new(disk: Arc<Disk>, slots: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            // A request may need several CQEs (one per discard range) and the kernel must
            // never drop one: a CQ twice the SQ plus IORING_FEAT_NODROP, which keeps what
            // does not fit until `flush_overflow` collects it.
            .setup_cqsize(slots * 2)
            // Keep going after an SQE fails to prepare; its CQE reports the error.
            .setup_submit_all()
            // Disabled until restricted.
            .setup_r_disabled()
            .build(slots)?;
        let submitter = ring.submitter();
        submitter.register_files(&disk.fds())?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_op(opcode::Fallocate::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ];
        submitter.register_restrictions(&mut allowed)?;
        submitter.register_enable_rings()?;
        Ok(Self {
            ring,
            disk,
            slots: (0..slots).map(|_| Slot::new()).collect(),
            free: (0..slots).rev().collect(),
            in_flight: 0,
            unsubmitted: false,
            discard: false,
            cqes: Vec::with_capacity(slots as usize * 2),
            deferred: Vec::with_capacity(slots as usize),
        })
    }

    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Readable while completions are waiting (the ring descriptor itself).
    pub fn event_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    pub fn submit(
        &mut self,
        request: Request,
        mem: &Arc<GuestMemory>,
        done: &mut Vec<Completion>,
    ) -> Completes {
        let Some(index) = self.free.pop() else {
            // The queue checks `has_room` first; answer rather than lose the request.
            write_status(mem, request.status, STATUS_IOERR);
            done.push(Completion {
                head: request.head,
                used_len: 1,
            });
            return Completes::Inline;
        };
        self.in_flight += 1;
        let used_ok = request.used_len_ok();
        let slot = &mut self.slots[index as usize];
        slot.head = request.head;
        slot.status_addr = request.status;
        slot.used_ok = used_ok;
        slot.status = STATUS_OK;
        slot.outstanding = 0;
        slot.mem = Some(Arc::clone(mem));
        let (kind, offset, data) = match request.operation {
            Operation::Read { offset, data } => (Kind::Read, offset, data),
            Operation::Write { offset, data } => (Kind::Write, offset, data),
            Operation::Flush => {
                slot.kind = Kind::Flush;
                let entry = opcode::Fsync::new(types::Fixed(FILE_MAIN))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(u64::from(index));
                self.push_for(index, entry, done);
                return Completes::Later;
            }
            Operation::Fallocate { ranges } => {
                slot.kind = Kind::Fallocate;
                slot.ranges = ranges;
                self.push_fallocate(index, done);
                return Completes::Later;
            }
        };
        slot.kind = kind;
        slot.iovecs.clear();
        slot.iov_start = 0;
        slot.offset = offset;
        if iovecs(mem, &data, &mut slot.iovecs).is_err() {
            slot.status = STATUS_IOERR;
            self.finish(index, done);
            return Completes::Inline;
        }
        slot.remaining = slot.iovecs.iter().map(|iov| iov.iov_len).sum();
        let aligned = self.disk.aligned(offset, &slot.iovecs);
        if kind == Kind::Write && (!aligned || self.disk.direct_alignment().is_none()) {
            // A buffered write. io_uring can't do those without blocking on ext4 (it has no
            // non-blocking buffered writes) and hands each to an io-wq thread: measured 4 to
            // 5 times slower than writing into the page cache right here (see bench/blk).
            if let Err(e) = self.disk.write_vectored(offset, &slot.iovecs) {
                log::debug!("write at {offset} failed: {e}");
                slot.status = STATUS_IOERR;
            }
            self.finish(index, done);
            return Completes::Inline;
        }
        slot.file = if aligned { FILE_MAIN } else { FILE_BUFFERED };
        if kind == Kind::Read && (!aligned || self.disk.direct_alignment().is_none()) {
            // Decided in `commit`, once the batch is known.
            self.deferred.push(index);
            return Completes::Inline;
        }
        let entry = rw_entry(slot, index);
        self.push_for(index, entry, done);
        Completes::Later
    }

    /// One fallocate SQE per range; the request finishes when the last one completes.
    fn push_fallocate(&mut self, index: u32, done: &mut Vec<Completion>) {
        let ranges = std::mem::take(&mut self.slots[index as usize].ranges);
        for (range_index, range) in ranges.iter().enumerate() {
            let entry = opcode::Fallocate::new(types::Fixed(FILE_MAIN), range.len)
                .offset(range.offset)
                .mode(range.mode)
                .build()
                .user_data(u64::from(index) | ((range_index as u64) << 32));
            if !self.push(entry) {
                self.slots[index as usize].status = STATUS_IOERR;
                break;
            }
            self.slots[index as usize].outstanding += 1;
        }
        self.slots[index as usize].ranges = ranges;
        if self.slots[index as usize].outstanding == 0 {
            self.finish(index, done);
        }
    }

    /// Submits pending SQEs, then reaps whatever is already complete.
    pub fn commit(&mut self, done: &mut Vec<Completion>) {
        if self.deferred.len() == 1 && !self.unsubmitted {
            // A batch of one buffered read (a guest waiting on each request): a plain
            // preadv2(RWF_NOWAIT) is cheaper than a trip through the ring, and when the data
            // isn't cached it fails at once and the read goes to the ring after all. Larger
            // batches are cheaper as one io_uring_enter.
            if let Some(index) = self.deferred.pop() {
                self.read_inline(index, done);
            }
        }
        self.push_deferred(done);
        self.submit_pending();
        self.reap_cq(done);
    }

    /// Reaps completions after the ring became readable.
    pub fn reap(&mut self, done: &mut Vec<Completion>) {
        self.reap_cq(done);
    }

    pub fn drain(&mut self, deliver: bool, done: &mut Vec<Completion>) {
        self.push_deferred(done);
        self.discard = !deliver;
        let mut thrown_away = Vec::new();
        let sink = if deliver { done } else { &mut thrown_away };
        while self.in_flight > 0 {
            self.submit_pending();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!(
                        "waiting for in-flight I/O failed: {e}; abandoning {} requests",
                        self.in_flight
                    );
                    // Their completions may still come, in a later connection's reaps: they
                    // must not reach that connection's ring or memory.
                    let free = &self.free;
                    for (index, slot) in self.slots.iter_mut().enumerate() {
                        if !free.contains(&(index as u32)) {
                            slot.abandoned = true;
                        }
                    }
                    break;
                }
            }
            self.reap_cq(sink);
        }
        self.discard = false;
    }

    /// Pushes an SQE, making room by submitting if the SQ is full. False if the kernel
    /// refuses everything (the request then fails).
    fn push(&mut self, entry: squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: the entry's buffers (slot iovecs, guest memory held by the slot's `mem`)
            // stay valid until its completion is reaped, and the slot is not reused before.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted = true;
                return true;
            }
            self.submit_pending();
        }
        log::error!("io_uring submission queue stays full");
        false
    }

    /// Tries a deferred read from the page cache without blocking; whatever is left goes to
    /// the ring.
    fn read_inline(&mut self, index: u32, done: &mut Vec<Completion>) {
        let slot = &mut self.slots[index as usize];
        let fd = self.disk.fd(slot.file == FILE_MAIN);
        let iovecs = &slot.iovecs[slot.iov_start..];
        // SAFETY: the iovecs point into guest memory kept mapped by the slot's `mem`.
        let moved = unsafe {
            libc::preadv2(
                fd,
                iovecs.as_ptr(),
                iovecs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int,
                slot.offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if moved > 0 {
            let moved = (moved as usize).min(slot.remaining);
            slot.remaining -= moved;
            slot.offset += moved as u64;
            if slot.remaining == 0 {
                self.finish(index, done);
                return;
            }
            slot.iov_start = advance_iovecs(&mut slot.iovecs, slot.iov_start, moved);
        }
        // Not (all) cached, or any error: the ring retries it and reports real errors.
        self.deferred.push(index);
    }

    fn push_deferred(&mut self, done: &mut Vec<Completion>) {
        while let Some(index) = self.deferred.pop() {
            let entry = rw_entry(&self.slots[index as usize], index);
            self.push_for(index, entry, done);
        }
    }

    fn push_for(&mut self, index: u32, entry: squeue::Entry, done: &mut Vec<Completion>) {
        if self.push(entry) {
            self.slots[index as usize].outstanding = 1;
        } else {
            self.slots[index as usize].status = STATUS_IOERR;
            self.finish(index, done);
        }
    }

    fn submit_pending(&mut self) {
        if !self.unsubmitted {
            return;
        }
        for _ in 0..3 {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = !self.ring.submission().is_empty();
                    if !self.unsubmitted {
                        return;
                    }
                }
                // The completion side is backed up; the next reap makes room.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR)
                    ) => {}
                Err(e) => {
                    log::error!("io_uring_enter failed: {e}");
                    return;
                }
            }
        }
    }

    /// Handles every CQE that is ready; returns how many.
    fn reap_cq(&mut self, done: &mut Vec<Completion>) -> usize {
        let mut total = 0;
        // An empty CQ right after a flush: the flush brought nothing, don't spin on it.
        let mut just_flushed = false;
        loop {
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            let count = cqes.len();
            for &(user_data, result) in &cqes {
                self.complete(user_data, result, done);
            }
            self.cqes = cqes;
            total += count;
            // Short transfers were resubmitted; push them before looking again.
            self.submit_pending();
            if count == 0 {
                if just_flushed || !self.flush_overflow() {
                    return total;
                }
                just_flushed = true;
            } else {
                just_flushed = false;
            }
        }
    }

    /// Completions the CQ had no room for (a discard makes one per range, so a ring of them
    /// can outnumber the CQ many times over) wait in the kernel until an io_uring_enter with
    /// GETEVENTS moves them over; nothing else would, and the queue would stall with its slots
    /// taken and the ring's descriptor readable for ever. True if the CQ overflowed.
    fn flush_overflow(&mut self) -> bool {
        if !self.ring.submission().cq_overflow() {
            return false;
        }
        // The crate adds GETEVENTS when it sees the overflow flag.
        if let Err(e) = self.ring.submit() {
            if e.raw_os_error() != Some(libc::EINTR) {
                log::error!("cannot collect overflowed io_uring completions: {e}");
                return false;
            }
        }
        true
    }

    fn complete(&mut self, user_data: u64, result: i32, done: &mut Vec<Completion>) {
        let index = (user_data & 0xffff_ffff) as u32;
        let range_index = (user_data >> 32) as usize;
        let Some(slot) = self.slots.get_mut(index as usize) else {
            log::error!("io_uring completion for unknown slot {index}");
            return;
        };
        slot.outstanding = slot.outstanding.saturating_sub(1);
        match slot.kind {
            Kind::Read | Kind::Write => {
                if result < 0 {
                    log::debug!(
                        "{:?} at {} failed: {}",
                        slot.kind,
                        slot.offset,
                        io::Error::from_raw_os_error(-result)
                    );
                    slot.status = STATUS_IOERR;
                } else if result == 0 && slot.remaining > 0 {
                    // End of file inside the disk: the image shrank under us.
                    slot.status = STATUS_IOERR;
                } else {
                    let moved = (result as usize).min(slot.remaining);
                    slot.remaining -= moved;
                    slot.offset += moved as u64;
                    if slot.remaining > 0 && (self.discard || slot.abandoned) {
                        // The rest would land in (or come from) buffers the guest has taken
                        // back: stop here.
                        slot.status = STATUS_IOERR;
                    } else if slot.remaining > 0 {
                        // A short transfer: go on from where it stopped.
                        slot.iov_start = advance_iovecs(&mut slot.iovecs, slot.iov_start, moved);
                        let entry = rw_entry(slot, index);
                        if self.push(entry) {
                            self.slots[index as usize].outstanding = 1;
                            return;
                        }
                        self.slots[index as usize].status = STATUS_IOERR;
                    }
                }
            }
            Kind::Flush => {
                if result < 0 {
                    log::warn!("flush failed: {}", io::Error::from_raw_os_error(-result));
                    slot.status = STATUS_IOERR;
                }
            }
            Kind::Fallocate => {
                if result < 0 {
                    let range = slot.ranges.get(range_index).copied();
                    let fallback = match range {
                        // File systems without FALLOC_FL_ZERO_RANGE (tmpfs): the disk's
                        // synchronous path emulates it. Rare enough to do inline.
                        Some(r) if -result == libc::EOPNOTSUPP => {
                            self.disk.fallocate(r.mode, r.offset, r.len)
                        }
                        _ => Err(io::Error::from_raw_os_error(-result)),
                    };
                    if let Err(e) = fallback {
                        log::debug!("fallocate failed: {e}");
                        self.slots[index as usize].status = STATUS_IOERR;
                    }
                }
            }
        }
        if self.slots[index as usize].outstanding == 0 {
            self.finish(index, done);
        }
    }

    fn finish(&mut self, index: u32, done: &mut Vec<Completion>) {
        let slot = &mut self.slots[index as usize];
        let abandoned = std::mem::take(&mut slot.abandoned);
        if let Some(mem) = slot.mem.take() {
            if !self.discard && !abandoned {
                write_status(&mem, slot.status_addr, slot.status);
            }
        }
        slot.iovecs.clear();
        slot.ranges.clear();
        if abandoned {
            self.free.push(index);
            self.in_flight -= 1;
            return;
        }
        done.push(Completion {
            head: slot.head,
            used_len: if slot.status == STATUS_OK {
                slot.used_ok
            } else {
                1
            },
        });
        self.free.push(index);
        self.in_flight -= 1;
    }
}

/// The SQE for the rest of a read or write.
fn rw_entry(slot: &Slot, index: u32) -> squeue::Entry {
    let iovecs = &slot.iovecs[slot.iov_start..];
    let file = types::Fixed(slot.file);
    let entry = match (slot.kind, iovecs) {
        // One buffer: plain READ/WRITE skip the kernel's iovec import.
        (Kind::Read, [one]) => opcode::Read::new(file, one.iov_base.cast(), one.iov_len as u32)
            .offset(slot.offset)
            .build(),
        (Kind::Write, [one]) => opcode::Write::new(file, one.iov_base.cast(), one.iov_len as u32)
            .offset(slot.offset)
            .build(),
        (Kind::Read, _) => opcode::Readv::new(file, iovecs.as_ptr(), iovecs.len() as u32)
            .offset(slot.offset)
            .build(),
        _ => opcode::Writev::new(file, iovecs.as_ptr(), iovecs.len() as u32)
            .offset(slot.offset)
            .build(),
    };
    entry.user_data(u64::from(index))
}

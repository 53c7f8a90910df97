//! The synchronous engine: every request runs to completion on the queue's thread with
//! preadv/pwritev/fdatasync/fallocate. One request in flight per queue; kept to compare with
//! the io_uring engine.

use std::sync::Arc;

use cloister_backends::server::GuestMemory;

use crate::disk::Disk;
use crate::engine::{iovecs, Completion};
use crate::request::{write_status, Operation, Request, STATUS_IOERR, STATUS_OK};

pub struct SyncEngine {
    disk: Arc<Disk>,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iovecs` are scratch space, only valid during one `submit`
// call on the owning thread, and never dereferenced outside it.
unsafe impl Send for SyncEngine {}

impl SyncEngine {
    pub fn new(disk: Arc<Disk>) -> Self {
        Self {
            disk,
            iovecs: Vec::new(),
        }
    }

    pub fn submit(&mut self, request: Request, mem: &Arc<GuestMemory>, done: &mut Vec<Completion>) {
        let used_ok = request.used_len_ok();
        let result = match &request.operation {
            Operation::Read { offset, data } | Operation::Write { offset, data } => {
                self.iovecs.clear();
                match iovecs(mem, data, &mut self.iovecs) {
                    Err(()) => Err(std::io::Error::from(std::io::ErrorKind::InvalidInput)),
                    Ok(()) if matches!(request.operation, Operation::Read { .. }) => {
                        self.disk.read_vectored(*offset, &self.iovecs).map(drop)
                    }
                    Ok(()) => self.disk.write_vectored(*offset, &self.iovecs).map(drop),
                }
            }
            Operation::Flush => self.disk.flush(),
            Operation::Fallocate { ranges } => ranges
                .iter()
                .try_for_each(|r| self.disk.fallocate(r.mode, r.offset, r.len)),
        };
        self.iovecs.clear();
        let (status, used_len) = match result {
            Ok(()) => (STATUS_OK, used_ok),
            Err(e) => {
                log::debug!("request at head {} failed: {e}", request.head);
                (STATUS_IOERR, 1)
            }
        };
        write_status(mem, request.status, status);
        done.push(Completion {
            head: request.head,
            used_len,
        });
    }
}

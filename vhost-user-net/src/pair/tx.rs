//! Transmit: frames go to the tap straight from guest memory, one `writev` each.

use vhost_user_backend::VringT;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

use super::{GuestMemory, PairWorker, State, Vring, BATCH};

/// The kernel takes at most this many iovecs per writev.
const MAX_IOVECS: usize = 1024;

impl PairWorker {
    /// Sends what the transmit queue holds to the tap; re-arms notifications when it is empty.
    pub fn serve_tx(&mut self, vring: &Vring, mem: &GuestMemory) {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            return;
        }
        loop {
            if let Err(e) = state.disable_notification() {
                self.guest_error(format_args!("transmit queue: {e}"));
            }
            loop {
                let Some(sent) = self.send_batch(&mut state, mem) else {
                    // An available ring we cannot read: nothing more until the driver resets.
                    return;
                };
                if sent > 0 {
                    self.notify(&mut state);
                }
                if sent < BATCH {
                    break;
                }
            }
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.guest_error(format_args!("transmit queue: {e}"));
                    break;
                }
            }
        }
    }

    /// Sends up to `BATCH` frames; returns how many chains it took, None if the available
    /// ring cannot be read.
    fn send_batch(&mut self, state: &mut State, mem: &GuestMemory) -> Option<usize> {
        let mut done: [(u16, bool); BATCH] = [(0, false); BATCH];
        let mut count = 0;
        {
            let mut chains = match state.get_queue_mut().iter(mem) {
                Ok(chains) => chains,
                Err(e) => {
                    self.guest_error(format_args!("transmit queue: {e}"));
                    return None;
                }
            };
            while count < BATCH {
                let Some(chain) = chains.next() else { break };
                let head = chain.head_index();
                self.iovecs.clear();
                let mut bad = None;
                let mut total = 0usize;
                for desc in chain {
                    if desc.is_write_only() {
                        bad = Some("a transmit buffer the device may only write".to_string());
                        break;
                    }
                    for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                        match slice {
                            Ok(slice) if self.iovecs.len() < MAX_IOVECS => {
                                total += slice.len();
                                self.iovecs.push(libc::iovec {
                                    iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                                    iov_len: slice.len(),
                                });
                            }
                            Ok(_) => bad = Some("more than 1024 segments".to_string()),
                            Err(e) => bad = Some(format!("a buffer outside guest memory: {e}")),
                        }
                    }
                    if bad.is_some() {
                        break;
                    }
                }
                let sent = match bad {
                    Some(why) => Err(why),
                    None if total < 14 + 10 => Err(format!("a {total}-byte frame")),
                    // SAFETY: every iovec points into guest memory mapped for its length,
                    // which `mem` keeps mapped until the call returns.
                    None => unsafe { self.tap.writev(&self.iovecs) }
                        .map(|_| ())
                        .map_err(|e| format!("tap write: {e}")),
                };
                if let Err(why) = &sent {
                    self.guest_error(format_args!("frame dropped: {why}"));
                }
                done[count] = (head, sent.is_ok());
                count += 1;
            }
        }
        self.iovecs.clear();
        for &(head, ok) in &done[..count] {
            if ok {
                self.counters.tx_frames += 1;
            } else {
                self.counters.tx_dropped += 1;
            }
            if let Err(e) = state.add_used(head, 0) {
                self.guest_error(format_args!("cannot return a transmit buffer: {e}"));
            }
        }
        Some(count)
    }
}

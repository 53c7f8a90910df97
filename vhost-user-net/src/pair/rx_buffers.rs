//! Receive buffers taken from the available ring ahead of the frame that will fill them, so
//! that the tap writes each frame straight into guest memory with one `readv`.
//!
//! A frame's length is known only once read, and with MRG_RXBUF it decides how many buffers it
//! takes: so buffers for the longest frame the tap can hand over are held before each read, and
//! those a frame did not need stay held for the next one. Held buffers have been popped but not
//! used; they are always the last ones popped, and they go back to the ring (the next-available
//! index moves back over them) before the worker lets go of the queue, so neither the driver
//! nor a GET_VRING_BASE ever sees them, and their host addresses never outlive the memory
//! table they came from.

use std::collections::VecDeque;

use cloister_backends::server::GuestMemory;
use vhost_user_backend::VringState;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend};

type State = VringState<GuestMemoryAtomic<GuestMemory>>;

/// The kernel takes at most 1024 iovecs per readv; one is kept for the worker's own buffer.
const MAX_IOVECS: usize = 1023;

struct HeldChain {
    head: u16,
    segments: usize,
    capacity: usize,
}

#[derive(Default)]
pub struct HeldBuffers {
    chains: VecDeque<HeldChain>,
    /// Every held chain's segments, in ring order, as host addresses.
    iovecs: Vec<libc::iovec>,
    capacity: usize,
}

// SAFETY: the iovecs point into guest memory only while the worker holds the queue's lock
// (`release` empties them before it lets go), on the thread that holds the worker.
unsafe impl Send for HeldBuffers {}

impl HeldBuffers {
    /// Pops chains until `want` bytes are held (without MRG_RXBUF, until one chain is: a frame
    /// takes one). False when the ring has too few buffers, or one the guest got wrong is next
    /// (the copying path deals with it once the held ones are back). A bad chain that comes
    /// first goes straight back to the guest unused, its fault added to `returned`.
    pub fn top_up(
        &mut self,
        state: &mut State,
        mem: &GuestMemory,
        want: usize,
        mergeable: bool,
        returned: &mut Vec<String>,
    ) -> Result<bool, virtio_queue::Error> {
        loop {
            let enough = if mergeable {
                self.capacity >= want
            } else {
                self.chains.front().is_some_and(|c| c.capacity >= want)
            };
            if enough {
                return Ok(true);
            }
            if !mergeable && !self.chains.is_empty() {
                return Ok(false);
            }
            let Some(chain) = state.get_queue_mut().iter(mem)?.next() else {
                return Ok(false);
            };
            let head = chain.head_index();
            let first = self.iovecs.len();
            let mut capacity = 0usize;
            let mut why = None;
            'chain: for desc in chain {
                if !desc.is_write_only() {
                    why = Some("a receive buffer the device may not write".to_string());
                    break;
                }
                for slice in mem.get_slices(desc.addr(), desc.len() as usize) {
                    match slice {
                        Ok(_) if self.iovecs.len() == MAX_IOVECS => {
                            why = Some("more receive segments than a read takes".to_string());
                            break 'chain;
                        }
                        Ok(slice) => {
                            capacity += slice.len();
                            self.iovecs.push(libc::iovec {
                                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                                iov_len: slice.len(),
                            });
                        }
                        Err(e) => {
                            why = Some(format!("a receive buffer outside guest memory: {e}"));
                            break 'chain;
                        }
                    }
                }
            }
            if why.is_none() && capacity == 0 {
                why = Some("a receive buffer of no bytes".to_string());
            }
            if let Some(why) = why {
                self.iovecs.truncate(first);
                if !self.chains.is_empty() {
                    // Behind held chains: it must stay in ring order behind them.
                    state.get_queue_mut().go_to_previous_position();
                    return Ok(false);
                }
                state.add_used(head, 0)?;
                returned.push(why);
                continue;
            }
            self.chains.push_back(HeldChain {
                head,
                segments: self.iovecs.len() - first,
                capacity,
            });
            self.capacity += capacity;
        }
    }

    /// Where the next frame goes, and its room: every held buffer with MRG_RXBUF, else the
    /// first chain.
    pub fn target(&self, mergeable: bool) -> (&[libc::iovec], usize) {
        let (count, room) = if mergeable {
            (self.iovecs.len(), self.capacity)
        } else {
            self.chains
                .front()
                .map_or((0, 0), |c| (c.segments, c.capacity))
        };
        (&self.iovecs[..count], room)
    }

    /// The number of chains a `len`-byte frame at the front fills.
    pub fn chains_for(&self, len: usize) -> usize {
        let mut covered = 0;
        let mut count = 0;
        for chain in &self.chains {
            if covered >= len && count > 0 {
                break;
            }
            covered += chain.capacity;
            count += 1;
        }
        count
    }

    /// Copies bytes out of the frame at the front, from `offset`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) {
        self.walk(offset, out.len(), |at, host, n| {
            // SAFETY: `host` points into a held, mapped receive buffer with `n` bytes left.
            unsafe { std::ptr::copy_nonoverlapping(host, out[at..].as_mut_ptr(), n) }
        });
    }

    /// Writes bytes into the frame at the front, from `offset`.
    pub fn write_at(&self, offset: usize, bytes: &[u8]) {
        self.walk(offset, bytes.len(), |at, host, n| {
            // SAFETY: as in `read_at`.
            unsafe { std::ptr::copy_nonoverlapping(bytes[at..].as_ptr(), host, n) }
        });
    }

    /// Calls `f(position in the range, host address, bytes)` for each piece of the `len` bytes
    /// at `offset` of the held buffers.
    fn walk(&self, mut offset: usize, len: usize, mut f: impl FnMut(usize, *mut u8, usize)) {
        let mut done = 0;
        for iov in &self.iovecs {
            if done == len {
                break;
            }
            if offset >= iov.iov_len {
                offset -= iov.iov_len;
                continue;
            }
            let n = (iov.iov_len - offset).min(len - done);
            // Within the iovec: `offset` < its length.
            f(done, iov.iov_base.cast::<u8>().wrapping_add(offset), n);
            done += n;
            offset = 0;
        }
    }

    /// Gives the `len`-byte frame at the front to the guest: its first `chains` chains, each
    /// with the bytes that landed in it.
    pub fn complete(
        &mut self,
        state: &mut State,
        mem: &GuestMemory,
        len: usize,
        chains: usize,
    ) -> Result<(), virtio_queue::Error> {
        let mut left = len;
        let mut result = Ok(());
        for _ in 0..chains {
            let Some(chain) = self.chains.pop_front() else {
                break;
            };
            let used = chain.capacity.min(left);
            left -= used;
            self.capacity -= chain.capacity;
            self.iovecs.drain(..chain.segments);
            // Straight on the queue with the memory at hand (VringState's own add_used loads
            // the memory anew for each).
            if let Err(e) = state.get_queue_mut().add_used(mem, chain.head, used as u32) {
                result = Err(e);
            }
        }
        result
    }

    /// Puts every held chain back on the available ring.
    pub fn release(&mut self, state: &mut State) {
        for _ in 0..self.chains.len() {
            state.get_queue_mut().go_to_previous_position();
        }
        self.chains.clear();
        self.iovecs.clear();
        self.capacity = 0;
    }
}

//! The driver side of a split virtqueue (virtio 1.x, 2.7), as a guest kernel would drive it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::memory::GuestRam;
use super::{Error, Result};

const DESC_SIZE: u64 = 16;

/// A buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub writable: bool,
}

impl Buffer {
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// One split virtqueue in [`GuestRam`].
pub struct SplitQueue {
    ram: Arc<GuestRam>,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    free: Vec<u16>,
    /// The descriptors of each outstanding chain, by head.
    chains: Vec<Vec<u16>>,
    /// Next avail index to fill, and the value last published to the device.
    avail_idx: u16,
    published: u16,
    /// Avail index at the last kick decision (for EVENT_IDX kick suppression).
    kicked_at: u16,
    last_used: u16,
    event_idx: bool,
    pub kick: EventFd,
    pub call: EventFd,
    /// Kicks actually sent (EVENT_IDX suppresses some).
    pub kicks: u64,
}

impl SplitQueue {
    /// Lays out a queue of `size` entries (a power of two) in `ram`.
    pub fn new(ram: Arc<GuestRam>, size: u16, event_idx: bool) -> Result<Self> {
        let n = u64::from(size);
        let desc = ram.alloc(DESC_SIZE * n, 4096)?;
        let avail = ram.alloc(6 + 2 * n, 4096)?;
        let used = ram.alloc(6 + 8 * n, 4096)?;
        let kick = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?;
        let call = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?;
        Ok(Self {
            ram,
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); size.into()],
            avail_idx: 0,
            published: 0,
            kicked_at: 0,
            last_used: 0,
            event_idx,
            kick,
            call,
            kicks: 0,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the descriptor table, avail ring and used ring.
    pub fn addresses(&self) -> (GuestAddress, GuestAddress, GuestAddress) {
        (self.desc, self.avail, self.used)
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains a descriptor per buffer and queues the chain (not yet visible: see
    /// [`SplitQueue::notify`]). Returns the head.
    pub fn add(&mut self, buffers: &[Buffer]) -> Result<u16> {
        if buffers.is_empty() || buffers.len() > self.free.len() {
            return Err(Error::QueueFull);
        }
        let indices: Vec<u16> = (0..buffers.len()).filter_map(|_| self.free.pop()).collect();
        for (i, (buffer, &index)) in buffers.iter().zip(&indices).enumerate() {
            let mut flags = 0;
            if buffer.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = indices.get(i + 1).copied();
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_descriptor(index, buffer.addr, buffer.len, flags, next.unwrap_or(0))?;
        }
        let head = indices[0];
        self.chains[usize::from(head)] = indices;
        self.push_avail(head)?;
        Ok(head)
    }

    /// Like [`SplitQueue::add`], but through one indirect descriptor table
    /// (VIRTIO_RING_F_INDIRECT_DESC): the chain takes a single ring descriptor.
    pub fn add_indirect(&mut self, buffers: &[Buffer]) -> Result<u16> {
        let table = self.ram.alloc(DESC_SIZE * buffers.len() as u64, 16)?;
        for (i, buffer) in buffers.iter().enumerate() {
            let mut flags = 0u16;
            if buffer.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let entry = table.unchecked_add(DESC_SIZE * i as u64);
            self.write_raw(
                entry,
                buffer.addr.raw_value(),
                buffer.len,
                flags,
                (i + 1) as u16,
            )?;
        }
        let head = self.free.pop().ok_or(Error::QueueFull)?;
        self.write_descriptor(
            head,
            table,
            (DESC_SIZE * buffers.len() as u64) as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        )?;
        self.chains[usize::from(head)] = vec![head];
        self.push_avail(head)?;
        Ok(head)
    }

    /// Takes `count` descriptors off the free list, for a test that writes them by hand with
    /// [`SplitQueue::write_descriptor`] and queues them with [`SplitQueue::push_avail`].
    pub fn reserve(&mut self, count: usize) -> Result<Vec<u16>> {
        if count > self.free.len() {
            return Err(Error::QueueFull);
        }
        let indices: Vec<u16> = (0..count).filter_map(|_| self.free.pop()).collect();
        if let Some(&head) = indices.first() {
            self.chains[usize::from(head)] = indices.clone();
        }
        Ok(indices)
    }

    /// Writes descriptor `index` as given: nothing is checked, on purpose.
    pub fn write_descriptor(
        &self,
        index: u16,
        addr: GuestAddress,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let entry = self.desc.unchecked_add(DESC_SIZE * u64::from(index));
        self.write_raw(entry, addr.raw_value(), len, flags, next)
    }

    fn write_raw(
        &self,
        at: GuestAddress,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let mut raw = [0u8; DESC_SIZE as usize];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.ram
            .memory()
            .write_slice(&raw, at)
            .map_err(|e| Error::Access(e.to_string()))
    }

    /// Puts `head` in the next avail slot (not yet published).
    pub fn push_avail(&mut self, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx % self.size);
        self.write_u16(self.avail.unchecked_add(4 + 2 * slot), head)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publishes the queued chains and kicks the device unless it asked not to be.
    pub fn notify(&mut self) -> Result<()> {
        if self.avail_idx == self.published {
            return Ok(());
        }
        // Ring entries before the index (release), and the index before reading the device's
        // suppression state (a full fence, as virtio_ring.c's virtqueue_kick_prepare).
        self.store_u16(self.avail.unchecked_add(2), self.avail_idx)?;
        self.published = self.avail_idx;
        fence(Ordering::SeqCst);
        let old = self.kicked_at;
        self.kicked_at = self.avail_idx;
        let kick = if self.event_idx {
            let avail_event = self.load_u16(self.avail_event())?;
            need_event(avail_event, self.avail_idx, old)
        } else {
            self.load_u16(self.used)? & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if kick {
            self.kicks += 1;
            self.kick.write(1).map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Publishes and kicks unconditionally (for tests that check a kick is served).
    pub fn kick_now(&mut self) -> Result<()> {
        self.store_u16(self.avail.unchecked_add(2), self.avail_idx)?;
        self.published = self.avail_idx;
        self.kicked_at = self.avail_idx;
        self.kicks += 1;
        self.kick.write(1).map_err(Error::Io)
    }

    /// With EVENT_IDX: the avail index the device asked to be kicked at, which it moves past
    /// the requests it has taken once it re-enables notifications.
    pub fn device_avail_event(&self) -> Result<u16> {
        self.load_u16(self.avail_event())
    }

    /// The next used element, if any: `(head, len)`. Its descriptors return to the free list.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>> {
        let used_idx = self.load_u16(self.used.unchecked_add(2))?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.size);
        let elem = self.used.unchecked_add(4 + 8 * slot);
        let mut raw = [0u8; 8];
        self.ram
            .memory()
            .read_slice(&mut raw, elem)
            .map_err(|e| Error::Access(e.to_string()))?;
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size && !self.chains[usize::from(h)].is_empty())
            .ok_or(Error::BadUsed { id })?;
        let chain = std::mem::take(&mut self.chains[usize::from(head)]);
        self.free.extend(chain);
        Ok(Some((head, len)))
    }

    /// Asks for an interrupt at the next completion. Returns true if completions arrived
    /// meanwhile (pop them before sleeping, or the wake-up may never come).
    pub fn enable_interrupts(&mut self) -> Result<bool> {
        if self.event_idx {
            self.store_u16(self.used_event(), self.last_used)?;
        } else {
            self.store_u16(self.avail, 0)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.load_u16(self.used.unchecked_add(2))? != self.last_used)
    }

    /// Tells the device not to interrupt (while polling the used ring anyway).
    pub fn disable_interrupts(&mut self) -> Result<()> {
        if !self.event_idx {
            self.store_u16(self.avail, VRING_AVAIL_F_NO_INTERRUPT as u16)?;
        }
        // With EVENT_IDX, used_event simply stays behind.
        Ok(())
    }

    /// Waits up to `timeout` for the call eventfd; true if it fired.
    pub fn wait_call(&self, timeout: Duration) -> Result<bool> {
        let mut fds = [libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        loop {
            // SAFETY: one valid pollfd for the duration of the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            if ret < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Io(e));
            }
            if ret == 0 {
                return Ok(false);
            }
            // Non-blocking read resets the counter; EAGAIN can't happen after POLLIN.
            let _ = self.call.read();
            return Ok(true);
        }
    }

    /// Waits for the next used element, at most `timeout`.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<(u16, u32)> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(used) = self.pop_used()? {
                return Ok(used);
            }
            if self.enable_interrupts()? {
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !self.wait_call(left)? {
                if let Some(used) = self.pop_used()? {
                    return Ok(used);
                }
                return Err(Error::Timeout(timeout));
            }
        }
    }

    /// `used_event`, written by the driver at the end of the avail ring.
    fn used_event(&self) -> GuestAddress {
        self.avail.unchecked_add(4 + 2 * u64::from(self.size))
    }

    /// `avail_event`, written by the device at the end of the used ring.
    fn avail_event(&self) -> GuestAddress {
        self.used.unchecked_add(4 + 8 * u64::from(self.size))
    }

    fn write_u16(&self, at: GuestAddress, value: u16) -> Result<()> {
        self.ram
            .memory()
            .write_obj(value.to_le(), at)
            .map_err(|e| Error::Access(e.to_string()))
    }

    fn store_u16(&self, at: GuestAddress, value: u16) -> Result<()> {
        self.ram
            .memory()
            .store(value.to_le(), at, Ordering::Release)
            .map_err(|e| Error::Access(e.to_string()))
    }

    fn load_u16(&self, at: GuestAddress) -> Result<u16> {
        self.ram
            .memory()
            .load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| Error::Access(e.to_string()))
    }
}

/// virtio's `vring_need_event`: did the index move past `event` between `old` and `new`?
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn need_event_matches_virtio() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 3, 0));
        assert!(need_event(2, 3, 0));
        assert!(need_event(u16::MAX, 0, u16::MAX));
    }
}

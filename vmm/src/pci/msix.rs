//! MSI-X: the capability, the vector table and pending-bit array a device exposes in a BAR,
//! and the KVM side that delivers each vector without the VMM.
//!
//! Every vector owns an eventfd and a GSI. While the vector can fire (MSI-X enabled, function
//! and vector unmasked) the eventfd is an irqfd on that GSI, whose route is the guest's
//! message: whoever signals the eventfd (a vhost-user backend) interrupts the guest directly.
//! While it is masked the irqfd is deassigned, so signals stay counted in the eventfd: the PBA
//! reports them, and KVM delivers them when the irqfd is assigned again on unmask (it checks the
//! eventfd when an irqfd is created).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vm_ops::{VmOps, VmOpsError};

pub const MSIX_CAP_ID: u8 = 0x11;
pub const MSIX_CAP_LEN: usize = 12;
/// Offset of Message Control in the capability.
pub const MSIX_CONTROL_OFFSET: usize = 2;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
pub const ENTRY_SIZE: u64 = 16;
const ENTRY_MASKED: u32 = 1;
/// Architectural limit (11-bit table size field).
pub const MAX_VECTORS: u16 = 2048;

/// The capability body and its write mask: only Enable and Function Mask are writable.
pub fn capability(
    vectors: u16,
    bar: u8,
    table_offset: u32,
    pba_offset: u32,
) -> ([u8; MSIX_CAP_LEN], [u8; MSIX_CAP_LEN]) {
    let mut body = [0u8; MSIX_CAP_LEN];
    body[0] = MSIX_CAP_ID;
    body[2..4].copy_from_slice(&(vectors.saturating_sub(1) & 0x7ff).to_le_bytes());
    body[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
    body[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
    let mut wmask = [0u8; MSIX_CAP_LEN];
    wmask[2..4].copy_from_slice(&(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
    (body, wmask)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    /// Vectors come out of reset masked.
    fn default() -> Self {
        MsixEntry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

impl MsixEntry {
    pub fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }

    pub fn address(&self) -> u64 {
        (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo)
    }

    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.addr_lo.to_le_bytes());
        b[4..8].copy_from_slice(&self.addr_hi.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..16].copy_from_slice(&self.control.to_le_bytes());
        b
    }
}

/// The guest-visible state: table entries, Enable and Function Mask.
#[derive(Debug)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    pub fn new(vectors: u16) -> Self {
        MsixTable {
            entries: vec![MsixEntry::default(); usize::from(vectors.min(MAX_VECTORS))],
            enabled: false,
            function_masked: false,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entry(&self, vector: usize) -> Option<&MsixEntry> {
        self.entries.get(vector)
    }

    /// Whether `vector` may interrupt the guest now.
    pub fn can_fire(&self, vector: usize) -> bool {
        self.enabled
            && !self.function_masked
            && self.entries.get(vector).is_some_and(|e| !e.masked())
    }

    /// Applies a Message Control value; true if Enable or Function Mask changed.
    pub fn set_control(&mut self, control: u16) -> bool {
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_FUNCTION_MASK != 0;
        let changed = enabled != self.enabled || masked != self.function_masked;
        self.enabled = enabled;
        self.function_masked = masked;
        changed
    }

    /// Reads from the table region; bytes past the table read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let idx = (at / ENTRY_SIZE) as usize;
            *b = self
                .entries
                .get(idx)
                .map_or(0, |e| e.bytes()[(at % ENTRY_SIZE) as usize]);
        }
    }

    /// Writes to the table region (dword or qword accesses, as the spec requires of
    /// software; anything else is ignored). Returns the vectors whose entry changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<usize> {
        let mut changed = Vec::new();
        if !(data.len() == 4 || data.len() == 8) || offset % 4 != 0 {
            return changed;
        }
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let at = offset + 4 * i as u64;
            let idx = (at / ENTRY_SIZE) as usize;
            let Some(e) = self.entries.get_mut(idx) else {
                continue;
            };
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let before = *e;
            match at % ENTRY_SIZE {
                0 => e.addr_lo = v,
                4 => e.addr_hi = v,
                8 => e.data = v,
                // Only the mask bit of Vector Control is defined.
                _ => e.control = v & ENTRY_MASKED,
            }
            if *e != before && !changed.contains(&idx) {
                changed.push(idx);
            }
        }
        changed
    }

    /// Reads from the pending-bit array; `pending(v)` says whether vector `v` has a pending
    /// message.
    pub fn read_pba(&self, offset: u64, data: &mut [u8], pending: impl Fn(usize) -> bool) {
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| first + bit < self.entries.len() && pending(first + bit))
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }
}

/// One vector's KVM side.
struct Vector {
    gsi: u32,
    event: EventFd,
    /// The message KVM routes `gsi` to, once programmed.
    route: Option<(u64, u32)>,
    irqfd: bool,
}

/// An MSI-X table wired to KVM.
pub struct MsixVectors {
    pub table: MsixTable,
    vectors: Vec<Vector>,
    vm: Arc<dyn VmOps>,
}

impl MsixVectors {
    pub fn new(count: u16, vm: Arc<dyn VmOps>) -> Result<Self, MsixError> {
        let table = MsixTable::new(count);
        let len = table.len();
        // Built in place, so that a failure part-way gives back the GSIs taken (Drop).
        let mut msix = MsixVectors {
            table,
            vectors: Vec::with_capacity(len),
            vm,
        };
        for _ in 0..len {
            let gsi = msix.vm.allocate_gsi()?;
            let event = match EventFd::new(EFD_NONBLOCK) {
                Ok(e) => e,
                Err(e) => {
                    msix.vm.free_gsi(gsi);
                    return Err(MsixError::EventFd(e));
                }
            };
            msix.vectors.push(Vector {
                gsi,
                event,
                route: None,
                irqfd: false,
            });
        }
        Ok(msix)
    }

    /// The eventfd that raises `vector` (a vhost-user call fd, or our own config interrupt).
    pub fn event(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.event)
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Result<(), MsixError> {
        for v in self.table.write(offset, data) {
            self.sync(v)?;
        }
        Ok(())
    }

    pub fn set_control(&mut self, control: u16) -> Result<(), MsixError> {
        if self.table.set_control(control) {
            for v in 0..self.vectors.len() {
                self.sync(v)?;
            }
        }
        Ok(())
    }

    /// A masked vector is pending when its eventfd has been signalled since it was masked.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let vectors = &self.vectors;
        self.table.read_pba(offset, data, |v| {
            vectors
                .get(v)
                .is_some_and(|v| !v.irqfd && readable(&v.event))
        });
    }

    /// Makes KVM match the table for `vector`.
    fn sync(&mut self, vector: usize) -> Result<(), MsixError> {
        let (Some(v), Some(entry)) = (self.vectors.get_mut(vector), self.table.entry(vector))
        else {
            return Ok(());
        };
        if self.table.can_fire(vector) {
            let msg = (entry.address(), entry.data);
            if v.route != Some(msg) {
                self.vm.set_msi_route(v.gsi, msg.0, msg.1)?;
                v.route = Some(msg);
            }
            if !v.irqfd {
                self.vm.register_irqfd(&v.event, v.gsi)?;
                v.irqfd = true;
            }
        } else if v.irqfd {
            self.vm.unregister_irqfd(&v.event, v.gsi)?;
            v.irqfd = false;
        }
        Ok(())
    }
}

impl Drop for MsixVectors {
    fn drop(&mut self) {
        for v in &self.vectors {
            if v.irqfd {
                let _ = self.vm.unregister_irqfd(&v.event, v.gsi);
            }
            self.vm.free_gsi(v.gsi);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("cannot create an MSI-X vector's eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmOpsError),
}

/// Whether an eventfd's counter is non-zero, without consuming it.
fn readable(e: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: e.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_ops::fake::FakeVmOps;

    fn w32(t: &mut MsixTable, off: u64, v: u32) -> Vec<usize> {
        t.write(off, &v.to_le_bytes())
    }

    #[test]
    fn capability_layout() {
        let (body, wmask) = capability(3, 0, 0x4000, 0x5000);
        assert_eq!(body[0], 0x11);
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2);
        assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0x5000);
        assert_eq!(&wmask[2..4], &[0, 0xc0]);
    }

    #[test]
    fn table_entries_and_masking() {
        let mut t = MsixTable::new(2);
        assert!(t.entry(0).unwrap().masked());
        assert!(!t.can_fire(0));
        assert_eq!(w32(&mut t, 16, 0xfee0_1000), vec![1]);
        assert_eq!(w32(&mut t, 16 + 8, 0x41), vec![1]);
        assert_eq!(w32(&mut t, 16 + 12, 0xffff_fffe), vec![1], "unmask");
        assert_eq!(t.entry(1).unwrap().control, 0, "reserved bits read zero");
        assert!(!t.can_fire(1), "MSI-X still disabled");
        assert!(t.set_control(1 << 15));
        assert!(t.can_fire(1));
        assert!(t.set_control((1 << 15) | (1 << 14)));
        assert!(!t.can_fire(1), "function mask");
        assert!(!t.set_control((1 << 15) | (1 << 14)));
        // Same value: no change reported. Past the table: ignored.
        assert!(w32(&mut t, 16 + 8, 0x41).is_empty());
        assert!(w32(&mut t, 64, 1).is_empty());
        // Byte writes are not allowed by the spec.
        assert!(t.write(0, &[1]).is_empty());
        // A qword write covers two dwords of one entry.
        assert_eq!(t.write(0, &0x1_fee0_0000u64.to_le_bytes()), vec![0]);
        assert_eq!(t.entry(0).unwrap().address(), 0x1_fee0_0000);
        let mut b = [0u8; 4];
        t.read(16 + 8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x41);
        t.read(64, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn pba_bits() {
        let t = MsixTable::new(10);
        let mut b = [0u8; 8];
        t.read_pba(0, &mut b, |v| v == 1 || v == 9 || v == 12);
        assert_eq!(b, [0b10, 0b10, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn irqfds_follow_masks_and_pending_survives() {
        let vm = Arc::new(FakeVmOps::default());
        let mut m = MsixVectors::new(2, vm.clone()).unwrap();
        let fd0 = m.event(0).unwrap().as_raw_fd();
        m.write_table(0, &0xfee0_0000u32.to_le_bytes()).unwrap();
        m.write_table(8, &0x30u32.to_le_bytes()).unwrap();
        m.write_table(12, &0u32.to_le_bytes()).unwrap();
        assert!(vm.state().irqfds.is_empty(), "MSI-X not enabled yet");
        m.set_control(1 << 15).unwrap();
        assert_eq!(vm.state().routes.get(&24), Some(&(0xfee0_0000, 0x30)));
        assert!(vm.state().irqfds.contains(&(fd0, 24)));
        assert_eq!(vm.state().irqfds.len(), 1, "vector 1 is still masked");

        // Mask vector 0, then the backend signals: the PBA shows it.
        m.write_table(12, &1u32.to_le_bytes()).unwrap();
        assert!(vm.state().irqfds.is_empty());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.event(0).unwrap().write(1).unwrap();
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        // A new message while masked reaches KVM on unmask, with the irqfd.
        m.write_table(8, &0x31u32.to_le_bytes()).unwrap();
        assert_eq!(vm.state().routes.get(&24), Some(&(0xfee0_0000, 0x30)));
        m.write_table(12, &0u32.to_le_bytes()).unwrap();
        assert_eq!(vm.state().routes.get(&24), Some(&(0xfee0_0000, 0x31)));
        assert!(vm.state().irqfds.contains(&(fd0, 24)));

        // Disabling MSI-X drops every irqfd; dropping the table too.
        m.set_control(0).unwrap();
        assert!(vm.state().irqfds.is_empty());
        m.set_control(1 << 15).unwrap();
        drop(m);
        assert!(vm.state().irqfds.is_empty());
    }
}

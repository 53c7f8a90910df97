//! A type 0 (endpoint) configuration header: the 256 bytes of conventional config space with a
//! write mask per byte, BARs that size themselves the standard way, and a capability list.
//!
//! Everything a guest can change goes through the write mask, so the rules live in data: BAR
//! address bits, a few command bits, the interrupt line, and whatever each capability marks
//! writable. Extended config space (ECAM offsets 0x100-0xfff) reads as zero: no extended
//! capabilities.

use thiserror::Error;

pub const CONFIG_SPACE_SIZE: usize = 256;
/// What ECAM decodes per function; everything past [`CONFIG_SPACE_SIZE`] reads as zero.
pub const ECAM_FUNCTION_SIZE: usize = 4096;
pub const NUM_BARS: usize = 6;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
/// The first capability goes right after the standard header.
const FIRST_CAPABILITY: usize = 0x40;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

const BAR_MEM_64: u32 = 0b10 << 1;
const BAR_PREFETCHABLE: u32 = 1 << 3;
/// The low four bits of a memory BAR are type flags, never address bits.
const BAR_FLAGS_MASK: u64 = 0xf;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("BAR {0} does not exist or is already in use")]
    BarIndex(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    #[error("BAR address {addr:#x} is not aligned to its size {size:#x}")]
    BarAlignment { addr: u64, size: u64 },
    #[error("no room for a {0}-byte capability in config space")]
    CapabilitySpace(usize),
}

/// The identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// Base class, subclass and programming interface, most significant byte first.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub size: u64,
    pub is_64bit: bool,
}

pub struct ConfigSpace {
    regs: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    /// Slots taken, including the upper halves of 64-bit BARs.
    bar_slots_used: [bool; NUM_BARS],
    /// Where the next capability goes, and the pointer byte to link it from.
    next_capability: usize,
    last_link: usize,
}

impl ConfigSpace {
    pub fn new(header: &Header) -> Self {
        let mut cs = ConfigSpace {
            regs: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            bars: [None; NUM_BARS],
            bar_slots_used: [false; NUM_BARS],
            next_capability: FIRST_CAPABILITY,
            last_link: CAPABILITIES_POINTER,
        };
        cs.put_u16(VENDOR_ID, header.vendor_id);
        cs.put_u16(DEVICE_ID, header.device_id);
        cs.regs[REVISION_ID] = header.revision_id;
        cs.regs[CLASS_CODE] = header.class_code as u8;
        cs.regs[CLASS_CODE + 1] = (header.class_code >> 8) as u8;
        cs.regs[CLASS_CODE + 2] = (header.class_code >> 16) as u8;
        cs.regs[HEADER_TYPE] = 0;
        cs.put_u16(SUBSYSTEM_VENDOR_ID, header.subsystem_vendor_id);
        cs.put_u16(SUBSYSTEM_ID, header.subsystem_id);
        let command_mask = COMMAND_IO
            | COMMAND_MEMORY
            | COMMAND_BUS_MASTER
            | COMMAND_PARITY
            | COMMAND_SERR
            | COMMAND_INTX_DISABLE;
        cs.wmask[COMMAND..COMMAND + 2].copy_from_slice(&command_mask.to_le_bytes());
        // Scratch registers firmware and drivers write; they have no effect here.
        cs.wmask[CACHE_LINE_SIZE] = 0xff;
        cs.wmask[LATENCY_TIMER] = 0xff;
        cs.wmask[INTERRUPT_LINE] = 0xff;
        cs
    }

    /// A memory BAR of `size` bytes (a power of two), initially at `addr` (as firmware would
    /// have assigned it). A 64-bit BAR also takes slot `index + 1`.
    pub fn add_memory_bar(
        &mut self,
        index: usize,
        size: u64,
        addr: u64,
        is_64bit: bool,
        prefetchable: bool,
    ) -> Result<(), ConfigSpaceError> {
        let slots = if is_64bit { 2 } else { 1 };
        if index + slots > NUM_BARS || self.bar_slots_used[index..index + slots].contains(&true) {
            return Err(ConfigSpaceError::BarIndex(index));
        }
        if !size.is_power_of_two() || size < 16 || (!is_64bit && size > 1 << 31) {
            return Err(ConfigSpaceError::BarSize(size));
        }
        if addr % size != 0 || (!is_64bit && addr > u64::from(u32::MAX)) {
            return Err(ConfigSpaceError::BarAlignment { addr, size });
        }
        let mut flags = 0;
        if is_64bit {
            flags |= BAR_MEM_64;
        }
        if prefetchable {
            flags |= BAR_PREFETCHABLE;
        }
        // Address bits below the size are hard-wired to zero: writing all ones and reading back
        // tells the guest the size.
        let mask = !(size - 1) & !BAR_FLAGS_MASK;
        let off = BAR0 + index * 4;
        self.put_u32(off, (addr as u32) | flags);
        self.wmask[off..off + 4].copy_from_slice(&(mask as u32).to_le_bytes());
        if is_64bit {
            self.put_u32(off + 4, (addr >> 32) as u32);
            self.wmask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(Bar { size, is_64bit });
        self.bar_slots_used[index..index + slots].fill(true);
        Ok(())
    }

    /// Appends a capability. `body` starts with the capability ID and a placeholder next
    /// pointer (filled in here); `wmask` says which of its bits the guest may write. Returns its
    /// offset in config space.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize, ConfigSpaceError> {
        let offset = self.next_capability;
        let end = offset + body.len();
        if body.len() < 2 || wmask.len() != body.len() || end > CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::CapabilitySpace(body.len()));
        }
        self.regs[offset..end].copy_from_slice(body);
        self.regs[offset + 1] = 0;
        self.wmask[offset..end].copy_from_slice(wmask);
        // ID and next pointer are never writable.
        self.wmask[offset] = 0;
        self.wmask[offset + 1] = 0;
        self.regs[self.last_link] = offset as u8;
        self.last_link = offset + 1;
        self.next_capability = end.next_multiple_of(4);
        let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
        self.put_u16(STATUS, status);
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset`; anything outside the 256 bytes reads as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes through the write mask; read-only bits and bytes outside config space keep their
    /// value.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            if at < CONFIG_SPACE_SIZE {
                let m = self.wmask[at];
                self.regs[at] = (self.regs[at] & !m) | (v & m);
            }
        }
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// The address the guest has programmed into BAR `index` (flags stripped).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let off = BAR0 + index * 4;
        let mut addr = u64::from(self.u32_at(off)) & !BAR_FLAGS_MASK;
        if bar.is_64bit {
            addr |= u64::from(self.u32_at(off + 4)) << 32;
        }
        Some(addr)
    }

    /// Where BAR `index` should be decoded right now: only while memory decoding is on, as on
    /// hardware (guests turn it off while they size BARs).
    pub fn bar_mapping(&self, index: usize) -> Option<(u64, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let bar = self.bar(index)?;
        Some((self.bar_address(index)?, bar.size))
    }

    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.regs[off], self.regs[off + 1]])
    }

    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.regs[off],
            self.regs[off + 1],
            self.regs[off + 2],
            self.regs[off + 3],
        ])
    }

    fn put_u16(&mut self, off: usize, v: u16) {
        self.regs[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u32(&mut self, off: usize, v: u32) {
        self.regs[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class_code: 0x01_80_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn read32(cs: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0u8; 4];
        cs.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_is_read_only() {
        let mut cs = ConfigSpace::new(&header());
        assert_eq!(read32(&cs, 0), 0x1042_1af4);
        cs.write(0, &[0, 0, 0, 0]);
        assert_eq!(read32(&cs, 0), 0x1042_1af4);
        assert_eq!(read32(&cs, 8), 0x0180_0001);
        assert_eq!(read32(&cs, 0x2c), 0x0040_1af4);
        // Extended config space reads as zero, and writes there are ignored.
        cs.write(0x100, &[1, 2, 3, 4]);
        assert_eq!(read32(&cs, 0x100), 0);
        assert_eq!(read32(&cs, 0xffc), 0);
    }

    #[test]
    fn command_register_mask() {
        let mut cs = ConfigSpace::new(&header());
        cs.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(cs.command(), 0x547);
        // Status is read-only (we have no error bits to clear).
        cs.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(cs.u16_at(STATUS), 0);
    }

    #[test]
    fn bar64_sizing_and_relocation() {
        let mut cs = ConfigSpace::new(&header());
        cs.add_memory_bar(0, 0x8000, 0x1_0000_0000, true, false)
            .unwrap();
        assert_eq!(read32(&cs, BAR0), 0x4);
        assert_eq!(read32(&cs, BAR0 + 4), 1);
        assert_eq!(cs.bar_mapping(0), None, "decode is off at reset");
        cs.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(cs.bar_mapping(0), Some((0x1_0000_0000, 0x8000)));
        // Sizing: all ones in both halves reads back the size mask with the flags.
        cs.write(BAR0, &[0xff; 4]);
        cs.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(read32(&cs, BAR0), 0xffff_8004);
        assert_eq!(read32(&cs, BAR0 + 4), 0xffff_ffff);
        // Relocation, one dword at a time.
        cs.write(BAR0, &0x2000_0000u32.to_le_bytes());
        cs.write(BAR0 + 4, &2u32.to_le_bytes());
        assert_eq!(cs.bar_address(0), Some(0x2_2000_0000));
        // Unaligned address bits are dropped.
        cs.write(BAR0, &0x2000_1234u32.to_le_bytes());
        assert_eq!(cs.bar_address(0), Some(0x2_2000_0000));
        assert!(cs.bar(1).is_none());
    }

    #[test]
    fn bar32_sizing() {
        let mut cs = ConfigSpace::new(&header());
        cs.add_memory_bar(2, 0x1000, 0xc000_0000, false, true)
            .unwrap();
        assert_eq!(read32(&cs, BAR0 + 8), 0xc000_0008);
        cs.write(BAR0 + 8, &[0xff; 4]);
        assert_eq!(read32(&cs, BAR0 + 8), 0xffff_f008);
        // Unused BARs read zero and ignore writes.
        cs.write(BAR0 + 12, &[0xff; 4]);
        assert_eq!(read32(&cs, BAR0 + 12), 0);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut cs = ConfigSpace::new(&header());
        assert_eq!(
            cs.add_memory_bar(0, 0x3000, 0, true, false),
            Err(ConfigSpaceError::BarSize(0x3000))
        );
        assert_eq!(
            cs.add_memory_bar(5, 0x1000, 0, true, false),
            Err(ConfigSpaceError::BarIndex(5))
        );
        assert!(matches!(
            cs.add_memory_bar(0, 0x1000, 0x800, false, false),
            Err(ConfigSpaceError::BarAlignment { .. })
        ));
        cs.add_memory_bar(0, 0x1000, 0, true, false).unwrap();
        assert_eq!(
            cs.add_memory_bar(1, 0x1000, 0, false, false),
            Err(ConfigSpaceError::BarIndex(1))
        );
    }

    #[test]
    fn capabilities_chain() {
        let mut cs = ConfigSpace::new(&header());
        let a = cs
            .add_capability(&[0x09, 0xaa, 6, 1, 2, 3], &[0; 6])
            .unwrap();
        let b = cs
            .add_capability(&[0x11, 0, 0, 0], &[0xff, 0xff, 0, 0xc0])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(cs.regs[CAPABILITIES_POINTER], 0x40);
        assert_eq!(cs.regs[0x41], 0x48, "a links to b");
        assert_eq!(cs.regs[0x49], 0, "b ends the list");
        assert_ne!(cs.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        // Only the masked bits are writable: ID and next pointer never are.
        cs.write(0x48, &[0, 0x55, 0xff, 0xff]);
        assert_eq!(read32(&cs, 0x48), 0xc000_0011);
        assert!(cs.add_capability(&[0; 200], &[0; 200]).is_err());
    }
}

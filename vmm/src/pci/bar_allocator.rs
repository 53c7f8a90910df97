//! Hands out naturally aligned ranges of a PCI MMIO window for BARs, the way firmware assigns
//! them before the guest boots. Devices are only added at start-up, so a bump allocator is
//! enough: nothing is ever freed.

use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BarAllocError {
    #[error("BAR size {0:#x} is not a power of two")]
    Size(u64),
    #[error("no room for a {size:#x}-byte BAR in the {window} PCI window")]
    Exhausted { size: u64, window: &'static str },
}

pub struct BarAllocator {
    name: &'static str,
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// The window `[start, start + size)`; `name` is for messages.
    pub fn new(name: &'static str, start: u64, size: u64) -> Self {
        BarAllocator {
            name,
            next: start,
            end: start.saturating_add(size),
        }
    }

    /// A `size`-byte range aligned to `size` (BARs must be naturally aligned).
    pub fn allocate(&mut self, size: u64) -> Result<u64, BarAllocError> {
        if !size.is_power_of_two() {
            return Err(BarAllocError::Size(size));
        }
        let exhausted = BarAllocError::Exhausted {
            size,
            window: self.name,
        };
        let start = self
            .next
            .checked_next_multiple_of(size)
            .ok_or(exhausted.clone())?;
        let end = start.checked_add(size).ok_or(exhausted.clone())?;
        if end > self.end {
            return Err(exhausted);
        }
        self.next = end;
        Ok(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_disjoint() {
        let mut a = BarAllocator::new("32-bit", 0xc000_0000, 0x10_0000);
        assert_eq!(a.allocate(0x1000), Ok(0xc000_0000));
        assert_eq!(a.allocate(0x8000), Ok(0xc000_8000));
        assert_eq!(a.allocate(0x10), Ok(0xc001_0000));
        assert_eq!(a.allocate(0x4000), Ok(0xc001_4000));
    }

    #[test]
    fn refuses_bad_sizes_and_overflow() {
        let mut a = BarAllocator::new("32-bit", 0xc000_0000, 0x10_000);
        assert_eq!(a.allocate(0x3000), Err(BarAllocError::Size(0x3000)));
        assert_eq!(a.allocate(0), Err(BarAllocError::Size(0)));
        assert_eq!(a.allocate(0x10_000), Ok(0xc000_0000));
        assert!(matches!(
            a.allocate(0x10),
            Err(BarAllocError::Exhausted { .. })
        ));
        let mut top = BarAllocator::new("64-bit", u64::MAX - 0xfff, 0x1000);
        assert!(top.allocate(0x2000).is_err());
    }
}

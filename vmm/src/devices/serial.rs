//! COM1: a 16550A (vm-superio) at 0x3f8, IRQ 4 through an irqfd.

use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::BusDevice;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by signalling the irqfd KVM has for GSI 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input pump when the guest has drained the receive FIFO, so it can read more
/// from stdin instead of dropping bytes.
pub struct InputEvents {
    pub drained: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.drained.write(1);
    }
}

pub type Output = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Mutex<Serial<IrqTrigger, InputEvents, Output>>,
}

impl SerialDevice {
    /// `irq` must already be registered as an irqfd for [`COM1_IRQ`].
    pub fn new(irq: EventFd, out: Output) -> io::Result<Self> {
        let events = InputEvents {
            drained: EventFd::new(EFD_NONBLOCK)?,
        };
        Ok(SerialDevice {
            uart: Mutex::new(Serial::with_events(IrqTrigger(irq), events, out)),
        })
    }

    fn uart(&self) -> MutexGuard<'_, Serial<IrqTrigger, InputEvents, Output>> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues guest input; returns how many bytes fitted (0 when the FIFO is full).
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart();
        if uart.fifo_capacity() == 0 {
            return 0;
        }
        uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn fifo_capacity(&self) -> usize {
        self.uart().fifo_capacity()
    }

    /// An eventfd that becomes readable when the guest empties the receive FIFO.
    pub fn drained_event(&self) -> io::Result<EventFd> {
        self.uart().events().drained.try_clone()
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // The UART's registers are bytes; wider accesses are not something drivers do.
        if let ([b], Ok(off)) = (&mut *data, u8::try_from(offset)) {
            *b = self.uart().read(off);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            // An output error (stdout closed, disk full) must not stop the guest; the byte is
            // lost, as on a real line with nobody listening.
            let _ = self.uart().write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input() {
        let sink = Sink::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone())).unwrap();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");

        // Enable the receive-data interrupt (IER bit 0), then queue input.
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'b');
        assert_eq!(dev.drained_event().unwrap().read().unwrap(), 1);
    }

    #[test]
    fn wide_and_empty_accesses_are_ignored() {
        let sink = Sink::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(irq, Box::new(sink.clone())).unwrap();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.read(7, &mut []);
        dev.write(0, b"ab");
        dev.write(0, &[]);
        dev.write(u64::MAX, b"a");
        assert!(sink.0.lock().unwrap().is_empty());
    }
}

//! Just enough of the i8042 keyboard controller for the guest to reset the machine by writing
//! 0xfe to port 0x64 (Linux's `reboot=k`).

use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use crate::exit::{ExitLatch, ExitReason};

/// Data port 0x60 through command port 0x64; vm-superio expects offsets relative to 0x60.
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_RESET_COMMAND: u8 = 0xfe;

pub struct ResetTrigger(pub Arc<ExitLatch>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reboot);
        Ok(())
    }
}

pub struct I8042 {
    dev: Mutex<I8042Device<ResetTrigger>>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitLatch>) -> Self {
        I8042 {
            dev: Mutex::new(I8042Device::new(ResetTrigger(exit))),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so reset loops never wait.
        let v = match u8::try_from(offset) {
            Ok(off) => self.dev.lock().unwrap_or_else(|e| e.into_inner()).read(off),
            Err(_) => 0,
        };
        data.fill(v);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let ([v], Ok(off)) = (data, u8::try_from(offset)) {
            let _ = self
                .dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(off, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reboot() {
        let exit = Arc::new(ExitLatch::new().unwrap());
        let dev = I8042::new(exit.clone());
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None, "0xfe on the data port is not a reset");
        dev.write(4, &[0xd1]);
        assert_eq!(exit.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }
}

//! Raw mode for the controlling terminal while the guest owns the console.

use std::io;

/// What stdin is, as far as the guest console is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdin {
    /// A terminal whose foreground process group is ours: raw mode, and the guest reads it.
    ForegroundTty,
    /// A terminal that belongs to another process group (we were started with `&`, or
    /// `bg`): changing its settings would stop us with SIGTTOU and reading it with SIGTTIN,
    /// so the console is output only.
    BackgroundTty,
    /// A pipe, a file or /dev/null: the guest reads it as it is, without job control.
    NotATty,
}

impl Stdin {
    pub fn probe() -> Self {
        // SAFETY: isatty, tcgetpgrp and getpgrp only inspect the descriptor and the process.
        unsafe {
            if libc::isatty(libc::STDIN_FILENO) != 1 {
                Stdin::NotATty
            } else if libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp() {
                Stdin::ForegroundTty
            } else {
                Stdin::BackgroundTty
            }
        }
    }

    /// Whether the guest console may read stdin.
    pub fn readable(self) -> bool {
        self != Stdin::BackgroundTty
    }
}

/// Puts stdin in raw mode if it is a terminal we are in the foreground of, and restores the saved settings when dropped
/// (every return path, and unwinding).
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    pub fn enable() -> io::Result<Self> {
        if Stdin::probe() != Stdin::ForegroundTty {
            return Ok(RawTerminal { saved: None });
        }
        // SAFETY: tcgetattr fills the zeroed struct; we check the result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // No line editing, echo or signal keys (Ctrl-C goes to the guest), no CR/LF or flow
        // control translation on input; output processing stays on.
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON | libc::INLCR | libc::IGNCR);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: valid descriptor and struct.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawTerminal { saved: Some(saved) })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restoring settings we read from the same descriptor.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

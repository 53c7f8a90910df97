//! A line of text assembled on the stack and written with one write(2): for the places that
//! must not allocate (a signal handler, a child between fork and exec).

/// At most 400 bytes; what does not fit is cut.
pub struct Line {
    buf: [u8; 400],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    pub fn new() -> Self {
        Self {
            buf: [0; 400],
            len: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.push(s.as_bytes())
    }

    /// `n` in decimal.
    pub fn num(&mut self, mut n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// One write(2) to stderr; nothing to do if stderr is gone.
    pub fn write_stderr(&self) {
        // SAFETY: write(2) of our own buffer.
        unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_and_cuts() {
        let mut line = Line::new();
        line.str("errno ").num(0).str(" ").num(u64::MAX);
        assert_eq!(line.bytes(), b"errno 0 18446744073709551615");
        let mut long = Line::new();
        long.push(&[b'x'; 500]);
        assert_eq!(long.bytes().len(), 400);
    }
}

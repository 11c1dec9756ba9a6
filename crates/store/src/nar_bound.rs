//! Finding where a NAR ends in a stream that goes on after it (AddMultipleToStore sends
//! info, NAR, info, NAR, … in one framed stream): [`NarBounded`] reads exactly the NAR's
//! bytes from its input, following the archive's structure token by token, and then
//! reports the end of input, so that `firn_store::nar`'s parser (which buffers, and
//! wants nothing after the archive) can restore from it. It checks only what it needs
//! to find the end (string framing and parentheses); the parser checks the rest.

use std::io::{self, Read};

/// Longest structural token (`nix-archive-1`), with room to spare; names, symlink
/// targets and file contents are data, not tokens, and are not limited here.
const MAX_TOKEN: u64 = 64;

#[derive(Debug)]
enum State {
    /// The next thing is a string's length.
    Len,
    /// Passing through the rest of a data string (with its padding).
    Data {
        left: u64,
    },
    Done,
}

/// A reader of exactly one NAR from `inner`.
#[derive(Debug)]
pub struct NarBounded<R> {
    inner: R,
    state: State,
    /// Bytes read from `inner` but not yet handed out.
    pending: Vec<u8>,
    pending_at: usize,
    depth: u64,
    /// The previous token announced a data string (`contents`, `target`, `name`).
    data_next: bool,
    /// The magic has been seen.
    started: bool,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad NAR: {msg}"))
}

fn padded(len: u64) -> u64 {
    len.div_ceil(8) * 8
}

impl<R: Read> NarBounded<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            state: State::Len,
            pending: Vec::new(),
            pending_at: 0,
            depth: 0,
            data_next: false,
            started: false,
        }
    }

    /// Whether the whole NAR has been handed out.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done) && self.pending_at >= self.pending.len()
    }

    /// Read the rest of the NAR and throw it away.
    pub fn skip(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }

    fn next_string(&mut self) -> io::Result<()> {
        let mut len = [0u8; 8];
        self.inner.read_exact(&mut len)?;
        let n = u64::from_le_bytes(len);
        self.pending.clear();
        self.pending_at = 0;
        self.pending.extend_from_slice(&len);
        if self.data_next {
            self.data_next = false;
            self.state = State::Data { left: padded(n) };
            return Ok(());
        }
        if n > MAX_TOKEN {
            return Err(bad("over-long token"));
        }
        let mut tok = vec![0u8; padded(n) as usize];
        self.inner.read_exact(&mut tok)?;
        self.pending.extend_from_slice(&tok);
        let tok = &tok[..n as usize];
        if !self.started {
            if tok != b"nix-archive-1" {
                return Err(bad("not a NAR (bad magic)"));
            }
            self.started = true;
            return Ok(());
        }
        match tok {
            b"(" => self.depth += 1,
            b")" => {
                self.depth = self
                    .depth
                    .checked_sub(1)
                    .ok_or_else(|| bad("unbalanced ')'"))?;
                if self.depth == 0 {
                    self.state = State::Done;
                }
            }
            b"contents" | b"target" | b"name" => self.data_next = true,
            _ => {}
        }
        Ok(())
    }
}

impl<R: Read> Read for NarBounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pending_at < self.pending.len() {
                let n = (self.pending.len() - self.pending_at).min(buf.len());
                buf[..n].copy_from_slice(&self.pending[self.pending_at..self.pending_at + n]);
                self.pending_at += n;
                return Ok(n);
            }
            match self.state {
                State::Done => return Ok(0),
                State::Len => self.next_string()?,
                State::Data { left } => {
                    if left == 0 {
                        self.state = State::Len;
                        continue;
                    }
                    let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let n = self.inner.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "bad NAR: truncated",
                        ));
                    }
                    self.state = State::Data {
                        left: left - n as u64,
                    };
                    return Ok(n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
        out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
    }

    /// A directory with a file whose contents and name look like tokens.
    fn nar() -> Vec<u8> {
        let mut v = Vec::new();
        for t in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b")",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b")",
            b")",
            b")",
            b")",
        ] {
            s(&mut v, t);
        }
        v
    }

    #[test]
    fn stops_exactly_at_the_end() {
        let one = nar();
        let mut two = one.clone();
        two.extend_from_slice(b"after the NAR");
        let mut input = &two[..];
        let mut b = NarBounded::new(&mut input);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert!(b.is_done());
        assert_eq!(got, one);
        assert_eq!(input, b"after the NAR");
        // And the store's parser accepts what it handed out.
        assert_eq!(
            crate::nar::validate(&mut &got[..]).unwrap(),
            one.len() as u64
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_hang() {
        let mut v = Vec::new();
        s(&mut v, b"not-a-nar");
        assert!(NarBounded::new(&v[..])
            .read_to_end(&mut Vec::new())
            .is_err());
        let one = nar();
        let cut = &one[..one.len() - 8];
        assert!(NarBounded::new(cut).read_to_end(&mut Vec::new()).is_err());
        let mut v = Vec::new();
        s(&mut v, b"nix-archive-1");
        v.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(NarBounded::new(&v[..])
            .read_to_end(&mut Vec::new())
            .is_err());
    }
}

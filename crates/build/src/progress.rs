//! What the worker tells the user while it works. On a terminal, one status line —
//! `[done/running/total] building NAME, NAME: last log line` — is redrawn at the bottom
//! while builder output and messages scroll above it (like nix-output-monitor); when
//! stderr is not a terminal, only plain lines are written.

use std::io::Write;

/// The status line and everything written around it.
#[derive(Debug)]
pub struct Progress {
    tty: bool,
    /// A status line is on screen (it must be cleared before other output).
    drawn: bool,
    /// The last status shown, to avoid redrawing the same text.
    last: String,
}

const CLEAR_LINE: &[u8] = b"\r\x1b[K";

impl Progress {
    /// Status lines only when stderr is a terminal.
    pub fn new() -> Self {
        Self::with_tty(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    }

    pub fn with_tty(tty: bool) -> Self {
        Self {
            tty,
            drawn: false,
            last: String::new(),
        }
    }

    fn clear(&mut self, err: &mut impl Write) {
        if self.drawn {
            let _ = err.write_all(CLEAR_LINE);
            self.drawn = false;
        }
    }

    /// Builder output, passed through as it came.
    pub fn log(&mut self, data: &[u8]) {
        let mut err = std::io::stderr().lock();
        self.clear(&mut err);
        let _ = err.write_all(data);
        if self.tty && !data.ends_with(b"\n") {
            let _ = err.write_all(b"\n");
        }
        self.redraw(&mut err);
    }

    /// A message line (`building '…'...`, `error: …`).
    pub fn line(&mut self, msg: &str) {
        let mut err = std::io::stderr().lock();
        self.clear(&mut err);
        let _ = writeln!(err, "{msg}");
        self.redraw(&mut err);
    }

    fn redraw(&mut self, err: &mut impl Write) {
        if self.tty && !self.last.is_empty() {
            let _ = err.write_all(self.last.as_bytes());
            self.drawn = true;
        }
        let _ = err.flush();
    }

    /// Show `text` as the status line (terminals only); empty text removes it.
    pub fn status(&mut self, text: &str) {
        if !self.tty {
            return;
        }
        let width = terminal_width().saturating_sub(1).max(20);
        let shown: String = text.chars().take(width).collect();
        if shown == self.last && self.drawn {
            return;
        }
        self.last = shown;
        let mut err = std::io::stderr().lock();
        self.clear(&mut err);
        self.redraw(&mut err);
    }

    /// Remove the status line for good (at the end of the run).
    pub fn finish(&mut self) {
        self.last.clear();
        let mut err = std::io::stderr().lock();
        self.clear(&mut err);
        let _ = err.flush();
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

fn terminal_width() -> usize {
    let mut ws: nix::libc::winsize = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the struct we pass.
    let r = unsafe { nix::libc::ioctl(2, nix::libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        80
    }
}

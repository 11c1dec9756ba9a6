//! What the worker tells the user while it works ([`TerminalEvents`], the CLI's
//! [`BuildEvents`]). On a terminal, one status line — `[done/running/total] building
//! NAME, NAME: last log line` — is redrawn at the bottom while builder output and
//! messages scroll above it (like nix-output-monitor); when stderr is not a terminal,
//! only plain lines are written.

use std::io::Write;

use firn_build::{BuildEvents, BuildResult, BuildStarted, BuildStatus, Message};
use firn_derivation::{name_from_drv_base_name, StoreDir, StorePath};

/// The worker's events, on stderr as `nix-store -r` shows them.
#[derive(Debug)]
pub struct TerminalEvents {
    progress: Progress,
    store_dir: StoreDir,
    /// Echo builder output (not with `--quiet`).
    print_build_logs: bool,
    /// With `keep-going`, dependency failures get their own error line.
    keep_going: bool,
    /// The settings file that turned the sandbox off: every build says so.
    unsandboxed_by: Option<String>,
}

impl TerminalEvents {
    pub fn new(store_dir: StoreDir, print_build_logs: bool, keep_going: bool) -> Self {
        Self {
            progress: Progress::new(),
            store_dir,
            print_build_logs,
            keep_going,
            unsandboxed_by: None,
        }
    }

    /// Builds run without the sandbox because `file` says `sandbox = false`.
    pub fn unsandboxed_by(mut self, file: Option<String>) -> Self {
        self.unsandboxed_by = file;
        self
    }
}

impl BuildEvents for TerminalEvents {
    fn build_started(&mut self, b: BuildStarted<'_>) {
        let (drv, sandboxed) = (b.drv, b.sandboxed);
        // As Nix's `DerivationGoal::started`.
        let line = match b.checking {
            true => format!("checking outputs of '{}'...", self.store_dir.display(drv)),
            false => format!("building '{}'...", self.store_dir.display(drv)),
        };
        self.progress.line(&line);
        if let Some(file) = self.unsandboxed_by.as_ref().filter(|_| !sandboxed) {
            let warning = format!(
                "warning: building '{}' without the sandbox: 'sandbox = false' in '{file}' (--option sandbox true to build in it)",
                self.store_dir.display(drv)
            );
            self.progress.line(&warning);
        }
    }

    fn build_log(&mut self, _drv: &StorePath, data: &[u8]) {
        if self.print_build_logs {
            self.progress.log(data);
        }
    }

    fn result(&mut self, _drv: &StorePath, result: &BuildResult) {
        if result.status.success() {
            return;
        }
        if let Some(e) = &result.error {
            if result.status != BuildStatus::DependencyFailed || self.keep_going {
                self.progress.line(&format!("error: {e}"));
            }
        }
    }

    fn message(&mut self, message: Message<'_>) {
        let line = match message {
            Message::WaitingForLocks { outputs } => {
                let shown: Vec<String> =
                    outputs.iter().map(|p| self.store_dir.display(p)).collect();
                format!("waiting for lock on '{}'...", shown.join("', '"))
            }
            Message::WaitingForBuildUser { drv } => {
                format!("waiting for UID to build '{}'", self.store_dir.display(drv))
            }
            Message::KeepingBuildDir { path } => {
                format!("note: keeping build directory '{}'", path.display())
            }
            Message::KeepingCheckOutput { path } => {
                format!("note: keeping the differing output as '{}'", path.display())
            }
            Message::Warning { text } => format!("warning: {text}"),
        };
        self.progress.line(&line);
    }

    fn progress(&mut self, p: &firn_build::Progress) {
        let text = if p.running.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = p
                .running
                .iter()
                .map(|d| name_from_drv_base_name(d.base_name()))
                .collect();
            format!(
                "[{}/{}/{}] building {}: {}",
                p.done,
                p.running.len(),
                p.total,
                names.join(", "),
                p.last_line
            )
        };
        self.progress.status(&text);
    }

    fn finished(&mut self) {
        self.progress.finish();
    }
}

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

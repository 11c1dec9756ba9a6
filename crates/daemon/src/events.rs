//! The worker's events on a client's stderr channel, as Nix 2.8's daemon sends them: a
//! `Build` activity per build (`building '…'`, fields `[drv, "", 1, 1]`), one
//! `BuildLogLine` result per line of its output, `STOP_ACTIVITY` when it ends; failures
//! of builds that others waited for as `error: …` lines (Nix's `logError`), messages as
//! lines. Also the Nix-worded error texts the final `STDERR_ERROR` carries.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use firn_build::error::BuildError;
use firn_build::{BuildEvents, BuildResult, BuildStarted, BuildStatus, Message};
use firn_derivation::{StoreDir, StorePath};
use firn_protocol::{ActivityType, Field, ResultType, StderrMsg, Verbosity, Writer};

/// Nix's `log-lines`: how much of a failed build's output its error shows.
pub const LOG_LINES: usize = 10;

/// `ANSI_WARNING` … `ANSI_NORMAL` around what Nix's `hintfmt` substitutes.
pub fn hl(s: &str) -> String {
    format!("\x1b[35;1m{s}\x1b[0m")
}

/// A fresh activity id: Nix's `(pid << 32) | n`.
pub fn activity_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    (u64::from(std::process::id()) << 32) | NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Writes stderr messages; a failed write marks the client gone.
#[derive(Debug)]
pub struct Channel<'a, W: Write> {
    pub w: &'a mut Writer<W>,
    pub gone: Rc<Cell<bool>>,
    /// The client's verbosity (SetOptions): lines above it are not sent.
    pub verbosity: Verbosity,
}

impl<W: Write> Channel<'_, W> {
    pub fn send(&mut self, m: &StderrMsg) {
        if self.gone.get() {
            return;
        }
        if m.write(self.w).and_then(|()| self.w.flush()).is_err() {
            self.gone.set(true);
        }
    }

    /// A log line at `level` (Nix's `TunnelLogger::log`).
    pub fn line(&mut self, level: Verbosity, text: &str) {
        if level <= self.verbosity {
            let mut t = text.as_bytes().to_vec();
            t.push(b'\n');
            self.send(&StderrMsg::Next(t));
        }
    }
}

/// The error text of a failed goal, in Nix 2.8's words (builder failures with the last
/// lines of their log).
pub fn error_text(e: &BuildError, tail: Option<&VecDeque<String>>) -> String {
    match e {
        BuildError::BuilderFailed { drv, exit } => {
            let mut msg = format!("builder for '{}' {exit}", hl(drv));
            if let Some(tail) = tail.filter(|t| !t.is_empty()) {
                msg.push_str(&format!(";\nlast {} log lines:\n", tail.len()));
                for l in tail {
                    msg.push_str("> ");
                    msg.push_str(l);
                    msg.push('\n');
                }
                msg.push_str(&format!(
                    "For full logs, run '\x1b[1mnix log {drv}\x1b[0m'."
                ));
            }
            msg
        }
        BuildError::DependenciesFailed { drv, count } => format!(
            "{} dependencies of derivation '{}' failed to build",
            hl(&count.to_string()),
            hl(drv)
        ),
        e => e.to_string(),
    }
}

/// The worker's events for one BuildPaths-like op.
pub struct DaemonEvents<'a, W: Write> {
    pub ch: Channel<'a, W>,
    store_dir: StoreDir,
    /// The goals the client asked for (their failures go into the op's error).
    tops: BTreeSet<StorePath>,
    activities: BTreeMap<StorePath, u64>,
    /// Running post-build hooks' activities.
    hooks: BTreeMap<StorePath, u64>,
    partial: BTreeMap<StorePath, Vec<u8>>,
    pub tails: BTreeMap<String, VecDeque<String>>,
}

impl<W: Write> std::fmt::Debug for DaemonEvents<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonEvents")
            .field("activities", &self.activities)
            .finish_non_exhaustive()
    }
}

impl<'a, W: Write> DaemonEvents<'a, W> {
    pub fn new(ch: Channel<'a, W>, store_dir: StoreDir, tops: BTreeSet<StorePath>) -> Self {
        Self {
            ch,
            store_dir,
            tops,
            activities: BTreeMap::new(),
            hooks: BTreeMap::new(),
            partial: BTreeMap::new(),
            tails: BTreeMap::new(),
        }
    }

    fn log_line(&mut self, drv: &StorePath, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let shown = self.store_dir.display(drv);
        let tail = self.tails.entry(shown).or_default();
        tail.push_back(String::from_utf8_lossy(line).into_owned());
        if tail.len() > LOG_LINES {
            tail.pop_front();
        }
        if let Some(&id) = self.activities.get(drv) {
            self.ch.send(&StderrMsg::Result {
                id,
                kind: ResultType::BuildLogLine,
                fields: vec![Field::String(line.to_vec())],
            });
        }
    }

    /// End `drv`'s activity (flushing a last line without its newline).
    fn stop(&mut self, drv: &StorePath) {
        if let Some(rest) = self.partial.remove(drv) {
            if !rest.is_empty() {
                self.log_line(drv, &rest);
            }
        }
        if let Some(id) = self.activities.remove(drv) {
            self.ch.send(&StderrMsg::StopActivity(id));
        }
    }

    /// The error text of `drv`'s failure.
    pub fn error_text(&self, e: &BuildError) -> String {
        let drv = match e {
            BuildError::BuilderFailed { drv, .. } => Some(drv),
            _ => None,
        };
        error_text(e, drv.and_then(|d| self.tails.get(d)))
    }

    /// End what is still open (after an interrupt).
    pub fn stop_all(&mut self) {
        let open: Vec<StorePath> = self.activities.keys().cloned().collect();
        for d in open {
            self.stop(&d);
        }
    }
}

impl<W: Write> BuildEvents for DaemonEvents<'_, W> {
    fn build_started(&mut self, b: BuildStarted<'_>) {
        let shown = self.store_dir.display(b.drv);
        let id = activity_id();
        let text = match (b.checking, b.machine) {
            (true, _) => format!("checking outputs of '{shown}'"),
            (false, Some(m)) => format!("building '{shown}' on '{m}'"),
            (false, None) => format!("building '{shown}'"),
        };
        self.ch.send(&StderrMsg::StartActivity {
            id,
            level: Verbosity::Info,
            kind: ActivityType::Build,
            text: text.into_bytes(),
            fields: vec![
                Field::from(shown.as_str()),
                Field::from(b.machine.unwrap_or("")),
                Field::Int(1),
                Field::Int(1),
            ],
            parent: 0,
        });
        self.activities.insert(b.drv.clone(), id);
    }

    fn build_log(&mut self, drv: &StorePath, data: &[u8]) {
        let mut buf = self.partial.remove(drv).unwrap_or_default();
        buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(i) = buf[start..].iter().position(|&c| c == b'\n') {
            let line = buf[start..start + i].to_vec();
            self.log_line(drv, &line);
            start += i + 1;
        }
        buf.drain(..start);
        self.partial.insert(drv.clone(), buf);
    }

    fn result(&mut self, drv: &StorePath, result: &BuildResult) {
        self.stop(drv);
        if result.status.success() || self.tops.contains(drv) {
            return;
        }
        // A failure others waited for: Nix logs it at once (`logError`).
        if let Some(e) = &result.error {
            if result.status != BuildStatus::DependencyFailed {
                // Continuation lines indented under the message, as Nix's `showErrorInfo`.
                let text = format!(
                    "\x1b[31;1merror:\x1b[0m {}",
                    self.error_text(e).replace('\n', "\n       ")
                );
                self.ch.line(Verbosity::Error, &text);
            }
        }
    }

    fn post_build_hook_started(&mut self, drv: &StorePath, hook: &str) {
        let id = activity_id();
        self.ch.send(&StderrMsg::StartActivity {
            id,
            level: Verbosity::Info,
            kind: ActivityType::PostBuildHook,
            text: format!("running post-build-hook '{hook}'").into_bytes(),
            fields: vec![Field::from(self.store_dir.display(drv).as_str())],
            parent: 0,
        });
        self.hooks.insert(drv.clone(), id);
    }

    fn post_build_hook_line(&mut self, drv: &StorePath, line: &str) {
        if let Some(&id) = self.hooks.get(drv) {
            self.ch.send(&StderrMsg::Result {
                id,
                kind: ResultType::PostBuildLogLine,
                fields: vec![Field::from(line)],
            });
        }
    }

    fn post_build_hook_finished(&mut self, drv: &StorePath) {
        if let Some(id) = self.hooks.remove(drv) {
            self.ch.send(&StderrMsg::StopActivity(id));
        }
    }

    fn message(&mut self, message: Message<'_>) {
        let (level, line) = match message {
            Message::WaitingForLocks { outputs } => {
                let shown: Vec<String> =
                    outputs.iter().map(|p| self.store_dir.display(p)).collect();
                (
                    Verbosity::Warn,
                    format!("waiting for lock on '{}'...", shown.join("', '")),
                )
            }
            Message::WaitingForBuildUser { drv } => (
                Verbosity::Warn,
                format!("waiting for UID to build '{}'", self.store_dir.display(drv)),
            ),
            Message::KeepingBuildDir { path } => (
                Verbosity::Error,
                format!("note: keeping build directory '{}'", path.display()),
            ),
            Message::KeepingCheckOutput { path } => (
                Verbosity::Error,
                format!("note: keeping the differing output as '{}'", path.display()),
            ),
            Message::Substituting { path, from } => (
                Verbosity::Info,
                format!(
                    "copying path '{}' from '{from}'...",
                    self.store_dir.display(path)
                ),
            ),
            Message::Warning { text } => (Verbosity::Warn, format!("warning: {text}")),
            Message::MachineFailed { machine, why } => (
                Verbosity::Warn,
                format!("warning: cannot build on '{machine}': {why}"),
            ),
        };
        self.ch.line(level, &line);
    }
}

/// A goal's status as the protocols carry it (firn's `HashMismatch` is Nix 2.8's
/// `OutputRejected` on the wire).
pub fn wire_status(s: firn_build::BuildStatus) -> firn_protocol::BuildStatus {
    match s {
        firn_build::BuildStatus::Built => firn_protocol::BuildStatus::Built,
        firn_build::BuildStatus::AlreadyValid => firn_protocol::BuildStatus::AlreadyValid,
        firn_build::BuildStatus::Substituted => firn_protocol::BuildStatus::Substituted,
        firn_build::BuildStatus::PermanentFailure => firn_protocol::BuildStatus::PermanentFailure,
        firn_build::BuildStatus::TransientFailure => firn_protocol::BuildStatus::TransientFailure,
        firn_build::BuildStatus::TimedOut => firn_protocol::BuildStatus::TimedOut,
        firn_build::BuildStatus::OutputRejected | firn_build::BuildStatus::HashMismatch => {
            firn_protocol::BuildStatus::OutputRejected
        }
        firn_build::BuildStatus::DependencyFailed => firn_protocol::BuildStatus::DependencyFailed,
        firn_build::BuildStatus::MiscFailure => firn_protocol::BuildStatus::MiscFailure,
        firn_build::BuildStatus::LogLimitExceeded => firn_protocol::BuildStatus::LogLimitExceeded,
        firn_build::BuildStatus::InputRejected => firn_protocol::BuildStatus::InputRejected,
        firn_build::BuildStatus::NotDeterministic => firn_protocol::BuildStatus::NotDeterministic,
    }
}

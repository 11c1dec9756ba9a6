//! What the worker tells the user while it works ([`TerminalEvents`], the CLI's
//! [`BuildEvents`]). On a terminal, one status line — `[done/running/total] building
//! NAME, NAME: last log line` — is redrawn at the bottom while builder output and
//! messages scroll above it (like nix-output-monitor); when stderr is not a terminal,
//! only plain lines are written.

use std::io::Write;

use firn_build::{BuildEvents, BuildResult, BuildStarted, BuildStatus, Message};
use firn_derivation::{name_from_drv_base_name, StoreDir, StorePath};

/// How progress and messages are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines, with a status line redrawn at the bottom on a terminal.
    Bar,
    /// Lines only.
    Raw,
    /// Nix's `@nix {…}` JSON lines (activities, results, messages), as
    /// `nix-output-monitor` reads them.
    InternalJson,
}

/// The worker's events, on stderr as `nix-store -r` shows them (or as Nix's internal
/// JSON log).
#[derive(Debug)]
pub struct TerminalEvents {
    sink: Sink,
    store_dir: StoreDir,
    /// Echo builder output (not with `--quiet`); when it is not echoed, a failed
    /// build's error carries the last lines of its log, as Nix's does.
    print_build_logs: bool,
    /// With `keep-going`, dependency failures get their own error line.
    keep_going: bool,
    /// The settings file that turned the sandbox off: every build says so.
    unsandboxed_by: Option<String>,
    /// Builds that failed, for the progress counts.
    failed: usize,
    /// `-v`: a line per build with its time and what it used; `-vv`: and its log.
    verbosity: u8,
    /// `-L`: every line of builder output prefixed with the derivation's name, as
    /// `nix build -L` (without it, lines are prefixed only while builds run in
    /// parallel, so that whose line it is stays clear).
    prefix_logs: bool,
    /// Builds running now, and the start of a line each has not finished yet.
    running: std::collections::BTreeMap<StorePath, Vec<u8>>,
}

#[derive(Debug)]
enum Sink {
    Text(Progress),
    Json(JsonLog),
}

impl TerminalEvents {
    pub fn with_format(
        store_dir: StoreDir,
        print_build_logs: bool,
        keep_going: bool,
        format: LogFormat,
    ) -> Self {
        let sink = match format {
            LogFormat::Bar => Sink::Text(Progress::new()),
            LogFormat::Raw => Sink::Text(Progress::with_tty(false)),
            LogFormat::InternalJson => Sink::Json(JsonLog::new()),
        };
        Self {
            sink,
            store_dir,
            print_build_logs,
            keep_going,
            unsandboxed_by: None,
            failed: 0,
            verbosity: 0,
            prefix_logs: false,
            running: Default::default(),
        }
    }

    /// `-L`: prefix every line of builder output with the derivation's name.
    pub fn prefix_logs(mut self, on: bool) -> Self {
        self.prefix_logs = on;
        self
    }

    /// `-v` given `n` times.
    pub fn verbosity(mut self, n: u8) -> Self {
        self.verbosity = n;
        self
    }

    /// Builds run without the sandbox because `file` says `sandbox = false`.
    pub fn unsandboxed_by(mut self, file: Option<String>) -> Self {
        self.unsandboxed_by = file;
        self
    }

    /// A message line at Nix's `level` (0 error, 1 warning, 3 info).
    pub fn line(&mut self, level: u8, text: &str) {
        match &mut self.sink {
            Sink::Text(p) => p.line(text),
            Sink::Json(j) => j.msg(level, text),
        }
    }

    /// The realisation starts (after "these derivations will be built").
    pub fn begin(&mut self) {
        if let Sink::Json(j) = &mut self.sink {
            j.begin();
        }
    }

    /// The error line of a failed goal, with the last lines of its log where the log
    /// was not shown (Nix 2.8's `buildDone`).
    fn error_text(
        &self,
        drv: &StorePath,
        result: &BuildResult,
        e: &firn_build::BuildError,
    ) -> String {
        use firn_build::BuildError as E;
        let mut text = e.to_string();
        let builder_failed = matches!(
            e,
            E::BuilderFailed { .. } | E::MemoryLimit { .. } | E::ProcessLimit { .. }
        );
        if builder_failed && !self.print_build_logs && !result.log_tail.is_empty() {
            text.push_str(&format!(
                ";\n       last {} log lines:\n",
                result.log_tail.len()
            ));
            for l in &result.log_tail {
                text.push_str(&format!("       > {l}\n"));
            }
            text.push_str(&format!(
                "       For full logs, run 'firn log {}'.",
                self.store_dir.display(drv)
            ));
        }
        text
    }
}

impl BuildEvents for TerminalEvents {
    fn build_started(&mut self, b: BuildStarted<'_>) {
        let (drv, sandboxed) = (b.drv, b.sandboxed);
        self.running.insert(drv.clone(), Vec::new());
        // As Nix's `DerivationGoal::started`.
        let shown = self.store_dir.display(drv);
        let line = match (b.checking, b.repairing) {
            (true, _) => format!("checking outputs of '{shown}'..."),
            (_, true) => format!("repairing outputs of '{shown}'..."),
            _ => match b.machine {
                Some(m) => format!("building '{shown}' on '{m}'..."),
                None => format!("building '{shown}'..."),
            },
        };
        match &mut self.sink {
            Sink::Text(p) => p.line(&line),
            Sink::Json(j) => j.build_started(drv, &self.store_dir, line.trim_end_matches("...")),
        }
        if let Some(file) = self.unsandboxed_by.clone().filter(|_| !sandboxed) {
            let warning = format!(
                "warning: building '{}' without the sandbox: 'sandbox = false' in '{file}' (--option sandbox true to build in it)",
                self.store_dir.display(drv)
            );
            self.line(1, &warning);
        }
    }

    fn build_log(&mut self, drv: &StorePath, data: &[u8]) {
        let parallel = self.running.len() > 1;
        match &mut self.sink {
            Sink::Text(p) => {
                if !self.print_build_logs {
                    return;
                }
                if !self.prefix_logs && !parallel {
                    p.log(data);
                    return;
                }
                // `name> line`, whole lines only (a line's start waits for its end).
                let name = name_from_drv_base_name(drv.base_name());
                let pending = self.running.entry(drv.clone()).or_default();
                let mut out = Vec::new();
                for &b in data {
                    pending.push(b);
                    if b == b'\n' {
                        out.extend_from_slice(name.as_bytes());
                        out.extend_from_slice(b"> ");
                        out.append(pending);
                    }
                }
                if !out.is_empty() {
                    p.log(&out);
                }
            }
            Sink::Json(j) => j.build_log(drv, data),
        }
    }

    fn result(&mut self, drv: &StorePath, result: &BuildResult) {
        // The end of an unfinished last line, prefixed like the others.
        if let Some(rest) = self.running.remove(drv).filter(|r| !r.is_empty()) {
            if let Sink::Text(p) = &mut self.sink {
                let name = name_from_drv_base_name(drv.base_name());
                let mut out = format!("{name}> ").into_bytes();
                out.extend_from_slice(&rest);
                out.push(b'\n');
                p.log(&out);
            }
        }
        if let Sink::Json(j) = &mut self.sink {
            j.build_stopped(drv);
        }
        if result.status == BuildStatus::Built && self.verbosity > 0 {
            let mut line = format!(
                "built '{}' in {} s",
                self.store_dir.display(drv),
                result.stop_time.saturating_sub(result.start_time)
            );
            if let Some(u) = result.usage {
                if let (Some(user), Some(system)) = (u.cpu_user, u.cpu_system) {
                    line.push_str(&format!(
                        ", CPU {:.2} s user {:.2} s system",
                        user.as_secs_f64(),
                        system.as_secs_f64()
                    ));
                }
                if let Some(peak) = u.peak_memory {
                    line.push_str(&format!(", peak memory {:.1} MiB", peak as f64 / 1048576.0));
                }
            }
            if self.verbosity > 1 {
                if let Some(log) = &result.log {
                    line.push_str(&format!(", log '{}'", log.display()));
                }
            }
            self.line(4, &line);
        }
        if result.status.success() {
            return;
        }
        self.failed += 1;
        if let Some(e) = &result.error {
            if result.status != BuildStatus::DependencyFailed || self.keep_going {
                let text = self.error_text(drv, result, e);
                match &mut self.sink {
                    Sink::Text(p) => p.line(&format!("error: {text}")),
                    Sink::Json(j) => j.error(&text),
                }
            }
        }
    }

    fn post_build_hook_started(&mut self, _drv: &StorePath, hook: &str) {
        self.line(3, &format!("running post-build-hook '{hook}'..."));
    }

    fn post_build_hook_line(&mut self, _drv: &StorePath, line: &str) {
        // As Nix's simple logger (`resPostBuildLogLine`), on stderr like build logs.
        if self.print_build_logs {
            self.line(0, &format!("post-build-hook: {line}"));
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
            Message::Substituting { path, from } => {
                format!(
                    "copying path '{}' from '{from}'...",
                    self.store_dir.display(path)
                )
            }
            Message::Warning { text } => format!("warning: {text}"),
            Message::MachineFailed { machine, why } => {
                format!("warning: cannot build on '{machine}': {why}")
            }
        };
        let level = if line.starts_with("warning:") { 1 } else { 3 };
        self.line(level, &line);
    }

    fn progress(&mut self, p: &firn_build::Progress) {
        let failed = self.failed;
        match &mut self.sink {
            Sink::Text(bar) => {
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
                bar.status(&text);
            }
            Sink::Json(j) => j.progress(
                p.done.saturating_sub(failed),
                p.total,
                p.running.len(),
                failed,
            ),
        }
    }

    fn finished(&mut self) {
        match &mut self.sink {
            Sink::Text(p) => p.finish(),
            Sink::Json(j) => j.finish(),
        }
    }
}

/// Nix's internal JSON log (`JSONLogger`): one `@nix {…}` line per event on stderr,
/// keys sorted as nlohmann writes them. Activities: a realisation (type 102) holding
/// the builds (104, progress results type 105 `[done, expected, running, failed]`) and
/// copies (103); one build activity (105, fields `[drv, machine, round, rounds]`) per
/// build, whose log lines are results of type 101. Ids are `pid << 32 | n`, as Nix's.
#[derive(Debug)]
struct JsonLog {
    next: u64,
    /// realise, builds, copyPaths.
    top: Option<(u64, u64, u64)>,
    builds: std::collections::BTreeMap<StorePath, (u64, Vec<u8>)>,
    last_progress: Option<[usize; 4]>,
}

impl JsonLog {
    fn new() -> Self {
        Self {
            next: (u64::from(std::process::id()) << 32) + 1,
            top: None,
            builds: Default::default(),
            last_progress: None,
        }
    }

    fn emit(&self, v: serde_json::Value) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "@nix {v}");
    }

    fn id(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }

    fn start(&mut self, level: u8, ty: u64, text: &str, fields: Option<serde_json::Value>) -> u64 {
        let id = self.id();
        let mut m = serde_json::Map::new();
        m.insert("action".into(), "start".into());
        if let Some(f) = fields {
            m.insert("fields".into(), f);
        }
        m.insert("id".into(), id.into());
        m.insert("level".into(), level.into());
        m.insert("text".into(), text.into());
        m.insert("type".into(), ty.into());
        self.emit(m.into());
        id
    }

    fn stop(&self, id: u64) {
        self.emit(serde_json::json!({"action": "stop", "id": id}));
    }

    fn result(&self, id: u64, ty: u64, fields: serde_json::Value) {
        self.emit(serde_json::json!({"action": "result", "fields": fields, "id": id, "type": ty}));
    }

    fn msg(&self, level: u8, text: &str) {
        self.emit(serde_json::json!({"action": "msg", "level": level, "msg": text}));
    }

    fn error(&self, text: &str) {
        self.emit(serde_json::json!({
            "action": "msg",
            "column": null,
            "file": null,
            "level": 0,
            "line": null,
            "msg": format!("\u{1b}[31;1merror:\u{1b}[0m {text}"),
            "raw_msg": text,
        }));
    }

    fn begin(&mut self) {
        if self.top.is_none() {
            let realise = self.start(0, 102, "", None);
            let builds = self.start(0, 104, "", None);
            let copies = self.start(0, 103, "", None);
            self.top = Some((realise, builds, copies));
        }
    }

    fn progress(&mut self, done: usize, expected: usize, running: usize, failed: usize) {
        self.begin();
        let now = [done, expected, running, failed];
        if self.last_progress == Some(now) {
            return;
        }
        self.last_progress = Some(now);
        if let Some((_, builds, copies)) = self.top {
            self.result(builds, 105, serde_json::json!(now));
            self.result(copies, 105, serde_json::json!([0, 0, 0, 0]));
        }
    }

    fn build_started(&mut self, drv: &StorePath, sd: &StoreDir, text: &str) {
        self.begin();
        let fields = serde_json::json!([sd.display(drv), "", 1, 1]);
        let id = self.start(3, 105, text, Some(fields));
        self.builds.insert(drv.clone(), (id, Vec::new()));
    }

    fn build_log(&mut self, drv: &StorePath, data: &[u8]) {
        let Some((id, partial)) = self.builds.get_mut(drv) else {
            return;
        };
        let id = *id;
        let mut lines = Vec::new();
        for &b in data {
            match b {
                b'\n' => lines.push(String::from_utf8_lossy(&std::mem::take(partial)).into_owned()),
                // A carriage return rewinds the line, as Nix's log buffer does.
                b'\r' => partial.clear(),
                _ => partial.push(b),
            }
        }
        for l in lines {
            self.result(id, 101, serde_json::json!([l]));
        }
    }

    fn build_stopped(&mut self, drv: &StorePath) {
        if let Some((id, partial)) = self.builds.remove(drv) {
            if !partial.is_empty() {
                self.result(
                    id,
                    101,
                    serde_json::json!([String::from_utf8_lossy(&partial)]),
                );
            }
            self.stop(id);
        }
    }

    fn finish(&mut self) {
        let open: Vec<StorePath> = self.builds.keys().cloned().collect();
        for d in open {
            self.build_stopped(&d);
        }
        if let Some((realise, builds, copies)) = self.top.take() {
            self.stop(copies);
            self.stop(builds);
            self.stop(realise);
        }
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

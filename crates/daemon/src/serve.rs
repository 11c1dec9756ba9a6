//! `firn serve` / `firn --serve [--write]`: Nix's legacy serve protocol (`nix-store
//! --serve`, version 2.7) on stdin/stdout, what a Nix 2.8 client runs over ssh for
//! `ssh://` stores and remote builds (`<remote-program> --serve --write [--store X]`).
//! `docs/remote.md` has the commands and what is refused.
//!
//! As in Nix's `opServe`: no stderr channel — replies go straight to the output,
//! flushed after each command; build logs go to the log stream (the process's stderr,
//! which the client shows and keeps as the build log); any error (a refused write, an
//! invalid path, bad input) ends the session, and the caller prints it as `error: …`
//! and exits 1, as `nix-store --serve` does.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use firn_build::builder::local::{LocalBuilder, LocalOptions};
use firn_build::events::BuildEvents;
use firn_build::{BuildStatus as FirnStatus, Wanted, Worker};
use firn_derivation::{hash_derivation_modulo, Derivation, OutputName, StoreDir, StorePath};
use firn_protocol::serve::{self, BuildSettings, Command, ServeError, ServePathInfo, ServeRequest};
use firn_protocol::{
    BasicDerivation, BuildResult, BuildStatus, DerivedPath, Limits, Reader, Writer,
};
use firn_store::{Store, StoreError};
use thiserror::Error;

use crate::events::{error_text, wire_status};
use crate::DaemonConfig;

/// Why a serve session ended early. Each is one `error:` line for the caller.
#[derive(Debug, Error)]
pub enum ServeFailure {
    /// The client's bytes: bad magic, unknown command, undecodable arguments.
    #[error("{0}")]
    Protocol(#[from] ServeError),
    /// A write op without `--write` (Nix's words).
    #[error("{0}")]
    NotAllowed(&'static str),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("path '{0}' is not valid")]
    NotValid(String),
    #[error("narInfo is too old and missing the narSize field")]
    NoNarSize,
    #[error("cannot build '{drv}': {msg}")]
    BadDerivation { drv: String, msg: String },
    #[error("{0}")]
    Import(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<crate::export::ExportError> for ServeFailure {
    fn from(e: crate::export::ExportError) -> Self {
        use crate::export::ExportError;
        match e {
            ExportError::Store(e) => Self::Store(*e),
            ExportError::NotValid(p) => Self::NotValid(p),
            e => Self::Import(e.to_string()),
        }
    }
}

impl From<firn_store::DbError> for ServeFailure {
    fn from(e: firn_store::DbError) -> Self {
        Self::Store(e.into())
    }
}

impl From<firn_protocol::WireError> for ServeFailure {
    fn from(e: firn_protocol::WireError) -> Self {
        Self::Protocol(e.into())
    }
}

type Res<T> = Result<T, ServeFailure>;

/// Serve on stdin/stdout, build logs to stderr.
pub fn serve_stdio(config: &DaemonConfig, write: bool, stop: &dyn Fn() -> bool) -> Res<()> {
    use std::os::fd::AsFd;
    let stdin = io::stdin();
    let watch = stdin.as_fd().try_clone_to_owned()?;
    let r = io::BufReader::new(stdin.lock());
    let w = io::BufWriter::new(io::stdout().lock());
    let gone = || crate::hung_up(watch.as_fd());
    let mut log = io::stderr();
    serve_session(r, w, &mut log, config, write, &gone, stop)
}

/// One session: the hello, then commands until the client closes its end. `log` gets
/// the builders' output; `gone` tells whether the client hung up (asked while builds
/// run, as Nix's `MonitorFdHup`), `stop` whether to stop (a signal).
pub fn serve_session<R: Read, W: Write>(
    r: R,
    w: W,
    log: &mut dyn Write,
    config: &DaemonConfig,
    write: bool,
    gone: &dyn Fn() -> bool,
    stop: &dyn Fn() -> bool,
) -> Res<()> {
    let sd = config.layout.store_dir.clone();
    let mut r = Reader::with_config(r, sd.clone(), Limits::default());
    let mut w = Writer::with_store_dir(w, sd);
    // Nix checks the magic, answers, then reads the version.
    let magic = r.read_u64("magic")?;
    if magic != serve::SERVE_MAGIC_1 {
        return Err(ServeFailure::Protocol(ServeError::BadMagic {
            expected: serve::SERVE_MAGIC_1,
            got: magic,
        }));
    }
    w.write_u64(serve::SERVE_MAGIC_2)?;
    w.write_u64(serve::SERVE_PROTOCOL_VERSION)?;
    w.flush()?;
    let version = r.read_u64("client version")?;
    if version & 0xff00 != 0x200 || version & 0xff < 4 || version > 0xffff {
        return Err(ServeError::UnsupportedVersion(version).into());
    }
    let store = Store::open_with(
        &config.layout,
        &firn_store::StoreOptions {
            build_users_group: config.settings.build_users_group.clone(),
            auto_optimise: config.settings.auto_optimise_store,
            // One process per session (the ssh command): the process's file will do.
            own_temp_roots: false,
        },
    )?;
    let mut s = Session {
        r,
        w,
        log,
        store,
        config,
        write,
        version,
        gone,
        stop,
    };
    loop {
        let start = s.r.position();
        let n = match s.r.read_u64("command") {
            Ok(n) => n,
            Err(e) if e.is_eof() && s.r.position() == start => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let cmd = Command::from_u64(n).ok_or(ServeError::UnknownCommand(n))?;
        // As Nix: a write is refused before its arguments are read.
        match cmd {
            Command::ImportPaths | Command::AddToStoreNar => {
                s.need_write("importing paths is not allowed")?
            }
            Command::BuildPaths | Command::BuildDerivation => {
                s.need_write("building paths is not allowed")?
            }
            _ => {}
        }
        let req = ServeRequest::read_command(cmd, &mut s.r, version)?;
        s.perform(req)?;
        s.w.flush()?;
    }
}

struct Session<'a, R: Read, W: Write> {
    r: Reader<R>,
    w: Writer<W>,
    log: &'a mut dyn Write,
    store: Store,
    config: &'a DaemonConfig,
    write: bool,
    version: u64,
    gone: &'a dyn Fn() -> bool,
    stop: &'a dyn Fn() -> bool,
}

impl<R: Read, W: Write> Session<'_, R, W> {
    fn sd(&self) -> &StoreDir {
        self.store.store_dir()
    }

    fn need_write(&self, what: &'static str) -> Res<()> {
        match self.write {
            true => Ok(()),
            false => Err(ServeFailure::NotAllowed(what)),
        }
    }

    fn valid(&self, p: &StorePath) -> Res<firn_store::ValidPathInfo> {
        self.store
            .db()
            .query_path_info(p)?
            .ok_or_else(|| ServeFailure::NotValid(self.sd().display(p)))
    }

    fn perform(&mut self, req: ServeRequest) -> Res<()> {
        match req {
            ServeRequest::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                if lock && self.write {
                    for p in &paths {
                        self.store.add_temp_root(p)?;
                    }
                }
                // The client's `builders-use-substitutes`: fetch what the substituters
                // have before answering (Nix's `substitutePaths`, with `--write` only).
                if substitute && self.write {
                    self.substitute_paths(&paths)?;
                }
                let mut valid = BTreeSet::new();
                for p in paths {
                    if self.store.db().is_valid_path(&p)? {
                        valid.insert(p);
                    }
                }
                self.w.write_store_paths(&valid)?;
            }
            ServeRequest::QueryPathInfos(paths) => {
                let mut infos = Vec::new();
                for p in paths {
                    if let Some(i) = self.store.db().query_path_info(&p)? {
                        infos.push(ServePathInfo::from_info(
                            p,
                            &firn_protocol::types::UnkeyedValidPathInfo::from_store(&i),
                        ));
                    }
                }
                serve::write_path_infos(&mut self.w, &infos)?;
            }
            ServeRequest::DumpStorePath(p) => {
                self.valid(&p)?;
                let real = self.store.real_path(&p);
                firn_store::nar::dump_path(&real, self.w.get_mut())
                    .map_err(|e| ServeFailure::Import(e.to_string()))?;
            }
            ServeRequest::ImportPaths => {
                self.need_write("importing paths is not allowed")?;
                self.import_paths()?;
                self.w.write_u64(1)?;
            }
            ServeRequest::ExportPaths(paths) => self.export_paths(&paths)?,
            ServeRequest::BuildPaths { paths, settings } => {
                self.need_write("building paths is not allowed")?;
                let reply = self.build_paths(&paths, &settings)?;
                match &reply {
                    Ok(()) => serve::write_build_paths_reply(&mut self.w, Ok(()))?,
                    Err((status, msg)) => {
                        serve::write_build_paths_reply(&mut self.w, Err((*status, msg)))?
                    }
                }
            }
            ServeRequest::QueryClosure {
                include_outputs,
                paths,
            } => {
                let closure = self.closure(&paths, include_outputs)?;
                self.w.write_store_paths(&closure)?;
            }
            ServeRequest::BuildDerivation {
                drv_path,
                drv,
                settings,
            } => {
                self.need_write("building paths is not allowed")?;
                let res = self.build_derivation(&drv_path, &drv, &settings)?;
                serve::write_build_result(&mut self.w, &res, self.version)?;
            }
            ServeRequest::AddToStoreNar(info) => {
                self.need_write("importing paths is not allowed")?;
                if info.info.nar_size == 0 {
                    return Err(ServeFailure::NoNarSize);
                }
                let size = info.info.nar_size;
                let mut sized = self.r.get_mut().take(size);
                let res = self.store.add_nar(&info.to_store(), &mut sized);
                // Consume what was sent before going on (Nix's `drainAll`), whatever
                // became of it.
                let left = io::copy(&mut sized, &mut io::sink())?;
                res?;
                if sized.limit() > 0 {
                    return Err(ServeFailure::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                let _ = left;
                self.w.write_u64(1)?;
            }
        }
        Ok(())
    }

    /// `computeFSClosure(paths, flip = false, includeOutputs)`: the closure, with the
    /// valid outputs of every derivation in it (and their closures) if asked.
    fn closure(&self, paths: &BTreeSet<StorePath>, outputs: bool) -> Res<BTreeSet<StorePath>> {
        for p in paths {
            self.valid(p)?;
        }
        let db = self.store.db();
        let mut closure = db.query_closure(&paths.iter().cloned().collect::<Vec<_>>(), false)?;
        if !outputs {
            return Ok(closure);
        }
        let mut seen_drvs = BTreeSet::new();
        loop {
            let mut more = Vec::new();
            for p in &closure {
                if p.name().ends_with(".drv") && seen_drvs.insert(p.clone()) {
                    for out in db.query_derivation_outputs(p)?.into_values() {
                        if !closure.contains(&out) && db.is_valid_path(&out)? {
                            more.push(out);
                        }
                    }
                }
            }
            if more.is_empty() {
                return Ok(closure);
            }
            closure.extend(db.query_closure(&more, false)?);
        }
    }

    /// `exportPaths` (`crate::export`).
    fn export_paths(&mut self, paths: &BTreeSet<StorePath>) -> Res<()> {
        crate::export::export_paths(&self.store, paths, &mut self.w).map_err(ServeFailure::from)
    }

    /// `importPaths(NoCheckSigs)` (`crate::export`).
    fn import_paths(&mut self) -> Res<()> {
        crate::export::import_paths(&mut self.store, &mut self.r)
            .map(drop)
            .map_err(ServeFailure::from)
    }

    /// Substitute the invalid ones of `paths` that the substituters have; a failure is
    /// a warning on the log (Nix's `substitutePaths`), the paths stay invalid.
    fn substitute_paths(&mut self, paths: &BTreeSet<StorePath>) -> Res<()> {
        let mut invalid = Vec::new();
        for p in paths {
            if !self.store.db().is_valid_path(p)? {
                invalid.push(p.clone());
            }
        }
        if invalid.is_empty() {
            return Ok(());
        }
        let mut events = firn_build::events::NoEvents;
        let done = firn_build::substitute::substitute_available(
            &mut self.store,
            &self.config.settings,
            &mut events,
            &invalid,
        );
        if let firn_build::substitute::Substituted::Failed(e) = done {
            let _ = writeln!(self.log, "warning: {e}");
        }
        Ok(())
    }

    /// The settings of a build: the server's, with what the client sent
    /// (`getBuildSettings`; substitution off, as Nix's serve forces it).
    fn build_settings(&self, b: &BuildSettings) -> firn_build::Settings {
        let mut st = self.config.settings.clone();
        let pairs = [
            ("max-silent-time", b.max_silent_time.to_string()),
            ("timeout", b.build_timeout.to_string()),
            ("max-build-log-size", b.max_log_size.to_string()),
            ("repeat", b.build_repeat.to_string()),
            ("enforce-determinism", b.enforce_determinism.to_string()),
            ("keep-failed", b.keep_failed.to_string()),
            ("substitute", "false".to_owned()),
        ];
        for (name, value) in pairs {
            // A value the settings refuse keeps the server's.
            let _ = st.apply(name, &value);
        }
        st
    }

    /// Run the worker on `tops`; `given` derivations are built from what was sent.
    fn run_worker(
        &mut self,
        tops: &[(StorePath, Wanted)],
        given: Option<(StorePath, Derivation<'static>)>,
        settings: firn_build::Settings,
    ) -> Vec<(StorePath, firn_build::BuildResult)> {
        let builder = LocalBuilder::new(LocalOptions::for_store(
            &self.store,
            &settings,
            self.config.userpool.clone(),
        ));
        let (gone, stop) = (self.gone, self.stop);
        let mut events = LogEvents {
            out: &mut *self.log,
            partial: BTreeMap::new(),
        };
        let mut worker = Worker::new(&mut self.store, settings, builder, &mut events, move || {
            gone() || stop()
        });
        if let Some((p, d)) = given {
            worker.give(p, d);
        }
        let res = worker.run(tops, firn_build::BuildMode::Normal);
        drop(worker);
        events.flush_all();
        res
    }

    /// BuildPaths: `Ok` or Nix's exit status and message (one failure: its error;
    /// several: `build of … failed`).
    fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        b: &BuildSettings,
    ) -> Res<Result<(), (u64, String)>> {
        let settings = self.build_settings(b);
        let mut tops: Vec<(StorePath, Wanted)> = Vec::new();
        let mut missing = Vec::new();
        for p in paths {
            match p {
                DerivedPath::Built { drv_path, outputs } => {
                    self.store.add_temp_root(drv_path)?;
                    let w = wanted(outputs);
                    match tops.iter_mut().find(|(d, _)| d == drv_path) {
                        Some((_, have)) => {
                            have.merge(&w);
                        }
                        None => tops.push((drv_path.clone(), w)),
                    }
                }
                DerivedPath::Opaque(path) => {
                    self.store.add_temp_root(path)?;
                    if !self.store.db().is_valid_path(path)? {
                        missing.push(path.clone());
                    }
                }
            }
        }
        let results = match tops.is_empty() {
            true => Vec::new(),
            false => self.run_worker(&tops, None, settings),
        };
        let sd = self.sd().clone();
        let failed: Vec<&(StorePath, firn_build::BuildResult)> = results
            .iter()
            .filter(|(_, r)| !r.status.success())
            .collect();
        let status = u64::from(firn_build::result::exit_status(
            &failed.iter().map(|(_, r)| r).collect::<Vec<_>>(),
        ));
        let mut shown: Vec<String> = failed.iter().map(|(p, _)| sd.display(p)).collect();
        shown.extend(missing.iter().map(|p| sd.display(p)));
        Ok(match (failed.as_slice(), missing.as_slice()) {
            ([], []) => Ok(()),
            ([], [p]) => Err((
                1,
                format!(
                    "path '{}' is required, but there is no substituter that can build it",
                    crate::events::hl(&sd.display(p))
                ),
            )),
            ([(_, r)], []) => Err((status, failure_text(r))),
            _ => {
                let list: Vec<String> = shown.iter().map(|s| format!("'{s}'")).collect();
                Err((
                    status.max(1),
                    format!("build of {} failed", crate::events::hl(&list.join(", "))),
                ))
            }
        })
    }

    /// BuildDerivation: the derivation sent (not a `.drv` of the store, which the
    /// client never copies), built with all its outputs wanted.
    fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        basic: &BasicDerivation,
        b: &BuildSettings,
    ) -> Res<BuildResult> {
        let sd = self.sd().clone();
        let drv = basic
            .to_derivation(drv_path)
            .map_err(|msg| ServeFailure::BadDerivation {
                drv: sd.display(drv_path),
                msg,
            })?;
        let settings = self.build_settings(b);
        self.store.add_temp_root(drv_path)?;
        let tops = [(drv_path.clone(), Wanted::All)];
        let mut results = self.run_worker(&tops, Some((drv_path.clone(), drv.clone())), settings);
        let Some((_, r)) = results.pop() else {
            return Ok(BuildResult::new(BuildStatus::MiscFailure, "not realised"));
        };
        let mut out = BuildResult::new(wire_status(r.status), String::new());
        if !r.status.success() {
            out.error_msg = failure_text(&r);
        }
        out.times_built = u32::from(r.status == FirnStatus::Built);
        out.start_time = r.start_time;
        out.stop_time = r.stop_time;
        if r.status.success() {
            out.built_outputs = built_outputs(&sd, &drv, &r.outputs);
        }
        Ok(out)
    }
}

/// The error message of a failed goal as Nix's serve has it: its logger prints build
/// logs, so the message carries no log tail.
fn failure_text(r: &firn_build::BuildResult) -> String {
    match r.error.as_deref() {
        Some(e) => error_text(e, None),
        None => "build failed".to_owned(),
    }
}

fn wanted(outputs: &BTreeSet<String>) -> Wanted {
    match outputs.is_empty() {
        true => Wanted::All,
        false => Wanted::Some(
            outputs
                .iter()
                .map(|o| OutputName::from(o.as_str()))
                .collect(),
        ),
    }
}

/// `builtOutputs`: each output's `Realisation` (JSON) keyed by its `DrvOutput`, the hash
/// modulo being that of the derivation as sent (no input derivations), as Nix's.
fn built_outputs(
    sd: &StoreDir,
    drv: &Derivation<'_>,
    outputs: &BTreeMap<OutputName, StorePath>,
) -> BTreeMap<String, String> {
    let mut lookup = |_: &StorePath| {
        Err::<firn_derivation::InputDrvHash, String>("no input derivations".to_owned())
    };
    let Ok(h) = hash_derivation_modulo(sd, drv, true, &mut lookup) else {
        return BTreeMap::new();
    };
    let mut m = BTreeMap::new();
    for (name, path) in outputs {
        let Some(oh) = h.for_output(drv, name.as_str().as_bytes()) else {
            continue;
        };
        let id = firn_derivation::DrvOutput::new(oh, name.as_str());
        let r = firn_derivation::Realisation::new(id.clone(), path.clone());
        m.insert(id.to_string(), r.to_json());
    }
    m
}

/// The worker's events for a serve session: builders' output, line by line, to the log
/// stream (as Nix's simple logger prints build logs); nothing else (Nix's serve logs
/// at `lvlError`).
struct LogEvents<'a> {
    out: &'a mut dyn Write,
    /// Each build's unfinished line and the column written next.
    partial: BTreeMap<StorePath, (Vec<u8>, usize)>,
}

impl LogEvents<'_> {
    fn line(&mut self, line: &[u8]) {
        let mut l = line.to_vec();
        l.push(b'\n');
        // The client may be gone; the build goes on (its hang-up stops it).
        let _ = self.out.write_all(&l).and_then(|()| self.out.flush());
    }

    fn flush(&mut self, drv: &StorePath) {
        if let Some((rest, _)) = self.partial.remove(drv) {
            if !rest.is_empty() {
                self.line(&rest);
            }
        }
    }

    fn flush_all(&mut self) {
        let drvs: Vec<StorePath> = self.partial.keys().cloned().collect();
        for d in drvs {
            self.flush(&d);
        }
    }
}

impl BuildEvents for LogEvents<'_> {
    fn build_log(&mut self, drv: &StorePath, data: &[u8]) {
        let (mut buf, mut pos) = self.partial.remove(drv).unwrap_or_default();
        for &c in data {
            match c {
                b'\n' => {
                    self.line(&buf);
                    buf.clear();
                    pos = 0;
                }
                // Nix's `handleChildOutput`: `\r` goes back to the start of the line,
                // what follows overwrites it.
                b'\r' => pos = 0,
                c => {
                    match buf.get_mut(pos) {
                        Some(b) => *b = c,
                        None => buf.push(c),
                    }
                    pos += 1;
                }
            }
        }
        self.partial.insert(drv.clone(), (buf, pos));
    }

    fn result(&mut self, drv: &StorePath, _result: &firn_build::BuildResult) {
        self.flush(drv);
    }

    /// What Nix prints at error level, which its serve shows: the kept build directory
    /// of a failed build (`--keep-failed`), so that the client sees where it is.
    fn message(&mut self, message: firn_build::events::Message<'_>) {
        if let firn_build::events::Message::KeepingBuildDir { path } = message {
            self.line(format!("note: keeping build directory '{}'", path.display()).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn path(s: &str) -> StorePath {
        StoreDir::default()
            .parse(&format!("/nix/store/{s}"))
            .unwrap()
    }

    #[test]
    fn build_logs_are_split_into_lines_and_carriage_returns_overwrite() {
        let drv = path("9f8ybc553mfy693dwvw1j9wnk6haq9ab-top.drv");
        let mut out = Vec::new();
        let mut ev = LogEvents {
            out: &mut out,
            partial: BTreeMap::new(),
        };
        ev.build_log(&drv, b"one\ntw");
        ev.build_log(&drv, b"o\n10%\r50%\rdone\nlast");
        ev.flush_all();
        assert_eq!(out, b"one\ntwo\ndone\nlast\n");
    }
}

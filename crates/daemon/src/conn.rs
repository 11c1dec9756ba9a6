//! One connection: the handshake, then operations until the client closes it. Each op
//! ends in `STDERR_LAST` + its reply, or in `STDERR_ERROR` (then the connection goes on,
//! as in Nix). Input that cannot be decoded (an unknown op, bad arguments) gets the error
//! frame and ends the connection, since the stream is out of step; payloads are framed,
//! so a bad NAR inside one is drained and only fails its op.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use firn_build::builder::local::{LocalBuilder, LocalOptions};
use firn_build::recursive::AllowedPaths;
use firn_build::{BuildError, BuildStatus as FirnStatus, Settings, Wanted, Worker};
use firn_derivation::{
    hash_derivation_modulo, FileIngestionMethod, FixedOutputHash, HashAlgo, ModuloCache,
    OutputName, StoreDir, StorePath,
};
use firn_protocol::types::GcAction;
use firn_protocol::wire::FramedReader;
use firn_protocol::worker::{
    self, ClientSettings, GcResult, Missing, Request, SubstitutablePathInfo, NIX_VERSION,
};
use firn_protocol::{
    BuildMode, BuildResult, BuildStatus, ClientHello, ContentAddress, ContentAddressMethod,
    DerivedPath, Limits, Reader, RemoteError, Reply, StderrMsg, UnkeyedValidPathInfo,
    ValidPathInfo, Verbosity, WireError, Writer,
};
use firn_store::{GcOptions, Store, StoreError, StoreMessage, VerifyEvent, VerifyOptions};

use crate::events::{hl, Channel, DaemonEvents};
use crate::restrict::{censor, foreign_message, Gate, Policy};
use crate::{DaemonConfig, DaemonError};
use firn_store::nar_bound::NarBounded;

/// Largest text (AddTextToStore payloads, logs) taken into memory.
const MAX_TEXT: u64 = 256 << 20;

/// How an op failed.
#[derive(Debug)]
enum OpError {
    /// Sent as `STDERR_ERROR`; the connection goes on.
    Client(String),
    /// Sent as `STDERR_ERROR`, then the connection ends (the input is out of step).
    Fatal(String),
    /// The client is gone or the connection broke: end without a word.
    Gone,
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        Self::Client(e.to_string())
    }
}

impl From<firn_store::DbError> for OpError {
    fn from(e: firn_store::DbError) -> Self {
        Self::Client(e.to_string())
    }
}

impl From<io::Error> for OpError {
    fn from(_: io::Error) -> Self {
        Self::Gone
    }
}

fn client(msg: impl Into<String>) -> OpError {
    OpError::Client(msg.into())
}

/// Bad bytes in a payload: the framing keeps the stream in step, so only the op fails.
fn payload_err(e: WireError) -> OpError {
    match e {
        e if e.is_eof() => OpError::Gone,
        e => OpError::Fatal(e.to_string()),
    }
}

/// Serve one connection: `trusted` as decided from the peer; `gone` tells whether the
/// client hung up (checked while builds run), `stop` whether the daemon is stopping.
pub fn serve_connection<R: Read, W: Write>(
    r: R,
    w: W,
    config: &DaemonConfig,
    trusted: bool,
    gone: &dyn Fn() -> bool,
    stop: &dyn Fn() -> bool,
) -> Result<(), DaemonError> {
    serve_connection_with(r, w, config, trusted, Policy::Unrestricted, gone, stop)
}

/// [`serve_connection`] under `policy`: [`Policy::Restricted`] is the connection of a
/// recursive-Nix build (untrusted, its options ignored, as Nix's `daemon::Recursive`).
pub fn serve_connection_with<R: Read, W: Write>(
    r: R,
    w: W,
    config: &DaemonConfig,
    trusted: bool,
    policy: Policy,
    gone: &dyn Fn() -> bool,
    stop: &dyn Fn() -> bool,
) -> Result<(), DaemonError> {
    let trusted = trusted && policy.restricted().is_none();
    let store_dir = config.layout.store_dir.clone();
    let mut r = Reader::with_config(r, store_dir.clone(), Limits::default());
    let mut w = Writer::with_store_dir(w, store_dir);
    worker::read_client_magic(&mut r)?;
    worker::write_server_hello(&mut w)?;
    w.flush()?;
    let _hello = ClientHello::read(&mut r)?;
    // A store per connection, as Nix's daemon opens one per client (which also makes
    // missing directories and the database anew after a client removed them).
    let store = Store::open_with(
        &config.layout,
        &firn_store::StoreOptions {
            build_users_group: config.settings.build_users_group.clone(),
            auto_optimise: config.settings.auto_optimise_store,
            own_temp_roots: true,
        },
    );
    w.write_str(NIX_VERSION)?;
    // With `ca-derivations` (the daemon's own setting: clients cannot set it), the
    // realisation tables are made on opening, as Nix's LocalStore does.
    let store = store.and_then(|mut s| {
        if config.settings.ca_derivations() {
            s.enable_ca_derivations()?;
        }
        Ok(s)
    });
    let store = match store {
        Ok(s) => {
            // (Opening made `.links` and the per-user directories, as Nix's LocalStore.)
            StderrMsg::Last.write(&mut w)?;
            w.flush()?;
            s
        }
        Err(e) => {
            StderrMsg::Error(RemoteError::new(e.to_string())).write(&mut w)?;
            w.flush()?;
            return Err(e.into());
        }
    };
    let mut conn = Conn {
        r,
        w,
        store,
        settings: config.settings.clone(),
        config,
        trusted,
        verbosity: Verbosity::Error,
        gone,
        stop,
        tmp_counter: AtomicU64::new(0),
        policy,
    };
    conn.run()
}

struct Conn<'a, R: Read, W: Write> {
    r: Reader<R>,
    w: Writer<W>,
    store: Store,
    settings: Settings,
    config: &'a DaemonConfig,
    trusted: bool,
    verbosity: Verbosity,
    gone: &'a dyn Fn() -> bool,
    stop: &'a dyn Fn() -> bool,
    tmp_counter: AtomicU64,
    policy: Policy,
}

impl<R: Read, W: Write> Conn<'_, R, W> {
    fn run(&mut self) -> Result<(), DaemonError> {
        loop {
            let req = match Request::read(&mut self.r) {
                Ok(None) => return Ok(()),
                Ok(Some(req)) => req,
                Err(e) if e.is_eof() => return Ok(()),
                Err(e) => {
                    // Nix: the error, then the connection ends.
                    let _ = StderrMsg::Error(RemoteError::new(e.to_string())).write(&mut self.w);
                    let _ = self.w.flush();
                    return Err(e.into());
                }
            };
            match self.perform_gated(req) {
                Ok(Some(reply)) => {
                    StderrMsg::Last.write(&mut self.w)?;
                    reply.write(&mut self.w)?;
                }
                Ok(None) => {}
                Err(OpError::Client(msg)) => {
                    StderrMsg::Error(RemoteError::new(msg)).write(&mut self.w)?;
                }
                Err(OpError::Fatal(msg)) => {
                    StderrMsg::Error(RemoteError::new(msg.clone())).write(&mut self.w)?;
                    self.w.flush()?;
                    return Err(DaemonError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        msg,
                    )));
                }
                Err(OpError::Gone) => return Ok(()),
            }
            self.w.flush()?;
        }
    }

    fn sd(&self) -> &StoreDir {
        self.store.store_dir()
    }

    fn show(&self, p: &StorePath) -> String {
        self.sd().display(p)
    }

    fn channel(&mut self) -> (Channel<'_, W>, Rc<Cell<bool>>) {
        let gone = Rc::new(Cell::new(false));
        (
            Channel {
                w: &mut self.w,
                gone: Rc::clone(&gone),
                verbosity: self.verbosity,
            },
            gone,
        )
    }

    fn info_of(&self, p: &StorePath) -> Result<Option<UnkeyedValidPathInfo>, OpError> {
        Ok(self
            .store
            .db()
            .query_path_info(p)?
            .map(|i| UnkeyedValidPathInfo::from_store(&i)))
    }

    /// Run one op under the connection's [`Policy`]: decided by [`Policy::gate`], then
    /// served, then the restriction's after-effects (Nix's `RestrictedStore`).
    fn perform_gated(&mut self, req: Request) -> Result<Option<Reply>, OpError> {
        let Some(allowed) = self.policy.restricted().cloned() else {
            return self.perform(req);
        };
        match self.policy.gate(&req, self.sd()) {
            Gate::Serve => {}
            Gate::Answer(r) => return Ok(Some(*r)),
            Gate::Refuse(m) => return Err(client(m)),
        }
        let sd = self.sd().clone();
        let added = |p: &StorePath| {
            allowed.add(p).map(|_| ()).map_err(|e| {
                client(format!(
                    "could not add path '{}' to sandbox: {e}",
                    hl(&sd.display(p))
                ))
            })
        };
        match req {
            Request::QueryMissing(paths) => {
                let (ok, unknown): (Vec<DerivedPath>, Vec<DerivedPath>) = paths
                    .into_iter()
                    .partition(|p| allowed.is_allowed(path_part(p)));
                let mut m = self.query_missing(&ok)?;
                m.unknown
                    .extend(unknown.iter().map(|p| path_part(p).clone()));
                Ok(Some(Reply::Missing(m)))
            }
            Request::BuildPaths { ref paths, .. } => {
                let paths = paths.clone();
                let reply = self.perform(req)?;
                // Every path was built (else the op failed): their outputs are the build's.
                let mut roots = Vec::new();
                for p in &paths {
                    if let DerivedPath::Built { drv_path, outputs } = p {
                        let want = wanted(outputs);
                        let map = self.partial_output_map(drv_path)?;
                        roots.extend(
                            map.into_iter()
                                .filter(|(n, _)| want.contains(n))
                                .filter_map(|(_, p)| p),
                        );
                    }
                }
                self.add_closure(&allowed, &roots)?;
                Ok(reply)
            }
            Request::BuildPathsWithResults { .. } => {
                let reply = self.perform(req)?;
                if let Some(Reply::BuildResults(results)) = &reply {
                    let mut roots = Vec::new();
                    for (_, r) in results.iter().filter(|(_, r)| r.status.is_success()) {
                        for (id, json) in &r.built_outputs {
                            if let Ok(real) = firn_derivation::Realisation::from_json(json, id) {
                                roots.push(real.out_path);
                                allowed.add_drv_output(id);
                            }
                        }
                    }
                    self.add_closure(&allowed, &roots)?;
                }
                Ok(reply)
            }
            other => {
                let reply = self.perform(other)?;
                Ok(match reply {
                    Some(Reply::Paths(v)) => Some(Reply::Paths(
                        v.into_iter().filter(|p| allowed.is_allowed(p)).collect(),
                    )),
                    Some(Reply::PathInfo(Some(mut i))) => {
                        censor(&mut i);
                        Some(Reply::PathInfo(Some(i)))
                    }
                    Some(Reply::Path(p)) => {
                        added(&p)?;
                        Some(Reply::Path(p))
                    }
                    Some(Reply::AddedPath(info)) => {
                        added(&info.path)?;
                        Some(Reply::AddedPath(info))
                    }
                    r => r,
                })
            }
        }
    }

    /// Allow the closure of `roots` (what a restricted connection built).
    fn add_closure(&self, allowed: &AllowedPaths, roots: &[StorePath]) -> Result<(), OpError> {
        if roots.is_empty() {
            return Ok(());
        }
        let closure = self
            .store
            .db()
            .query_closure(roots, false)
            .map_err(StoreError::from)?;
        for p in &closure {
            allowed.add(p).map_err(|e| {
                client(format!(
                    "could not add path '{}' to sandbox: {e}",
                    hl(&self.show(p))
                ))
            })?;
        }
        Ok(())
    }

    /// Run one op: `Some(reply)` to send after `STDERR_LAST`, `None` if it was sent.
    fn perform(&mut self, req: Request) -> Result<Option<Reply>, OpError> {
        Ok(Some(match req {
            Request::SetOptions(s) => {
                self.set_options(&s);
                Reply::Nothing
            }
            Request::IsValidPath(p) => Reply::Bool(self.store.db().is_valid_path(&p)?),
            Request::QueryValidPaths { paths, .. } => {
                let mut v = Vec::new();
                for p in paths {
                    if self.store.db().is_valid_path(&p)? {
                        v.push(p);
                    }
                }
                Reply::Paths(v)
            }
            Request::QueryPathInfo(p) => Reply::PathInfo(self.info_of(&p)?),
            Request::QueryPathHash(p) => match self.info_of(&p)? {
                Some(i) => Reply::Text(i.nar_hash.to_base16()),
                None => return Err(client(format!("path '{}' is not valid", self.show(&p)))),
            },
            Request::QueryReferences(p) => {
                Reply::Paths(self.store.db().query_references(&p)?.into_iter().collect())
            }
            Request::QueryReferrers(p) => {
                Reply::Paths(self.store.db().query_referrers(&p)?.into_iter().collect())
            }
            Request::QueryValidDerivers(p) => Reply::Paths(
                self.store
                    .db()
                    .query_valid_derivers(&p)?
                    .into_iter()
                    .collect(),
            ),
            Request::QueryDeriver(p) => {
                Reply::OptPath(self.store.db().query_path_info(&p)?.and_then(|i| i.deriver))
            }
            Request::QueryDerivationOutputMap(p) => Reply::OutputMap(self.partial_output_map(&p)?),
            Request::QueryDerivationOutputs(p) => {
                Reply::Paths(self.output_map(&p)?.into_values().collect())
            }
            Request::QueryDerivationOutputNames(p) => {
                Reply::Strings(self.output_map(&p)?.into_keys().collect())
            }
            Request::QueryAllValidPaths => Reply::Paths(
                self.store
                    .db()
                    .query_all_valid_paths()?
                    .into_iter()
                    .collect(),
            ),
            Request::QueryPathFromHashPart(h) => Reply::OptPath(
                self.store
                    .db()
                    .query_all_valid_paths()?
                    .into_iter()
                    .find(|p| p.hash_part() == h),
            ),
            // No substituters: nothing is substitutable.
            Request::HasSubstitutes(p) => Reply::Bool(!self.substitutable_infos(&[p])?.is_empty()),
            Request::QuerySubstitutablePaths(paths) => {
                let paths: Vec<StorePath> = paths.into_iter().collect();
                Reply::Paths(self.substitutable_infos(&paths)?.into_keys().collect())
            }
            Request::QuerySubstitutablePathInfo(p) => {
                Reply::SubstitutablePathInfo(self.substitutable_infos(&[p])?.into_values().next())
            }
            Request::QuerySubstitutablePathInfos(paths) => {
                let paths: Vec<StorePath> = paths.into_keys().collect();
                Reply::SubstitutablePathInfos(
                    self.substitutable_infos(&paths)?.into_iter().collect(),
                )
            }
            Request::QueryRealisation(id) => {
                Reply::Realisations(match self.store.ca_derivations() {
                    true => self
                        .store
                        .db()
                        .query_realisation(&id)?
                        .into_iter()
                        .collect(),
                    false => Vec::new(),
                })
            }
            Request::QueryMissing(paths) => Reply::Missing(self.query_missing(&paths)?),
            Request::AddTempRoot(p) => {
                self.store.add_temp_root(&p)?;
                Reply::Ok
            }
            Request::AddIndirectRoot(link) => {
                self.store.add_indirect_root(Path::new(&link))?;
                Reply::Ok
            }
            Request::SyncWithGC => Reply::Ok,
            Request::EnsurePath(p) => {
                self.store.add_temp_root(&p)?;
                if !self.store.db().is_valid_path(&p)? {
                    return Err(client(format!(
                        "path '{}' does not exist and cannot be created",
                        hl(&self.show(&p))
                    )));
                }
                Reply::Ok
            }
            Request::FindRoots => Reply::Roots(self.find_roots()?),
            Request::CollectGarbage {
                action,
                paths_to_delete,
                ignore_liveness,
                max_freed,
            } => {
                if ignore_liveness {
                    return Err(client("you are not allowed to ignore liveness"));
                }
                Reply::CollectGarbage(self.collect_garbage(action, &paths_to_delete, max_freed)?)
            }
            Request::VerifyStore {
                check_contents,
                repair,
            } => {
                if repair && !self.trusted {
                    return Err(client("you are not privileged to repair paths"));
                }
                Reply::Bool(self.verify(check_contents, repair)?)
            }
            Request::AddSignatures { path, sigs } => {
                if !self.trusted {
                    return Err(client("you are not privileged to add signatures"));
                }
                let Some(mut info) = self.store.db().query_path_info(&path)? else {
                    return Err(client(format!("path '{}' is not valid", self.show(&path))));
                };
                for s in sigs {
                    if !info.sigs.contains(&s) {
                        info.sigs.push(s);
                    }
                }
                self.store
                    .db_mut()
                    .register_valid_paths(&[firn_store::Registration {
                        info,
                        drv_outputs: BTreeMap::new(),
                    }])?;
                Reply::Ok
            }
            Request::AddTextToStore {
                name,
                text,
                references,
            } => {
                let info = self
                    .store
                    .add_text(&name, &text, references, BTreeMap::new())?;
                Reply::Path(info.path)
            }
            Request::AddToStore {
                name,
                method,
                references,
                ..
            } => {
                let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
                let foreign = self.policy.foreign(&references, None);
                let Self { r, store, .. } = self;
                let mut fr = r.framed();
                let res = match foreign {
                    Some(p) => Err(client(foreign_message(store.store_dir(), &p))),
                    None => add_to_store(store, &name, method, references, &mut fr, n),
                };
                let info = finish_payload(&mut fr, res)?;
                Reply::AddedPath(ValidPathInfo {
                    path: info.path.clone(),
                    info: UnkeyedValidPathInfo::from_store(&info),
                })
            }
            Request::AddToStoreNar {
                info,
                dont_check_sigs,
                ..
            } => {
                let check = self.check_sigs(dont_check_sigs);
                let keys = self.trusted_keys(check);
                let Self {
                    r, store, policy, ..
                } = self;
                let mut fr = r.framed();
                let res = keys.and_then(|k| add_nar(store, &info, k.as_ref(), policy, &mut fr));
                finish_payload(&mut fr, res)?;
                Reply::Nothing
            }
            Request::AddMultipleToStore {
                dont_check_sigs, ..
            } => {
                let check = self.check_sigs(dont_check_sigs);
                let keys = self.trusted_keys(check);
                let Self {
                    r, store, policy, ..
                } = self;
                let limits = r.limits();
                let sd = r.store_dir().clone();
                let mut fr = r.framed();
                let res = (|| {
                    let keys = keys?;
                    let mut inner = Reader::with_config(&mut fr, sd, limits);
                    let n = inner.read_u64("count").map_err(payload_err)?;
                    for _ in 0..n {
                        let info = ValidPathInfo::read(&mut inner).map_err(payload_err)?;
                        add_nar(store, &info, keys.as_ref(), policy, inner.get_mut())?;
                    }
                    Ok(())
                })();
                finish_payload(&mut fr, res)?;
                Reply::Nothing
            }
            Request::AddBuildLog(drv) => {
                let trusted = self.trusted;
                let log_dir = self.store.layout().log_dir.clone();
                let Self { r, .. } = self;
                let mut fr = r.framed();
                let res = (|| {
                    if !trusted {
                        return Err(client("you are not privileged to add logs"));
                    }
                    let data = fr.read_to_vec(MAX_TEXT).map_err(payload_err)?;
                    let path = firn_build::log::log_path(&log_dir, &drv);
                    let mut log = firn_build::log::BuildLog::create(path.clone())
                        .map_err(|e| client(format!("{}: {e}", path.display())))?;
                    log.write(&data)
                        .and_then(|()| log.finish())
                        .map_err(|e| client(format!("{}: {e}", path.display())))?;
                    Ok(())
                })();
                finish_payload(&mut fr, res)?;
                Reply::Ok
            }
            Request::NarFromPath(p) => {
                if !self.store.db().is_valid_path(&p)? {
                    return Err(client(format!("path '{}' is not valid", self.show(&p))));
                }
                let real = self.store.real_path(&p);
                StderrMsg::Last.write(&mut self.w)?;
                // The NAR follows directly; an error now cannot be reported in-band.
                firn_store::nar::dump_path(&real, self.w.get_mut())
                    .map_err(|e| OpError::Fatal(e.to_string()))?;
                return Ok(None);
            }
            Request::BuildPaths { paths, mode } => {
                let outcome = self.build(&paths, mode)?;
                let failed: Vec<&Outcome> = outcome
                    .iter()
                    .filter(|(_, r)| r.as_ref().map_or(true, |b| !b.result.status.success()))
                    .collect();
                match failed.as_slice() {
                    [] => Reply::Ok,
                    [(_, e)] => {
                        return Err(client(match e {
                            Err(msg) => msg.clone(),
                            Ok(b) => b.error.clone().unwrap_or_else(|| "build failed".into()),
                        }))
                    }
                    many => {
                        let shown: Vec<String> = many
                            .iter()
                            .map(|(p, _)| format!("'{}'", p.to_string(self.sd())))
                            .collect();
                        if let Some(msg) = many.iter().find_map(|(_, r)| match r {
                            Err(m) => Some(m.clone()),
                            Ok(b) => b.error.clone(),
                        }) {
                            let (mut ch, _) = self.channel();
                            ch.line(Verbosity::Error, &format!("\x1b[31;1merror:\x1b[0m {msg}"));
                        }
                        return Err(client(format!("build of {} failed", hl(&shown.join(", ")))));
                    }
                }
            }
            Request::BuildPathsWithResults { paths, mode } => {
                let outcome = self.build(&paths, mode)?;
                let mut v = Vec::new();
                for (p, r) in outcome {
                    let br = match r {
                        Err(msg) => BuildResult::new(BuildStatus::NoSubstituters, msg),
                        Ok(b) => self.wire_result(&p, &b),
                    };
                    v.push((p, br));
                }
                Reply::BuildResults(v)
            }
            Request::BuildDerivation { drv_path, mode, .. } => {
                // The derivation is built from its `.drv` in the store (see docs/daemon.md).
                if !self.store.db().is_valid_path(&drv_path)? {
                    return Err(client(format!(
                        "firn builds only derivations whose '.drv' is in its store; '{}' is not",
                        self.show(&drv_path)
                    )));
                }
                let p = DerivedPath::Built {
                    drv_path,
                    outputs: BTreeSet::new(),
                };
                let mut outcome = self.build(std::slice::from_ref(&p), mode)?;
                match outcome.pop() {
                    Some((p, Ok(b))) => Reply::BuildResult(self.wire_result(&p, &b)),
                    Some((_, Err(msg))) => {
                        Reply::BuildResult(BuildResult::new(BuildStatus::MiscFailure, msg))
                    }
                    None => return Err(client("nothing was built")),
                }
            }
            Request::ImportPaths => return Err(client(
                "firn daemon does not implement ImportPaths (nix-store --import); use 'nix copy'",
            )),
            Request::ExportPath { .. } => {
                return Err(client(
                    "firn daemon does not implement ExportPath (nix-store --export)",
                ))
            }
            Request::OptimiseStore => {
                let stats = self.store.optimise_store()?;
                let (mut ch, _) = self.channel();
                ch.line(Verbosity::Info, &stats.to_string());
                Reply::Ok
            }
            Request::RegisterDrvOutput(r) => {
                if !self.store.ca_derivations() {
                    return Err(client(
                        firn_build::BuildError::MissingFeature {
                            feature: "ca-derivations",
                        }
                        .to_string(),
                    ));
                }
                self.store.db_mut().register_drv_output(&r)?;
                Reply::Nothing
            }
        }))
    }

    /// Nix's `ClientSettings::apply`: the fixed fields always; the overrides all for a
    /// trusted client, only the harmless ones for others (the rest ignored, as Nix).
    fn set_options(&mut self, s: &ClientSettings) {
        self.verbosity = s.verbosity;
        // Nix's recursive daemon applies no client settings: builds use the outer one's.
        if self.policy.restricted().is_some() {
            return;
        }
        let st = &mut self.settings;
        st.keep_failed = s.keep_failed;
        st.keep_going = s.keep_going;
        st.max_jobs = firn_build::settings::MaxJobs(s.max_build_jobs as usize);
        st.max_silent_time = firn_build::settings::Seconds(
            (s.max_silent_time > 0)
                .then(|| std::time::Duration::from_secs(u64::from(s.max_silent_time))),
        );
        st.cores = s.build_cores;
        let mut warnings = Vec::new();
        for (name, value) in &s.overrides {
            let allowed = self.trusted
                || matches!(
                    name.as_str(),
                    "timeout" | "build-timeout" | "build-repeat" | "connect-timeout"
                )
                || (name == "builders" && value.is_empty());
            // Experimental features stay the daemon's, as in Nix.
            if !allowed || name == "experimental-features" || name == "ssh-auth-sock" {
                continue;
            }
            match self.settings.apply(name, value) {
                Ok(_) | Err(firn_build::SettingError::Unknown(_)) => {}
                Err(e) => warnings.push(e.to_string()),
            }
        }
        self.store
            .set_auto_optimise(self.settings.auto_optimise_store);
        let (mut ch, _) = self.channel();
        for w in warnings {
            ch.line(Verbosity::Warn, &format!("warning: {w}"));
        }
    }

    /// The keys a path's signatures are checked against, when they are to be checked.
    fn trusted_keys(&self, check: bool) -> Result<Option<firn_cache::PublicKeys>, OpError> {
        if !check {
            return Ok(None);
        }
        firn_cache::keys::trusted_keys(
            &self.settings.trusted_public_keys.0,
            &self.settings.secret_key_files.0,
        )
        .map(Some)
        .map_err(|e| client(e.to_string()))
    }

    /// Whether signatures are to be checked: an untrusted client cannot say no.
    fn check_sigs(&self, dont_check_sigs: bool) -> bool {
        self.settings.require_sigs && !(self.trusted && dont_check_sigs)
    }

    /// The `DerivationOutputs` of a valid `.drv`, else computed from the file.
    fn output_map(&self, drv: &StorePath) -> Result<BTreeMap<String, StorePath>, OpError> {
        let m = self.store.db().query_derivation_outputs(drv)?;
        if !m.is_empty() {
            return Ok(m);
        }
        let d = self.store.read_derivation(drv)?;
        let outs = d
            .output_paths(self.sd())
            .map_err(|e| client(format!("derivation '{}': {e}", self.show(drv))))?;
        Ok(outs
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    /// Nix's `queryPartialDerivationOutputMap`: the `DerivationOutputs` rows (else the
    /// paths the derivation states), and with `ca-derivations` each output's
    /// realisation, or none when it is not realised.
    fn partial_output_map(
        &self,
        drv: &StorePath,
    ) -> Result<BTreeMap<String, Option<StorePath>>, OpError> {
        let mut m: BTreeMap<String, Option<StorePath>> = self
            .output_map(drv)?
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        if !self.store.ca_derivations() {
            return Ok(m);
        }
        let d = self.store.read_derivation(drv)?;
        let hashes = firn_build::goal::output_hashes(&self.store, drv, &d)
            .map_err(|e| client(e.to_string()))?;
        for (name, h) in hashes {
            let id = firn_derivation::DrvOutput::new(h, name.as_str());
            match self.store.db().query_realisation(&id)? {
                Some(r) => {
                    m.insert(name.to_string(), Some(r.out_path));
                }
                None => {
                    m.entry(name.to_string()).or_insert(None);
                }
            }
        }
        Ok(m)
    }

    /// What the connection's substituters know of the invalid ones of `paths` (the
    /// first cache with an acceptable narinfo for each), for the substitution queries:
    /// the caches are opened and asked once for all of them.
    fn substitutable_infos(
        &self,
        paths: &[StorePath],
    ) -> Result<BTreeMap<StorePath, SubstitutablePathInfo>, OpError> {
        let plan = firn_build::substitute::plan(&self.store, &self.settings, paths)
            .map_err(|e| client(e.to_string()))?;
        let Some(plan) = plan else {
            return Ok(BTreeMap::new());
        };
        Ok(plan
            .fetch
            .iter()
            .filter(|(i, _)| paths.contains(&i.path))
            .map(|(i, _)| {
                let info = SubstitutablePathInfo {
                    deriver: i.deriver.clone(),
                    references: i.references.clone(),
                    download_size: i.file_size.unwrap_or(0),
                    nar_size: i.nar_size,
                };
                (i.path.clone(), info)
            })
            .collect())
    }

    /// QueryMissing as Nix's `queryMissing`: derivations whose missing outputs the
    /// substituters have (closures included) are fetched, the others built; an invalid
    /// opaque path is fetched if its closure can be, else unknown.
    fn query_missing(&self, paths: &[DerivedPath]) -> Result<Missing, OpError> {
        let mut m = Missing::default();
        let mut tops = Vec::new();
        let mut opaque = Vec::new();
        for p in paths {
            match p {
                DerivedPath::Opaque(p) => {
                    if !self.store.db().is_valid_path(p)? {
                        opaque.push(p.clone());
                    }
                }
                DerivedPath::Built { drv_path, outputs } => {
                    if !self.store.db().is_valid_path(drv_path)? {
                        m.unknown.insert(drv_path.clone());
                        continue;
                    }
                    tops.push((drv_path.clone(), wanted(outputs)));
                }
            }
        }
        let found = firn_build::missing::query_missing(&self.store, &self.settings, &tops)
            .map_err(|e| client(e.to_string()))?;
        m.will_build = found.will_build;
        m.will_substitute = found.will_substitute;
        m.download_size = found.download_size;
        m.nar_size = found.nar_size;
        for p in opaque {
            // Each on its own: one path no cache has is unknown, not an error.
            let mut trial = firn_build::missing::Missing {
                will_substitute: m.will_substitute.clone(),
                download_size: m.download_size,
                nar_size: m.nar_size,
                ..Default::default()
            };
            match firn_build::missing::add_paths(
                &self.store,
                &self.settings,
                std::slice::from_ref(&p),
                &mut trial,
            ) {
                Ok(()) => {
                    m.will_substitute = trial.will_substitute;
                    m.download_size = trial.download_size;
                    m.nar_size = trial.nar_size;
                }
                Err(_) => {
                    m.unknown.insert(p);
                }
            }
        }
        Ok(m)
    }

    fn find_roots(&self) -> Result<Vec<(String, StorePath)>, OpError> {
        let roots = match self.trusted {
            true => self.store.find_roots()?,
            false => {
                let mut roots = self.store.find_roots_no_temp(true)?;
                for p in self.store.find_temp_roots(&mut |_| {})?.into_keys() {
                    roots
                        .entry(p)
                        .or_default()
                        .insert(PathBuf::from("{censored}"));
                }
                roots
            }
        };
        let mut v = Vec::new();
        for (p, links) in roots {
            for l in links {
                v.push((l.display().to_string(), p.clone()));
            }
        }
        Ok(v)
    }

    fn collect_garbage(
        &mut self,
        action: GcAction,
        paths: &BTreeSet<StorePath>,
        max_freed: u64,
    ) -> Result<GcResult, OpError> {
        let opts = GcOptions {
            action: match action {
                GcAction::ReturnLive => firn_store::GcAction::ReturnLive,
                GcAction::ReturnDead => firn_store::GcAction::ReturnDead,
                GcAction::DeleteDead | GcAction::DeleteSpecific => firn_store::GcAction::DeleteDead,
            },
            max_freed,
            keep_outputs: self.settings.keep_outputs,
            keep_derivations: self.settings.keep_derivations,
        };
        let Self {
            store,
            w,
            verbosity,
            ..
        } = self;
        let gone = Rc::new(Cell::new(false));
        let mut ch = Channel {
            w,
            gone,
            verbosity: *verbosity,
        };
        let mut log = |m: &StoreMessage| ch.line(Verbosity::Info, &m.to_string());
        let res = match action {
            GcAction::DeleteSpecific => store.delete_specific(paths, &opts, &mut log)?,
            _ => store.collect_garbage(&opts, &mut log)?,
        };
        Ok(GcResult {
            paths: res.paths,
            bytes_freed: res.bytes_freed,
        })
    }

    /// `verifyStore`: true if errors are left.
    fn verify(&mut self, check_contents: bool, repair: bool) -> Result<bool, OpError> {
        let Self {
            store,
            w,
            verbosity,
            ..
        } = self;
        let mut ch = Channel {
            w,
            gone: Rc::new(Cell::new(false)),
            verbosity: *verbosity,
        };
        let mut report = |e: &VerifyEvent| {
            let level = match e {
                VerifyEvent::Modified { .. } | VerifyEvent::Disappeared { .. } => Verbosity::Error,
                // The client says it itself.
                VerifyEvent::NotAllFixed => return,
                _ => Verbosity::Info,
            };
            ch.line(level, &e.to_string());
        };
        let rep = store.verify(
            &VerifyOptions {
                check_contents,
                repair,
            },
            &mut report,
        )?;
        Ok(!rep.all_fixed())
    }

    /// Realise `paths` in firn's worker, streaming its events; per path the goal's
    /// result (with the Nix-worded error text of a failure), or why it cannot be
    /// realised.
    fn build(&mut self, paths: &[DerivedPath], mode: BuildMode) -> Result<Vec<Outcome>, OpError> {
        let mode = match mode {
            BuildMode::Normal => firn_build::BuildMode::Normal,
            BuildMode::Check => firn_build::BuildMode::Check,
            BuildMode::Repair if !self.trusted => {
                return Err(client(
                    "repairing is not allowed because you are not in 'trusted-users'",
                ))
            }
            BuildMode::Repair => return Err(client("firn cannot repair paths (--repair)")),
        };
        let mut tops: Vec<(StorePath, Wanted)> = Vec::new();
        for p in paths {
            if let DerivedPath::Built { drv_path, outputs } = p {
                self.store.add_temp_root(drv_path)?;
                match tops.iter_mut().find(|(d, _)| d == drv_path) {
                    Some((_, w)) => {
                        w.merge(&wanted(outputs));
                    }
                    None => tops.push((drv_path.clone(), wanted(outputs))),
                }
            }
        }
        let settings = self.settings.clone();
        let builder = LocalBuilder::new(LocalOptions::for_store(
            &self.store,
            &settings,
            self.config.userpool.clone(),
        ));
        let sd = self.sd().clone();
        let (gone, stop) = (self.gone, self.stop);
        let Self {
            store,
            w,
            verbosity,
            ..
        } = self;
        let broken = Rc::new(Cell::new(false));
        let ch = Channel {
            w,
            gone: Rc::clone(&broken),
            verbosity: *verbosity,
        };
        let top_set = tops.iter().map(|(p, _)| p.clone()).collect();
        let mut events = DaemonEvents::new(ch, sd.clone(), top_set);
        let mut failed_here: BTreeSet<StorePath> = BTreeSet::new();
        // Opaque paths that are not valid come from the substituters (Nix's
        // `PathSubstitutionGoal`); one that fails says why.
        let mut not_substituted: BTreeMap<StorePath, String> = BTreeMap::new();
        let mut substituted: BTreeSet<StorePath> = BTreeSet::new();
        let mut invalid: Vec<StorePath> = Vec::new();
        for p in paths {
            if let DerivedPath::Opaque(path) = p {
                if !store.db().is_valid_path(path)? && !invalid.contains(path) {
                    invalid.push(path.clone());
                }
            }
        }
        if !invalid.is_empty() {
            use firn_build::substitute::{substitute_available, Substituted};
            match substitute_available(store, &settings, &mut events, &invalid) {
                Substituted::All => {
                    for p in invalid {
                        if store.db().is_valid_path(&p)? {
                            substituted.insert(p);
                        }
                    }
                }
                Substituted::No => {}
                Substituted::Failed(e) => {
                    let text = events.error_text(&e);
                    for p in invalid {
                        not_substituted.insert(p, text.clone());
                    }
                }
            }
        }
        let results = if tops.is_empty() {
            Vec::new()
        } else {
            let b2 = Rc::clone(&broken);
            let hook = self.config.recursive_nix();
            let mut worker = Worker::new(store, settings, builder, &mut events, move || {
                b2.get() || gone() || stop()
            })
            .with_recursive_nix(hook);
            let r = worker.run(&tops, mode);
            // Goals that failed on their own (not stopped because another failed).
            for (p, res) in worker.results() {
                let stopped = matches!(
                    res.error.as_deref(),
                    Some(BuildError::CancelledByFailure | BuildError::Cancelled)
                );
                if !res.status.success() && !stopped {
                    failed_here.insert(p.clone());
                }
            }
            r
        };
        events.stop_all();
        let client_gone = broken.get() || gone();
        let texts: Vec<Option<String>> = results
            .iter()
            .map(|(p, r)| {
                let e = r.error.as_deref()?;
                if let BuildError::CancelledByFailure = e {
                    // Nix wakes a goal whose input failed: it reports that input.
                    let count = store.read_derivation(p).ok().map_or(0, |d| {
                        d.input_drvs
                            .keys()
                            .filter(|i| failed_here.contains(*i))
                            .count()
                    });
                    if count > 0 {
                        return Some(events.error_text(&BuildError::DependenciesFailed {
                            drv: sd.display(p),
                            count,
                        }));
                    }
                }
                Some(events.error_text(e))
            })
            .collect();
        drop(events);
        if client_gone {
            return Err(OpError::Gone);
        }
        if stop() {
            return Err(client("interrupted: the daemon is stopping"));
        }
        let mut out = Vec::new();
        for p in paths {
            match p {
                DerivedPath::Opaque(path) => {
                    store.add_temp_root(path)?;
                    let r = match store.db().is_valid_path(path)? {
                        true => Ok(Built {
                            result: match substituted.contains(path) {
                                true => firn_build::BuildResult::substituted(BTreeMap::new()),
                                false => firn_build::BuildResult::already_valid(BTreeMap::new()),
                            },
                            error: None,
                        }),
                        false => Err(match not_substituted.get(path) {
                            Some(why) => why.clone(),
                            None => format!(
                                "path '{}' is required, but there is no substituter that can build it",
                                hl(&sd.display(path))
                            ),
                        }),
                    };
                    out.push((p.clone(), r));
                }
                DerivedPath::Built { drv_path, .. } => {
                    let i = results.iter().position(|(d, _)| d == drv_path);
                    let r = match i {
                        Some(i) => Ok(Built {
                            result: results[i].1.clone(),
                            error: texts[i].clone(),
                        }),
                        None => Err("not realised".to_owned()),
                    };
                    out.push((p.clone(), r));
                }
            }
        }
        Ok(out)
    }

    /// The wire `BuildResult` of a goal, with the realisations of the wanted outputs.
    fn wire_result(&self, p: &DerivedPath, b: &Built) -> BuildResult {
        let r = &b.result;
        let status = crate::events::wire_status(r.status);
        let mut out = BuildResult::new(status, b.error.clone().unwrap_or_default());
        out.times_built = u32::from(r.status == FirnStatus::Built);
        out.start_time = r.start_time;
        out.stop_time = r.stop_time;
        if let (true, DerivedPath::Built { drv_path, outputs }) = (r.status.success(), p) {
            let want = wanted(outputs);
            let outs: BTreeMap<&OutputName, &StorePath> = r
                .outputs
                .iter()
                .filter(|(n, _)| want.contains(n.as_str()))
                .collect();
            out.built_outputs = self.realisations(drv_path, &outs).unwrap_or_default();
        }
        out
    }

    /// `Realisation`s (JSON) of outputs of `drv`, keyed by `DrvOutput`
    /// (`sha256:<hash modulo>!<output>`), as Nix 2.8 sends in `builtOutputs`.
    fn realisations(
        &self,
        drv: &StorePath,
        outs: &BTreeMap<&OutputName, &StorePath>,
    ) -> Option<BTreeMap<String, String>> {
        let sd = self.sd();
        let parsed = self.store.read_derivation(drv).ok()?;
        let mut cache = ModuloCache::new();
        let mut load = |p: &StorePath| self.store.read_derivation(p);
        let mut lookup = |p: &StorePath| cache.get(sd, p, &mut load);
        let h = hash_derivation_modulo(sd, &parsed, true, &mut lookup).ok()?;
        let mut m = BTreeMap::new();
        for (name, path) in outs {
            let Some(oh) = h.for_output(&parsed, name.as_str().as_bytes()) else {
                continue;
            };
            let id = firn_derivation::DrvOutput::new(oh, name.as_str());
            // The recorded realisation (with what it depends on), if there is one.
            let recorded = match self.store.ca_derivations() {
                true => self.store.db().query_realisation(&id).ok().flatten(),
                false => None,
            };
            let r = recorded
                .filter(|r| &r.out_path == *path)
                .unwrap_or_else(|| firn_derivation::Realisation::new(id.clone(), (*path).clone()));
            m.insert(id.to_string(), r.to_json());
        }
        Some(m)
    }
}

/// What became of one wanted path: its goal's result, or why it cannot be realised.
type Outcome = (DerivedPath, Result<Built, String>);

/// A goal's result with the error text to send for it.
#[derive(Debug)]
struct Built {
    result: firn_build::BuildResult,
    error: Option<String>,
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

/// Drain what is left of a framed payload, then give the op's result; a payload that
/// cannot be drained ends the connection.
fn finish_payload<R: Read, T>(
    fr: &mut FramedReader<'_, R>,
    res: Result<T, OpError>,
) -> Result<T, OpError> {
    match (fr.drain(), res) {
        (_, Err(OpError::Gone)) => Err(OpError::Gone),
        (Err(e), _) => Err(payload_err(e)),
        // The framing is intact: only this op failed.
        (Ok(_), Err(OpError::Fatal(m))) => Err(OpError::Client(m)),
        (Ok(_), r) => r,
    }
}

/// Whether `info`'s content address really gives its path (Nix's
/// `isContentAddressed`), so it needs no signature.
fn content_addressed(sd: &StoreDir, info: &ValidPathInfo) -> bool {
    let name = info.path.name();
    let computed = match info.info.ca {
        Some(ContentAddress::Text(h)) => sd.make_text_path(name, &h, &info.info.references),
        Some(ContentAddress::Fixed { method, hash }) if info.info.references.is_empty() => {
            sd.make_fixed_output_path(&FixedOutputHash { method, hash }, name)
        }
        // Recursive sha256 with references (what `nix profile` adds): a `source` path
        // over the references, a self-reference counted apart, as Nix's
        // `makeFixedOutputPath`.
        Some(ContentAddress::Fixed { method, hash })
            if method == FileIngestionMethod::Recursive && hash.algo() == HashAlgo::Sha256 =>
        {
            let refs = info.info.references.iter().filter(|r| **r != info.path);
            let self_ref = info.info.references.iter().any(|r| *r == info.path);
            sd.make_source_path(name, &hash, refs, self_ref)
        }
        _ => return false,
    };
    computed.is_ok_and(|p| p == info.path)
}

/// AddToStoreNar / one path of AddMultipleToStore: check the signature rule, then add
/// the NAR that follows in `input` (skipped if the path is valid already).
fn add_nar(
    store: &mut Store,
    info: &ValidPathInfo,
    keys: Option<&firn_cache::PublicKeys>,
    policy: &Policy,
    input: &mut dyn Read,
) -> Result<(), OpError> {
    let sd = store.store_dir().clone();
    let mut nar = NarBounded::new(input);
    // A restricted connection: only references it may use; the path is then its own.
    if let Some(p) = policy.foreign(&info.info.references, Some(&info.path)) {
        return Err(client(foreign_message(&sd, &p)));
    }
    // Nix's `pathInfoIsUntrusted`: content-addressed, or one valid signature by a
    // trusted key.
    let signed = |keys: &firn_cache::PublicKeys| {
        let info = info.to_store();
        firn_cache::keys::info_fingerprint(&sd, &info)
            .is_some_and(|fp| keys.count_valid(&fp, &info.sigs) > 0)
    };
    if keys.is_some_and(|k| !content_addressed(&sd, info) && !signed(k)) {
        return Err(client(format!(
            "cannot add path '{}' because it lacks a signature by a trusted key",
            hl(&sd.display(&info.path))
        )));
    }
    let res = store.add_nar(&info.to_store(), &mut nar);
    match res {
        Ok(_) => {
            // Valid already: the NAR was not read.
            nar.skip().map_err(|e| OpError::Fatal(e.to_string()))?;
            if let Some(a) = policy.restricted() {
                a.add(&info.path).map_err(|e| {
                    client(format!(
                        "could not add path '{}' to sandbox: {e}",
                        hl(&sd.display(&info.path))
                    ))
                })?;
            }
            Ok(())
        }
        Err(e) => Err(OpError::Fatal(e.to_string())),
    }
}

/// AddToStore (1.25+): the dump as its method says, content-addressed.
fn add_to_store<R: Read>(
    store: &mut Store,
    name: &str,
    method: ContentAddressMethod,
    references: BTreeSet<StorePath>,
    fr: &mut FramedReader<'_, R>,
    n: u64,
) -> Result<firn_store::ValidPathInfo, OpError> {
    let (method, algo) = match method {
        ContentAddressMethod::Text => {
            let text = fr.read_to_vec(MAX_TEXT).map_err(payload_err)?;
            return Ok(store.add_text(name, &text, references, BTreeMap::new())?);
        }
        ContentAddressMethod::Fixed { method, algo } => (method, algo),
    };
    if !references.is_empty() {
        return Err(client(
            "firn does not add content-addressed paths with references other than text",
        ));
    }
    // The name must make a store path; checked before it names a file.
    store
        .store_dir()
        .make_fixed_output_path(
            &FixedOutputHash {
                method,
                hash: firn_derivation::Hash::sha256(b""),
            },
            name,
        )
        .map_err(|e| client(e.to_string()))?;
    if method == FileIngestionMethod::Recursive {
        // Restored straight into the store while hashed (no copy outside it first).
        return match store.add_nar_recursive(name, algo, &mut NarBounded::new(&mut *fr)) {
            Ok(info) => Ok(info),
            // A NAR the client sent wrong ends the connection, as before.
            Err(firn_store::StoreError::Nar(e)) => Err(OpError::Fatal(e.to_string())),
            Err(e) => Err(e.into()),
        };
    }
    let dir = store
        .state_dir()
        .join("daemon-tmp")
        .join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| client(format!("{}: {e}", dir.display())))?;
    let src = dir.join(name);
    let res = (|| {
        match method {
            FileIngestionMethod::Recursive => {
                firn_store::nar::restore_path(&mut NarBounded::new(&mut *fr), &src)
                    .map_err(|e| OpError::Fatal(e.to_string()))?;
            }
            FileIngestionMethod::Flat => {
                let mut f = std::fs::File::create(&src)
                    .map_err(|e| client(format!("{}: {e}", src.display())))?;
                io::copy(fr, &mut f).map_err(|e| OpError::Fatal(e.to_string()))?;
            }
        }
        Ok(store.add_to_store(&src, method, algo)?)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    res
}

/// The store path a `DerivedPath` names (Nix's `pathPartOfReq`).
fn path_part(p: &DerivedPath) -> &StorePath {
    match p {
        DerivedPath::Opaque(p) => p,
        DerivedPath::Built { drv_path, .. } => drv_path,
    }
}

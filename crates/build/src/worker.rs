//! The `Worker` and its `DerivationGoal`s: Nix's realisation loop.
//!
//! One goal per `.drv` (shared by everything that waits on it). A goal moves through
//! [`GoalState`]: `Init` (read the `.drv`; done if every wanted output is valid; else
//! create goals for the input derivations) → `WaitingForInputs` → `TryToBuild` (a
//! build slot, the output locks without waiting — Nix-compatible `<out>.lock` — and a
//! second validity check, since another process may have built it meanwhile) →
//! `Building` (the builder runs; its log pipe is polled together with every other
//! running build's, with the `timeout`, `max-silent-time` and log-size limits) →
//! `Done`. Without `keep-going`, the first failure stops the rest: running builders
//! are killed.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use firn_derivation::{name_from_drv_base_name, Derivation, DerivationOutput, StorePath};
use firn_store::lock::PathLocks;
use firn_store::{Store, StoreError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::executor::{
    create_build_dir, start_builder, AcquiredUser, BuildUser, RunningBuild, Spawn,
};
use crate::outputs::{register_outputs, BuiltOutputs, OutputError};

/// Set by SIGINT/SIGTERM (see [`install_interrupt_handlers`]); the worker stops its
/// builds, cleans up and returns.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The signal that interrupted us (0: none yet).
static INTERRUPT_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_interrupt(sig: nix::libc::c_int) {
    INTERRUPT_SIGNAL.store(sig, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The name of the signal that interrupted the run (`SIGINT`, `SIGTERM`, `SIGHUP`).
pub fn interrupt_signal() -> Option<&'static str> {
    match INTERRUPT_SIGNAL.load(Ordering::SeqCst) {
        nix::libc::SIGINT => Some("SIGINT"),
        nix::libc::SIGTERM => Some("SIGTERM"),
        nix::libc::SIGHUP => Some("SIGHUP"),
        _ => None,
    }
}

/// Make SIGINT, SIGTERM and SIGHUP stop the worker cleanly instead of killing firn
/// mid-way (builders die with firn anyway: they have PR_SET_PDEATHSIG).
pub fn install_interrupt_handlers() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Whether an interrupt arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Settings that shape a realisation (Nix's names in comments).
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// `max-jobs`: builds at once.
    pub max_jobs: usize,
    /// `cores`: `NIX_BUILD_CORES`.
    pub cores: u32,
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `max-silent-time`.
    pub max_silent_time: Option<Duration>,
    /// `max-build-log-size`.
    pub max_log_size: Option<u64>,
    /// `keep-going`.
    pub keep_going: bool,
    /// `keep-failed`.
    pub keep_failed: bool,
    /// Echo builder output to stderr (as `nix-store -r` does).
    pub print_build_logs: bool,
    /// `--check`: rebuild the top-level derivations and compare with what is registered.
    pub check: bool,
    /// `sandbox`: build in namespaces and a chroot.
    pub sandbox: bool,
    /// `sandbox-paths`: (target, source, optional).
    pub sandbox_paths: Vec<(PathBuf, PathBuf, bool)>,
    /// `build-users-group`: the group whose members builds run as (when root); empty
    /// means builds run as the caller.
    pub build_users_group: String,
}

impl Default for BuildSettings {
    fn default() -> Self {
        Self {
            max_jobs: 1,
            cores: 0,
            timeout: None,
            max_silent_time: None,
            max_log_size: None,
            keep_going: false,
            keep_failed: false,
            print_build_logs: true,
            check: false,
            sandbox: true,
            sandbox_paths: Vec::new(),
            build_users_group: "nixbld".to_owned(),
        }
    }
}

/// Which outputs of a derivation are wanted (`DRV^out,dev` or all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    All,
    Some(BTreeSet<String>),
}

impl Wanted {
    fn merge(&mut self, other: &Wanted) {
        match (&mut *self, other) {
            (Wanted::All, _) => {}
            (_, Wanted::All) => *self = Wanted::All,
            (Wanted::Some(a), Wanted::Some(b)) => a.extend(b.iter().cloned()),
        }
    }

    fn contains(&self, name: &str) -> bool {
        match self {
            Wanted::All => true,
            Wanted::Some(s) => s.contains(name),
        }
    }
}

/// How a goal ended (Nix's `BuildResult::Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Built,
    AlreadyValid,
    PermanentFailure,
    TimedOut,
    OutputRejected,
    HashMismatch,
    DependencyFailed,
    MiscFailure,
    LogLimitExceeded,
    /// `--check` found different output.
    NotDeterministic,
}

impl BuildStatus {
    pub fn success(self) -> bool {
        matches!(self, Self::Built | Self::AlreadyValid)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Built => "Built",
            Self::AlreadyValid => "AlreadyValid",
            Self::PermanentFailure => "PermanentFailure",
            Self::TimedOut => "TimedOut",
            Self::OutputRejected => "OutputRejected",
            Self::HashMismatch => "HashMismatch",
            Self::DependencyFailed => "DependencyFailed",
            Self::MiscFailure => "MiscFailure",
            Self::LogLimitExceeded => "LogLimitExceeded",
            Self::NotDeterministic => "NotDeterministic",
        }
    }
}

/// The result of one goal.
#[derive(Debug, Clone)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error: Option<String>,
    /// All outputs of the derivation, by name.
    pub outputs: BTreeMap<String, StorePath>,
    pub start_time: u64,
    pub stop_time: u64,
    pub log: Option<PathBuf>,
}

/// A goal's state.
#[derive(Debug)]
pub enum GoalState {
    Init,
    WaitingForInputs,
    TryToBuild {
        said_waiting_lock: bool,
        said_waiting_uid: bool,
    },
    Building(Box<Build>),
    Done(BuildResult),
}

/// A build in progress.
#[derive(Debug)]
pub struct Build {
    running: RunningBuild,
    locks: PathLocks,
    input_closure: BTreeSet<StorePath>,
    start_time: u64,
    /// The sandbox's root on the host, if sandboxed.
    chroot: Option<PathBuf>,
    /// Outputs that were valid when the build started: never deleted or replaced, the
    /// builder's copies of them are discarded (Nix's `initialOutputs … isValid`).
    valid: BTreeSet<String>,
    /// Without the sandbox, valid outputs are built at a fallback path whose hash part
    /// is rewritten to the real one in the other outputs afterwards (Nix's hash
    /// rewriting): output name → fallback path.
    redirected: BTreeMap<String, StorePath>,
}

/// One derivation to realise.
#[derive(Debug)]
pub struct DerivationGoal {
    pub drv_path: StorePath,
    drv: Option<Derivation<'static>>,
    outputs: BTreeMap<String, StorePath>,
    wanted: Wanted,
    inputs: Vec<(StorePath, Wanted)>,
    /// Rebuild and compare (`--check`), for top-level goals.
    check: bool,
    pub state: GoalState,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Nix's exit status for a set of results: 0 if all succeeded, else 0x60 | bits
/// (0x04 build failure, 0x01 timeout, 0x02 hash mismatch — the last two come with 0x04,
/// as observed: 101 and 102), or 1 if no bit applies.
pub fn exit_status(results: &[&BuildResult]) -> u8 {
    let mut mask = 0u8;
    let mut failed = false;
    for r in results {
        match r.status {
            BuildStatus::Built | BuildStatus::AlreadyValid => {}
            BuildStatus::PermanentFailure => mask |= 0x04,
            // Likewise a timeout: 101 = 0x60|0x04|0x01.
            BuildStatus::TimedOut => mask |= 0x04 | 0x01,
            BuildStatus::NotDeterministic => mask |= 0x08,
            // Nix 2.8 counts a mismatch as a build failure too: 102 = 0x60|0x04|0x02.
            BuildStatus::HashMismatch => mask |= 0x04 | 0x02,
            _ => {}
        }
        failed |= !r.status.success();
    }
    match (failed, mask) {
        (false, _) => 0,
        (true, 0) => 1,
        (true, m) => 0x60 | m,
    }
}

/// Drives goals to completion.
#[derive(Debug)]
pub struct Worker<'s> {
    store: &'s mut Store,
    settings: BuildSettings,
    goals: BTreeMap<StorePath, DerivationGoal>,
    running: usize,
    failed: bool,
    progress: crate::progress::Progress,
    /// The builds that were running when an interrupt stopped the run.
    interrupted_builds: Vec<StorePath>,
}

impl<'s> Worker<'s> {
    /// The derivations whose builds an interrupt stopped.
    pub fn interrupted_builds(&self) -> &[StorePath] {
        &self.interrupted_builds
    }

    pub fn new(store: &'s mut Store, settings: BuildSettings) -> Self {
        Self {
            store,
            settings,
            goals: BTreeMap::new(),
            running: 0,
            failed: false,
            progress: crate::progress::Progress::new(),
            interrupted_builds: Vec::new(),
        }
    }

    fn add_goal(&mut self, drv_path: &StorePath, wanted: &Wanted) {
        match self.goals.get_mut(drv_path) {
            Some(g) => {
                // Wanting more of a goal that already decided means deciding again.
                let before = g.wanted.clone();
                g.wanted.merge(wanted);
                if g.wanted != before {
                    if let GoalState::Done(r) = &g.state {
                        if r.status == BuildStatus::AlreadyValid {
                            g.state = GoalState::Init;
                        }
                    }
                }
            }
            None => {
                self.goals.insert(
                    drv_path.clone(),
                    DerivationGoal {
                        drv_path: drv_path.clone(),
                        drv: None,
                        outputs: BTreeMap::new(),
                        wanted: wanted.clone(),
                        inputs: Vec::new(),
                        check: false,
                        state: GoalState::Init,
                    },
                );
            }
        }
    }

    /// The derivations that will be built (for "these N derivations will be built:"):
    /// goals whose wanted outputs are not all valid, found by walking the inputs.
    pub fn plan(
        &mut self,
        tops: &[(StorePath, Wanted)],
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut to_build = BTreeSet::new();
        let mut work: Vec<(StorePath, Wanted)> = tops.to_vec();
        let mut seen = BTreeSet::new();
        while let Some((p, wanted)) = work.pop() {
            if !seen.insert((p.clone(), format!("{wanted:?}"))) {
                continue;
            }
            let Ok(drv) = self.store.read_derivation(&p) else {
                continue;
            };
            let outputs = drv.output_paths(self.store.store_dir()).unwrap_or_default();
            let mut missing = false;
            for (name, out) in &outputs {
                if wanted.contains(&String::from_utf8_lossy(name))
                    && !self.store.db().is_valid_path(out)?
                {
                    missing = true;
                }
            }
            if missing {
                to_build.insert(p.clone());
                for (input, outs) in &drv.input_drvs {
                    let w = outs
                        .iter()
                        .map(|o| String::from_utf8_lossy(o).into_owned())
                        .collect();
                    work.push((input.clone(), Wanted::Some(w)));
                }
            }
        }
        Ok(to_build)
    }

    /// Realise `tops`; returns the result of each top-level goal, in order.
    pub fn run(&mut self, tops: &[(StorePath, Wanted)]) -> Vec<(StorePath, BuildResult)> {
        for (p, w) in tops {
            self.add_goal(p, w);
            if self.settings.check {
                if let Some(g) = self.goals.get_mut(p) {
                    g.check = true;
                }
            }
        }
        loop {
            if interrupted() {
                self.stop_for_interrupt();
                break;
            }
            let mut progressed = false;
            let keys: Vec<StorePath> = self.goal_order();
            for key in keys {
                if self.failed && !self.settings.keep_going {
                    break;
                }
                progressed |= self.step(&key);
            }
            if self.failed && !self.settings.keep_going {
                self.cancel_running();
            }
            let tops_done = tops
                .iter()
                .all(|(p, _)| matches!(self.goals[p].state, GoalState::Done(_)));
            if tops_done {
                break;
            }
            if self.failed && !self.settings.keep_going && self.running == 0 {
                // Everything left waits on a failure: mark it so.
                self.fail_remaining();
                continue;
            }
            self.show_status();
            if self.running > 0 {
                self.wait_for_input();
            } else if !progressed {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        crate::sandbox_exec::drop_spare_roots();
        self.progress.finish();
        tops.iter()
            .map(|(p, _)| match &self.goals[p].state {
                GoalState::Done(r) => (p.clone(), r.clone()),
                _ => (
                    p.clone(),
                    failure(BuildStatus::MiscFailure, "not realised".into()),
                ),
            })
            .collect()
    }

    /// Goals in Nix's order: by derivation name, then path.
    fn goal_order(&self) -> Vec<StorePath> {
        let mut keys: Vec<&StorePath> = self.goals.keys().collect();
        keys.sort_by(|a, b| (a.name(), a.base_name()).cmp(&(b.name(), b.base_name())));
        keys.into_iter().cloned().collect()
    }

    /// Kill running builds, remove their build directories and partial outputs, and
    /// mark every unfinished goal as interrupted.
    fn stop_for_interrupt(&mut self) {
        let keys: Vec<StorePath> = self.goals.keys().cloned().collect();
        for key in keys {
            let Some(g) = self.goals.get_mut(&key) else {
                continue;
            };
            if let GoalState::Building(b) = &mut g.state {
                self.interrupted_builds.push(key.clone());
                b.running.kill();
                let _ = b.running.finish(false);
                if let Some(chroot) = &b.chroot {
                    crate::sandbox_exec::recycle_root(chroot);
                }
                for (name, p) in &g.outputs {
                    if b.valid.contains(name) {
                        continue;
                    }
                    if let Ok(false) = self.store.db().is_valid_path(p) {
                        let _ = firn_store::canonical::delete_path(&self.store.real_path(p));
                    }
                }
                for p in b.redirected.values() {
                    let _ = firn_store::canonical::delete_path(&self.store.real_path(p));
                }
                self.running -= 1;
            }
            if !matches!(g.state, GoalState::Done(_)) {
                g.state = GoalState::Done(failure(BuildStatus::MiscFailure, "interrupted".into()));
            }
        }
    }

    fn fail_remaining(&mut self) {
        for g in self.goals.values_mut() {
            if !matches!(g.state, GoalState::Done(_)) {
                g.state = GoalState::Done(failure(
                    BuildStatus::DependencyFailed,
                    "cancelled because another build failed".into(),
                ));
            }
        }
    }

    fn cancel_running(&mut self) {
        for g in self.goals.values_mut() {
            if let GoalState::Building(b) = &mut g.state {
                b.running.kill();
                let _ = b.running.finish(false);
                if let Some(chroot) = &b.chroot {
                    crate::sandbox_exec::recycle_root(chroot);
                }
                g.state = GoalState::Done(failure(BuildStatus::MiscFailure, "cancelled".into()));
                self.running -= 1;
            }
        }
    }

    fn done(&mut self, key: &StorePath, result: BuildResult) {
        if !result.status.success() {
            self.failed = true;
            if let Some(e) = &result.error {
                if result.status != BuildStatus::DependencyFailed || self.settings.keep_going {
                    self.progress.line(&format!("error: {e}"));
                }
            }
        }
        if let Some(g) = self.goals.get_mut(key) {
            g.state = GoalState::Done(result);
        }
    }

    /// Advance one goal as far as it can go without waiting. Returns whether it moved.
    fn step(&mut self, key: &StorePath) -> bool {
        let state = match self.goals.get(key) {
            Some(g) => match &g.state {
                GoalState::Init => 0,
                GoalState::WaitingForInputs => 1,
                GoalState::TryToBuild { .. } => 2,
                _ => return false,
            },
            None => return false,
        };
        match state {
            0 => self.init(key),
            1 => self.inputs_realised(key),
            _ => self.try_to_build(key),
        }
    }

    fn init(&mut self, key: &StorePath) -> bool {
        let sd = self.store.store_dir().clone();
        // Everything this goal reads or makes is a temporary GC root from here on (the
        // derivation before it is read, its outputs before their validity is checked),
        // so a concurrent `firn gc` cannot delete it under us (Nix's addTempRoot).
        if let Err(e) = self.store.add_temp_root(key) {
            self.done(key, failure(BuildStatus::MiscFailure, e.to_string()));
            return true;
        }
        let drv = match self.store.read_derivation(key) {
            Ok(d) => d,
            Err(e) => {
                let msg = if self.store.db().is_valid_path(key).unwrap_or(false) {
                    e.to_string()
                } else {
                    format!("cannot build missing derivation '{}'", sd.display(key))
                };
                self.done(key, failure(BuildStatus::MiscFailure, msg));
                return true;
            }
        };
        let outputs: BTreeMap<String, StorePath> = match drv.output_paths(&sd) {
            Ok(o) => o
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
                .collect(),
            Err(e) => {
                self.done(
                    key,
                    failure(
                        BuildStatus::MiscFailure,
                        format!("derivation '{}': {e}", sd.display(key)),
                    ),
                );
                return true;
            }
        };
        let rooted = outputs
            .values()
            .chain(drv.input_srcs.iter())
            .try_for_each(|p| self.store.add_temp_root(p));
        if let Err(e) = rooted {
            self.done(key, failure(BuildStatus::MiscFailure, e.to_string()));
            return true;
        }
        let g = &self.goals[key];
        if let Wanted::Some(w) = &g.wanted {
            if let Some(bad) = w.iter().find(|o| !drv.outputs.contains_key(o.as_bytes())) {
                let msg = format!(
                    "derivation '{}' does not have wanted outputs '{bad}'",
                    sd.display(key)
                );
                self.done(key, failure(BuildStatus::MiscFailure, msg));
                return true;
            }
        }
        let all_valid = outputs
            .iter()
            .filter(|(n, _)| g.wanted.contains(n))
            .all(|(_, p)| self.store.db().is_valid_path(p).unwrap_or(false));
        let inputs: Vec<(StorePath, Wanted)> = drv
            .input_drvs
            .iter()
            .map(|(p, outs)| {
                (
                    p.clone(),
                    Wanted::Some(
                        outs.iter()
                            .map(|o| String::from_utf8_lossy(o).into_owned())
                            .collect(),
                    ),
                )
            })
            .collect();
        let check = g.check;
        if check {
            let every_valid = outputs
                .values()
                .all(|p| self.store.db().is_valid_path(p).unwrap_or(false));
            let msg = if !every_valid {
                Some(format!(
                    "some outputs of '{}' are not valid, so checking is not possible",
                    sd.display(key)
                ))
            } else if !self.settings.sandbox {
                Some(
                    "--check needs the sandbox: the rebuilt outputs go to its private store"
                        .to_owned(),
                )
            } else {
                None
            };
            if let Some(msg) = msg {
                self.done(key, failure(BuildStatus::MiscFailure, msg));
                return true;
            }
        }
        let g = self.goals.get_mut(key).expect("goal exists");
        g.outputs = outputs.clone();
        g.drv = Some(drv);
        if all_valid && !check {
            self.done(key, already_valid(outputs));
            return true;
        }
        g.inputs = inputs.clone();
        g.state = GoalState::WaitingForInputs;
        for (p, w) in &inputs {
            self.add_goal(p, w);
        }
        true
    }

    fn inputs_realised(&mut self, key: &StorePath) -> bool {
        let sd = self.store.store_dir().clone();
        let inputs = self.goals[key].inputs.clone();
        let mut failed = 0;
        for (p, _) in &inputs {
            match &self.goals[p].state {
                GoalState::Done(r) if !r.status.success() => failed += 1,
                GoalState::Done(_) => {}
                _ => return false,
            }
        }
        if failed > 0 {
            let msg = format!(
                "{failed} dependenc{} of derivation '{}' failed to build",
                if failed == 1 { "y" } else { "ies" },
                sd.display(key)
            );
            self.done(key, failure(BuildStatus::DependencyFailed, msg));
            return true;
        }
        self.goals.get_mut(key).expect("goal exists").state = GoalState::TryToBuild {
            said_waiting_lock: false,
            said_waiting_uid: false,
        };
        true
    }

    /// The closure of the wanted input outputs and the input sources.
    fn input_closure(&self, key: &StorePath) -> Result<BTreeSet<StorePath>, StoreError> {
        let g = &self.goals[key];
        let mut roots: Vec<StorePath> = Vec::new();
        for (p, wanted) in &g.inputs {
            for (name, out) in &self.goals[p].outputs {
                if wanted.contains(name) {
                    roots.push(out.clone());
                }
            }
        }
        if let Some(drv) = &g.drv {
            roots.extend(drv.input_srcs.iter().cloned());
        }
        Ok(self.store.db().query_closure(&roots, false)?)
    }

    /// `sandbox-paths` whose source is in the store bring their closure along, as in
    /// Nix; they are mounted from the store's real directory (so a store rooted
    /// elsewhere than `/` works). Returns the remaining entries and the store paths.
    #[allow(clippy::type_complexity)]
    fn sandbox_paths_in_store(
        &self,
    ) -> Result<(Vec<(PathBuf, PathBuf, bool)>, BTreeSet<StorePath>), String> {
        let sd = self.store.store_dir();
        let mut rest = Vec::new();
        let mut roots = Vec::new();
        for (target, source, optional) in &self.settings.sandbox_paths {
            // The store path a source lies in (`/nix/store/<hash>-<name>[/...]`).
            let in_store = source
                .strip_prefix(sd.as_str())
                .ok()
                .and_then(|rel| rel.components().next())
                .and_then(|c| StorePath::from_base_name(c.as_os_str().as_bytes()).ok());
            match in_store {
                // The whole store path, at its own place: the closure covers it.
                Some(p) if target == source && source.parent() == Some(Path::new(sd.as_str())) => {
                    roots.push(p)
                }
                Some(p) => {
                    roots.push(p);
                    let rel = source.strip_prefix(sd.as_str()).unwrap_or(source);
                    let real = self.store.root().join("nix/store").join(rel);
                    rest.push((target.clone(), real, *optional));
                }
                None => rest.push((target.clone(), source.clone(), *optional)),
            }
        }
        let mut valid = Vec::new();
        for p in roots {
            match self.store.db().is_valid_path(&p) {
                Ok(true) => valid.push(p),
                Ok(false) => {
                    return Err(format!(
                        "sandbox-paths: '{}' is not a valid store path",
                        sd.display(&p)
                    ))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let closure = self
            .store
            .db()
            .query_closure(&valid, false)
            .map_err(|e| e.to_string())?;
        Ok((rest, closure))
    }

    fn try_to_build(&mut self, key: &StorePath) -> bool {
        if self.running >= self.settings.max_jobs.max(1) {
            return false;
        }
        let sd = self.store.store_dir().clone();
        let outputs = self.goals[key].outputs.clone();
        let reals: Vec<PathBuf> = outputs.values().map(|p| self.store.real_path(p)).collect();
        let locks = match PathLocks::lock(reals.clone(), false, |_| {}) {
            Ok(Some(l)) => l,
            Ok(None) => {
                if let GoalState::TryToBuild {
                    said_waiting_lock, ..
                } = &mut self.goals.get_mut(key).expect("goal").state
                {
                    if !*said_waiting_lock {
                        let shown: Vec<String> = outputs.values().map(|p| sd.display(p)).collect();
                        let msg = format!("waiting for lock on '{}'...", shown.join("', '"));
                        self.progress.line(&msg);
                        *said_waiting_lock = true;
                    }
                }
                return false;
            }
            Err(e) => {
                self.done(key, failure(BuildStatus::MiscFailure, e.to_string()));
                return true;
            }
        };
        // Someone else may have built it while we waited for the lock. Which outputs
        // are valid decides what the build may touch: a database error is not "not
        // valid" (that could delete a valid output), it fails the goal.
        let mut valid = BTreeSet::new();
        for (name, p) in &outputs {
            match self.store.db().is_valid_path(p) {
                Ok(true) => {
                    valid.insert(name.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    self.done(key, failure(BuildStatus::MiscFailure, e.to_string()));
                    return true;
                }
            }
        }
        if valid.len() == outputs.len() && !self.goals[key].check {
            let mut locks = locks;
            locks.set_deletion(true);
            self.done(key, already_valid(outputs));
            return true;
        }
        // A build user, or wait for one: never build as the caller instead.
        let user = match BuildUser::acquire(&self.settings.build_users_group) {
            Ok(AcquiredUser::Got(u)) => Some(u),
            Ok(AcquiredUser::NotConfigured) => None,
            Ok(AcquiredUser::Busy) => {
                drop(locks);
                if let GoalState::TryToBuild {
                    said_waiting_uid, ..
                } = &mut self.goals.get_mut(key).expect("goal").state
                {
                    if !*said_waiting_uid {
                        let msg = format!("waiting for UID to build '{}'", sd.display(key));
                        self.progress.line(&msg);
                        *said_waiting_uid = true;
                    }
                }
                return false;
            }
            Err(e) => {
                // Nothing was started: the lock files go too.
                let mut locks = locks;
                locks.set_deletion(true);
                self.done(key, failure(BuildStatus::MiscFailure, e.to_string()));
                return true;
            }
        };
        match self.start(key, locks, user, valid) {
            Ok(build) => {
                self.running += 1;
                self.goals.get_mut(key).expect("goal").state = GoalState::Building(Box::new(build));
            }
            Err(msg) => self.done(key, failure(BuildStatus::MiscFailure, msg)),
        }
        true
    }

    fn start(
        &mut self,
        key: &StorePath,
        locks: PathLocks,
        user: Option<BuildUser>,
        valid: BTreeSet<String>,
    ) -> Result<Build, String> {
        let sd = self.store.store_dir().clone();
        let input_closure = self.input_closure(key).map_err(|e| e.to_string())?;
        let g = &self.goals[key];
        let drv = g.drv.as_ref().ok_or("derivation not loaded")?;
        // Leftovers of an interrupted build at the invalid output paths are removed; a
        // valid output is never touched (a check builds in the sandbox's store).
        for (_, p) in g
            .outputs
            .iter()
            .filter(|(n, _)| !g.check && !valid.contains(*n))
        {
            let real = self.store.real_path(p);
            firn_store::canonical::delete_path(&real)
                .map_err(|e| format!("{}: {e}", real.display()))?;
        }
        // Without the sandbox the builder writes into the real store: valid outputs go
        // to a fallback path instead (removed after the build).
        let mut redirected = BTreeMap::new();
        if !self.settings.sandbox && !g.check {
            for name in &valid {
                let p = &g.outputs[name];
                let fallback = fallback_path(&sd, key, p)?;
                let real = self.store.real_path(&fallback);
                firn_store::canonical::delete_path(&real)
                    .map_err(|e| format!("{}: {e}", real.display()))?;
                redirected.insert(name.clone(), fallback);
            }
        }
        let mut builder_outputs = g.outputs.clone();
        builder_outputs.extend(redirected.clone());
        let build_dir =
            create_build_dir(key.base_name(), user.as_ref()).map_err(|e| e.to_string())?;
        let sandbox = match self.settings.sandbox {
            true => {
                let (sandbox_paths, extra) = self.sandbox_paths_in_store()?;
                let inputs: Vec<StorePath> = input_closure.union(&extra).cloned().collect();
                Some(crate::sandbox::plan_sandbox(
                    &crate::sandbox::SandboxInput {
                        real_store: &self.store.root().join("nix/store"),
                        store_dir: sd.as_str(),
                        drv_path: key,
                        inputs: &inputs,
                        build_dir: &build_dir,
                        sandbox_paths: &sandbox_paths,
                        fixed_output: is_fixed_output(drv),
                        kvm: Path::new("/dev/kvm").exists(),
                    },
                ))
            }
            false => None,
        };
        let seen_build_dir = match &sandbox {
            Some(p) => p.build_dir.clone(),
            None => build_dir.clone(),
        };
        let spawn = plan_spawn(
            drv,
            &sd,
            &builder_outputs,
            &seen_build_dir,
            self.settings.cores,
            sandbox.is_some(),
        )
        .map_err(|e| format!("derivation '{}': {e}", sd.display(key)))?;
        let log_path = self.log_path(key);
        self.progress
            .line(&format!("building '{}'...", sd.display(key)));
        let running = start_builder(
            self.store.root(),
            sd.as_str(),
            &spawn,
            build_dir,
            user,
            log_path,
            sandbox.as_ref(),
        )
        .map_err(|e| match &sandbox {
            Some(_) => format!(
                "cannot start the sandboxed builder for '{}': {e}",
                sd.display(key)
            ),
            None => e.to_string(),
        })?;
        Ok(Build {
            running,
            locks,
            input_closure,
            start_time: unix_now(),
            chroot: sandbox.map(|p| p.root),
            valid,
            redirected,
        })
    }

    /// `ROOT/nix/var/log/nix/drvs/<2 chars>/<rest>.bz2`.
    pub fn log_path(&self, drv: &StorePath) -> PathBuf {
        let base = drv.base_name();
        self.store
            .root()
            .join("nix/var/log/nix/drvs")
            .join(&base[..2])
            .join(format!("{}.bz2", &base[2..]))
    }

    /// Poll every running build's log pipe; handle output, exits and time limits.
    fn wait_for_input(&mut self) {
        let keys: Vec<StorePath> = self
            .goals
            .iter()
            .filter(|(_, g)| matches!(g.state, GoalState::Building(_)))
            .map(|(k, _)| k.clone())
            .collect();
        let fds: Vec<i32> = keys
            .iter()
            .map(|k| match &self.goals[k].state {
                GoalState::Building(b) => b.running.log_fd(),
                _ => -1,
            })
            .collect();
        let mut pollfds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|&fd| {
                // SAFETY: the fds belong to running builds, open until they finish.
                PollFd::new(
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                    PollFlags::POLLIN,
                )
            })
            .collect();
        let _ = poll(&mut pollfds, PollTimeout::from(200u16));
        let ready: Vec<bool> = pollfds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(pollfds);
        for (key, ready) in keys.iter().zip(ready) {
            self.service(key, ready);
        }
    }

    fn service(&mut self, key: &StorePath, readable: bool) {
        let sd = self.store.store_dir().clone();
        let settings = self.settings.clone();
        let data = match self.goals.get_mut(key).map(|g| &mut g.state) {
            Some(GoalState::Building(b)) if readable && !b.running.eof => {
                b.running.read_log().unwrap_or_default()
            }
            Some(GoalState::Building(_)) => Vec::new(),
            _ => return,
        };
        if settings.print_build_logs && !data.is_empty() {
            self.progress.log(&data);
        }
        let Some(GoalState::Building(b)) = self.goals.get_mut(key).map(|g| &mut g.state) else {
            return;
        };
        let mut kill_reason = None;
        if let Some(max) = settings.max_log_size {
            if b.running.log_size > max {
                kill_reason = Some((
                    BuildStatus::LogLimitExceeded,
                    format!("killed after writing more than {max} bytes of log output"),
                ));
            }
        }
        if let Some(t) = settings.timeout {
            if b.running.started.elapsed() > t {
                kill_reason = Some((
                    BuildStatus::TimedOut,
                    format!(
                        "building '{}' timed out after {} seconds",
                        sd.display(key),
                        t.as_secs()
                    ),
                ));
            }
        }
        if let Some(t) = settings.max_silent_time {
            if b.running.last_output.elapsed() > t {
                kill_reason = Some((
                    BuildStatus::TimedOut,
                    format!(
                        "building '{}' timed out after {} seconds of silence",
                        sd.display(key),
                        t.as_secs()
                    ),
                ));
            }
        }
        if let Some((status, msg)) = kill_reason {
            b.running.kill();
            self.finish_build(key, Some((status, msg)));
            return;
        }
        // The builder's exit comes from waitpid, not from EOF on its output.
        if b.running.status.is_none() {
            if let Ok(Some(status)) = b.running.child.try_wait() {
                b.running.status = Some(status);
            }
        }
        if b.running.status.is_some() {
            let mut drained = Vec::new();
            // Collect what is still in the pipe, then finish.
            while !b.running.eof {
                let mut fds = [PollFd::new(
                    // SAFETY: as above.
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(b.running.log_fd()) },
                    PollFlags::POLLIN,
                )];
                if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
                    break;
                }
                match b.running.read_log() {
                    Ok(data) if data.is_empty() => break,
                    Ok(data) => drained.extend_from_slice(&data),
                    Err(_) => break,
                }
            }
            if settings.print_build_logs && !drained.is_empty() {
                self.progress.log(&drained);
            }
            self.finish_build(key, None);
        }
    }

    fn finish_build(&mut self, key: &StorePath, killed: Option<(BuildStatus, String)>) {
        let sd = self.store.store_dir().clone();
        let Some(g) = self.goals.get_mut(key) else {
            return;
        };
        let GoalState::Building(build) = std::mem::replace(&mut g.state, GoalState::Init) else {
            return;
        };
        let mut build = *build;
        self.running -= 1;
        let outputs = g.outputs.clone();
        let drv = g.drv.take();
        let log = Some(build.running.build_dir.clone());
        let status = build.running.status;
        if g.check {
            let result = match (killed, status) {
                (Some(k), _) => Err(k),
                (None, Some(s)) if !s.success() => Err((
                    BuildStatus::PermanentFailure,
                    format!(
                        "builder for '{}' failed with exit code {}",
                        sd.display(key),
                        s.code().unwrap_or(-1)
                    ),
                )),
                _ => self.compare_check(key, &outputs, build.chroot.as_deref()),
            };
            if let Some(chroot) = &build.chroot {
                crate::sandbox_exec::recycle_root(chroot);
            }
            let _ = build.running.finish(false);
            let (status, error) = match result {
                Ok(()) => (BuildStatus::Built, None),
                Err((st, msg)) => (st, Some(msg)),
            };
            let r = BuildResult {
                status,
                error,
                outputs,
                start_time: build.start_time,
                stop_time: unix_now(),
                log: Some(self.log_path(key)),
            };
            drop(build.locks);
            if let Some(g) = self.goals.get_mut(key) {
                g.drv = drv;
            }
            self.done(key, r);
            return;
        }
        // Sandboxed outputs were built inside the root: move them into the store (one
        // file system: a rename), then the root goes.
        let mut missing_at = BTreeMap::new();
        if let Some(chroot) = &build.chroot {
            // Only the outputs that were not valid leave the root; the builder's copies
            // of valid ones go with it.
            for (name, p) in outputs.iter().filter(|(n, _)| !build.valid.contains(*n)) {
                let inside = chroot
                    .join(sd.as_str().trim_start_matches('/'))
                    .join(p.base_name());
                let real = self.store.real_path(p);
                if std::fs::symlink_metadata(&inside).is_ok() {
                    if let Err(e) = std::fs::rename(&inside, &real) {
                        self.progress.line(&format!(
                            "warning: moving '{}' into the store: {e}",
                            inside.display()
                        ));
                    }
                } else {
                    missing_at.insert(name.clone(), inside);
                }
            }
            crate::sandbox_exec::recycle_root(chroot);
        }
        // The builder's copies of valid outputs (at their fallback paths) are discarded.
        let rewrites: Vec<(String, String)> = build
            .redirected
            .iter()
            .map(|(name, fallback)| {
                let real = self.store.real_path(fallback);
                let _ = firn_store::canonical::delete_path(&real);
                (
                    fallback.hash_part().to_owned(),
                    outputs[name].hash_part().to_owned(),
                )
            })
            .collect();
        let to_register: BTreeMap<String, StorePath> = outputs
            .iter()
            .filter(|(n, _)| !build.valid.contains(*n))
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        let result: Result<(), (BuildStatus, String)> = match (killed, status) {
            (Some(k), _) => Err(k),
            (None, Some(s)) if !s.success() => {
                use std::os::unix::process::ExitStatusExt;
                let how = match (s.code(), s.signal()) {
                    (Some(c), _) => format!("failed with exit code {c}"),
                    (_, Some(sig)) => format!("failed due to signal {sig}"),
                    _ => "failed".to_owned(),
                };
                Err((
                    BuildStatus::PermanentFailure,
                    format!("builder for '{}' {how}", sd.display(key)),
                ))
            }
            _ => {
                let drv_ref = drv.as_ref();
                match drv_ref {
                    None => Err((BuildStatus::MiscFailure, "derivation not loaded".into())),
                    Some(d) => {
                        let rewritten = to_register.values().try_for_each(|p| {
                            crate::outputs::rewrite_hashes(&self.store.real_path(p), &rewrites)
                        });
                        let mut candidates = build.input_closure.clone();
                        candidates.extend(outputs.values().cloned());
                        let built = BuiltOutputs {
                            drv_path: key,
                            drv: d,
                            outputs: to_register.clone(),
                            input_closure: candidates,
                            build_uid: build.running.user.as_ref().map(|u| u.uid),
                            missing_at,
                        };
                        rewritten
                            .map_err(|e| (BuildStatus::MiscFailure, e.to_string()))
                            .and_then(|()| {
                                register_outputs(self.store, &built).map(|_| ()).map_err(
                                    |e: OutputError| {
                                        let st = if e.is_hash_mismatch() {
                                            BuildStatus::HashMismatch
                                        } else {
                                            BuildStatus::OutputRejected
                                        };
                                        (st, e.to_string())
                                    },
                                )
                            })
                    }
                }
            }
        };
        let keep = result.is_err() && self.settings.keep_failed;
        if keep {
            self.progress.line(&format!(
                "note: keeping build directory '{}'",
                build.running.build_dir.display()
            ));
        }
        let _ = build.running.finish(keep);
        let _ = log;
        let log_path = Some(self.log_path(key));
        let g = self.goals.get_mut(key).expect("goal");
        g.drv = drv;
        let r = match result {
            Ok(()) => {
                build.locks.set_deletion(true);
                BuildResult {
                    status: BuildStatus::Built,
                    error: None,
                    outputs,
                    start_time: build.start_time,
                    stop_time: unix_now(),
                    log: log_path,
                }
            }
            Err((status, msg)) => {
                // Nothing of a failed build stays at the output paths it may touch
                // (a fixed output's mismatching content was registered elsewhere).
                for p in to_register.values() {
                    if let Ok(false) = self.store.db().is_valid_path(p) {
                        let _ = firn_store::canonical::delete_path(&self.store.real_path(p));
                    }
                }
                BuildResult {
                    status,
                    error: Some(msg),
                    outputs,
                    start_time: build.start_time,
                    stop_time: unix_now(),
                    log: log_path,
                }
            }
        };
        drop(build.locks);
        self.done(key, r);
    }

    /// `[done/running/total] building a, b: last line` on a terminal.
    fn show_status(&mut self) {
        let (mut done, mut running, mut total) = (0, 0, 0);
        let mut names = Vec::new();
        let mut last = String::new();
        for g in self.goals.values() {
            match &g.state {
                GoalState::Done(r) if r.status == BuildStatus::AlreadyValid => continue,
                GoalState::Done(_) => done += 1,
                GoalState::Building(b) => {
                    running += 1;
                    names.push(name_from_drv_base_name(g.drv_path.base_name()).to_owned());
                    if let Some(l) = b.running.tail.back() {
                        last = l.clone();
                    }
                }
                GoalState::Init => continue,
                _ => {}
            }
            total += 1;
        }
        let text = if running == 0 {
            String::new()
        } else {
            format!(
                "[{done}/{running}/{total}] building {}: {last}",
                names.join(", ")
            )
        };
        self.progress.status(&text);
    }

    /// `--check`: compare the rebuilt outputs (in the sandbox's store) with the
    /// registered ones; with `keep-failed` a differing one is kept as `<out>.check`.
    fn compare_check(
        &mut self,
        key: &StorePath,
        outputs: &BTreeMap<String, StorePath>,
        chroot: Option<&std::path::Path>,
    ) -> Result<(), (BuildStatus, String)> {
        let sd = self.store.store_dir().clone();
        let chroot = chroot.ok_or((
            BuildStatus::MiscFailure,
            "--check needs the sandbox".to_owned(),
        ))?;
        for (name, p) in outputs {
            let inside = chroot
                .join(sd.as_str().trim_start_matches('/'))
                .join(p.base_name());
            if std::fs::symlink_metadata(&inside).is_err() {
                return Err((
                    BuildStatus::OutputRejected,
                    format!(
                        "builder for '{}' failed to produce output path for output '{name}' at '{}'",
                        sd.display(key),
                        inside.display()
                    ),
                ));
            }
            let fail = |e: String| (BuildStatus::MiscFailure, e);
            firn_store::canonical::canonicalise_path_metadata(&inside)
                .map_err(|e| fail(e.to_string()))?;
            let (hash, _) = firn_store::nar::hash_path(&inside).map_err(|e| fail(e.to_string()))?;
            let registered = self
                .store
                .db()
                .query_path_info(p)
                .map_err(|e| fail(e.to_string()))?
                .map(|i| i.nar_hash);
            if registered != Some(hash) {
                let real = self.store.real_path(p);
                if self.settings.keep_failed {
                    let mut check = real.clone().into_os_string();
                    check.push(".check");
                    let check = PathBuf::from(check);
                    let _ = firn_store::canonical::delete_path(&check);
                    if std::fs::rename(&inside, &check).is_ok() {
                        eprintln!(
                            "note: keeping the differing output as '{}'",
                            check.display()
                        );
                    }
                }
                return Err((
                    BuildStatus::NotDeterministic,
                    format!(
                        "derivation '{}' may not be deterministic: output '{}' differs",
                        sd.display(key),
                        sd.display(p)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every goal's result so far (for `--json`).
    pub fn results(&self) -> impl Iterator<Item = (&StorePath, &BuildResult)> {
        self.goals.iter().filter_map(|(k, g)| match &g.state {
            GoalState::Done(r) => Some((k, r)),
            _ => None,
        })
    }
}

fn failure(status: BuildStatus, msg: String) -> BuildResult {
    BuildResult {
        status,
        error: Some(msg),
        outputs: BTreeMap::new(),
        start_time: 0,
        stop_time: 0,
        log: None,
    }
}

/// Nix's `makeFallbackPath` for a valid output that an unsandboxed build must not
/// overwrite: `rewrite:<drv>:<output>` with a zero hash, the output's name.
fn fallback_path(
    sd: &firn_derivation::StoreDir,
    drv: &StorePath,
    output: &StorePath,
) -> Result<StorePath, String> {
    let zero = firn_derivation::Hash::from_slice(firn_derivation::HashAlgo::Sha256, &[0; 32])
        .ok_or("no zero sha256")?;
    sd.make_store_path(
        &format!("rewrite:{}:{}", drv.base_name(), output.base_name()),
        &zero,
        output.name(),
    )
    .map_err(|e| e.to_string())
}

/// Whether `drv` is fixed-output (it then gets the caller's `impureEnvVars`).
pub fn is_fixed_output(drv: &Derivation<'_>) -> bool {
    drv.outputs
        .values()
        .any(|o| matches!(o, DerivationOutput::CAFixed(_)))
}

/// The result of a goal whose outputs were all valid: nothing was built.
fn already_valid(outputs: BTreeMap<String, StorePath>) -> BuildResult {
    BuildResult {
        status: BuildStatus::AlreadyValid,
        error: None,
        outputs,
        start_time: 0,
        stop_time: 0,
        log: None,
    }
}

/// The plan for a build whose builder sees `build_dir` (`/build` in the sandbox).
fn plan_spawn(
    drv: &Derivation<'_>,
    sd: &firn_derivation::StoreDir,
    outputs: &BTreeMap<String, StorePath>,
    build_dir: &std::path::Path,
    cores: u32,
    sandboxed: bool,
) -> Result<Spawn, crate::plan::PlanError> {
    use std::os::unix::ffi::OsStrExt;
    let output_paths: BTreeMap<firn_derivation::ByteStr<'_>, StorePath> = outputs
        .iter()
        .map(|(k, v)| (std::borrow::Cow::Owned(k.as_bytes().to_vec()), v.clone()))
        .collect();
    let caller_env: BTreeMap<Vec<u8>, Vec<u8>> = std::env::vars_os()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let p = crate::plan::plan(&crate::plan::PlanInput {
        drv,
        store_dir: sd,
        output_paths: &output_paths,
        build_dir,
        cores,
        caller_env: &caller_env,
        sandboxed,
    })?;
    Ok(Spawn {
        program: p.program,
        argv: p.argv,
        env: p.env,
        files: p.files,
    })
}

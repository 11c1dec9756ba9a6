//! `DerivationGoal`: realising one `.drv`, as Nix's goal of that name does.
//!
//! A goal moves through [`GoalState`], each state carrying what the goal knows by then:
//!
//! ```text
//! Init ──load──▶ WaitingForInputs(loaded) ──inputs done──▶ TryToBuild(loaded)
//!   │                    │ a dependency failed                │ slot, output locks,
//!   │ all wanted valid   ▼                                    │ build user, started
//!   └──────────────▶ Done(result) ◀── builder exited, ── Building(loaded, build)
//!                        ▲            outputs registered      │ or a machine of
//!                        │                                    ▼ `builders` took it
//!                        └── outputs copied back ── BuildingRemotely(loaded, build)
//!                                                   (a failed machine: TryToBuild)
//! ```
//!
//! The remote transitions are in [`dispatch`].
//!
//! Each transition returns a [`Next`]: what the goal now waits for (its inputs' goals,
//! a build slot, output locks or a build user someone else holds, its running
//! builder) or that it is done. The [`crate::worker::Worker`] keeps the waiters
//! and calls the goal again when what it waits for happened; only the goal decides
//! which outputs to build: the wanted ones that are not valid. A valid output is never
//! deleted or overwritten — in the sandbox the builder's copy stays in the root, and
//! without it the builder writes it at Nix's fallback path, whose hash part is rewritten
//! to the real one in the other outputs afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use firn_derivation::{Derivation, DerivationOutput, OutputName, StorePath};
use firn_store::lock::PathLocks;
use firn_store::{Store, StoreError};

use crate::builder::{AcquiredUser, BuildJob, Builder, ExecError, RunningBuild, SandboxPath};
use crate::error::{BuildError, BuilderExit};
use crate::events::{BuildEvents, Message};
use crate::log::BuildLog;
use crate::outputs::{register_outputs, register_outputs_with_paths, rewrite_hashes, BuiltOutputs};
use crate::plan::{plan, PlanInput};
use crate::recursive::{AllowedPaths, RecursiveNix, RecursiveRequest, RunningRecursive};
use crate::result::{BuildResult, BuildStatus};
use crate::settings::{SandboxMode, Settings};

mod dispatch;
pub use dispatch::RemoteBuilding;

/// Which outputs of a derivation are wanted (`DRV^out,dev`, or all: `DRV` / `DRV^*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    All,
    Some(BTreeSet<OutputName>),
}

impl Wanted {
    /// Want what `other` wants too; returns whether that is more than before.
    pub fn merge(&mut self, other: &Wanted) -> bool {
        let before = self.clone();
        match (&mut *self, other) {
            (Wanted::All, _) => {}
            (_, Wanted::All) => *self = Wanted::All,
            (Wanted::Some(a), Wanted::Some(b)) => a.extend(b.iter().cloned()),
        }
        *self != before
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Wanted::All => true,
            Wanted::Some(s) => s.contains(name),
        }
    }
}

/// Build what is missing, rebuild and compare (`--check`), or rebuild and replace
/// (`--repair`: `verify --repair` of a modified output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    Normal,
    Check,
    Repair,
}

/// A derivation read from the store, with what follows from it.
#[derive(Debug)]
pub struct Loaded {
    pub drv: Derivation<'static>,
    /// Every output's path: as the derivation states it, as a realisation records it
    /// (`ca-derivations`), or — for an output whose path is known only once it is
    /// built — the scratch path it is built at (listed in `unknown`).
    pub outputs: BTreeMap<OutputName, StorePath>,
    /// Outputs whose path is not known yet: floating content-addressed, impure, or
    /// deferred, and not realised.
    pub unknown: BTreeSet<OutputName>,
    /// The hash standing for each output (`staticOutputHashes`), which with its name is
    /// its `DrvOutput`: computed when the store knows realisations or a path is unknown.
    pub hashes: BTreeMap<OutputName, firn_derivation::Hash>,
    /// The input derivations and the outputs wanted of each.
    pub inputs: Vec<(StorePath, Wanted)>,
}

impl Loaded {
    /// The outputs whose paths are known, by name.
    pub fn known_outputs(&self) -> BTreeMap<OutputName, StorePath> {
        self.outputs
            .iter()
            .filter(|(n, _)| !self.unknown.contains(*n))
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect()
    }

    /// The `DrvOutput` of output `name`, if its hash is known.
    pub fn drv_output(&self, name: &OutputName) -> Option<firn_derivation::DrvOutput> {
        self.hashes
            .get(name)
            .map(|h| firn_derivation::DrvOutput::new(*h, name.as_str()))
    }
}

/// Nix's `makeFallbackPath(outputName)`: where an output whose path is not known is
/// built (`rewrite:<drv>:name:<output>` with a zero hash).
pub fn scratch_path(
    sd: &firn_derivation::StoreDir,
    drv_path: &StorePath,
    drv_name: &str,
    output: &str,
) -> Result<StorePath, firn_derivation::StorePathError> {
    use firn_derivation::{Hash, HashAlgo};
    let zero = Hash::from_slice(HashAlgo::Sha256, &[0; 32]).unwrap_or_else(|| Hash::sha256(b""));
    sd.make_store_path(
        &format!("rewrite:{}:name:{output}", drv_path.base_name()),
        &zero,
        &firn_derivation::store_path::output_path_name(drv_name, output),
    )
}

/// `staticOutputHashes` of `drv`, reading its input derivations from the store.
pub fn output_hashes(
    store: &Store,
    drv_path: &StorePath,
    drv: &Derivation<'_>,
) -> Result<BTreeMap<OutputName, firn_derivation::Hash>, BuildError> {
    let sd = store.store_dir();
    let mut cache = firn_derivation::ModuloCache::new();
    let mut read = |p: &StorePath| store.read_derivation(p);
    let mut lookup = |p: &StorePath| cache.get(sd, p, &mut read);
    let hashes = firn_derivation::static_output_hashes(sd, drv, &mut lookup).map_err(|e| {
        BuildError::OutputHashes {
            drv: sd.display(drv_path),
            msg: e.to_string(),
        }
    })?;
    hashes
        .into_iter()
        .map(|(n, h)| {
            firn_derivation::output_name(&n)
                .map(|n| (n, h))
                .map_err(|source| BuildError::Derivation {
                    drv: sd.display(drv_path),
                    source,
                })
        })
        .collect()
}

/// Read `drv_path` and compute its outputs and inputs (shared by the goal and the dry
/// run).
pub fn load(store: &Store, drv_path: &StorePath) -> Result<Loaded, BuildError> {
    let sd = store.store_dir();
    let drv = match store.read_derivation(drv_path) {
        Ok(d) => d,
        Err(e) => {
            return Err(match store.db().is_valid_path(drv_path) {
                Ok(true) => BuildError::Store(e),
                Ok(false) => BuildError::MissingDerivation {
                    drv: sd.display(drv_path),
                },
                Err(db) => BuildError::Store(db.into()),
            })
        }
    };
    load_given(store, drv_path, drv)
}

/// [`load`] for a derivation given rather than read from the store (a `BasicDerivation`
/// sent by BuildDerivation, whose `.drv` the store need not have): `drv_path` names it.
pub fn load_given(
    store: &Store,
    drv_path: &StorePath,
    drv: Derivation<'static>,
) -> Result<Loaded, BuildError> {
    let sd = store.store_dir();
    let derr = |source| BuildError::Derivation {
        drv: sd.display(drv_path),
        source,
    };
    let mut outputs = drv.output_paths_by_name(sd).map_err(derr)?;
    let mut unknown = BTreeSet::new();
    for name in drv.output_names().map_err(derr)? {
        if !outputs.contains_key(&name) {
            let p =
                scratch_path(sd, drv_path, &drv.name, name.as_str()).map_err(|e| derr(e.into()))?;
            outputs.insert(name.clone(), p);
            unknown.insert(name);
        }
    }
    let mut hashes = BTreeMap::new();
    if store.ca_derivations() || !unknown.is_empty() {
        hashes = output_hashes(store, drv_path, &drv)?;
    }
    // What the realisations say (`checkPathValidity`): a realised output's path is
    // known. Impure outputs are never realised.
    let pure = drv.derivation_type().map_err(derr)?.is_pure();
    if store.ca_derivations() && pure {
        for name in unknown.clone() {
            let Some(h) = hashes.get(&name) else { continue };
            let id = firn_derivation::DrvOutput::new(*h, name.as_str());
            if let Some(r) = store
                .db()
                .query_realisation(&id)
                .map_err(StoreError::from)?
            {
                outputs.insert(name.clone(), r.out_path);
                unknown.remove(&name);
            }
        }
    }
    let mut inputs = Vec::new();
    for (p, outs) in &drv.input_drvs {
        let names = outs
            .iter()
            .map(|o| firn_derivation::output_name(o))
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(|source| BuildError::Derivation {
                drv: sd.display(drv_path),
                source,
            })?;
        inputs.push((p.clone(), Wanted::Some(names)));
    }
    Ok(Loaded {
        drv,
        outputs,
        unknown,
        hashes,
        inputs,
    })
}

/// Whether `drv` is built through the derivation it resolves to (Nix's
/// `inputsRealised`): deferred input-addressed, floating and impure derivations with
/// input derivations must be; fixed-output ones are when `ca-derivations` is on.
fn needs_resolving(
    drv: &Derivation<'_>,
    ca: bool,
) -> Result<bool, firn_derivation::DerivationError> {
    use firn_derivation::DerivationType as T;
    if drv.input_drvs.is_empty() {
        return Ok(false);
    }
    Ok(match drv.derivation_type()? {
        T::InputAddressed { deferred } => deferred,
        T::FixedOutput => ca,
        T::Floating | T::Impure => true,
    })
}

/// A running build and what it holds.
#[derive(Debug)]
pub struct Build<R> {
    pub running: R,
    pub log: BuildLog,
    /// The output locks, held until the build is over.
    locks: PathLocks,
    input_closure: BTreeSet<StorePath>,
    start_time: u64,
    /// Outputs that were valid when the build started: never deleted or replaced.
    valid: BTreeSet<OutputName>,
    /// Unsandboxed, valid outputs are built at a fallback path: output → that path.
    redirected: BTreeMap<OutputName, StorePath>,
    /// When end of file on the builder's output was seen.
    eof: Option<Instant>,
    /// A recursive-Nix build's private daemon.
    recursive: Option<RunningRecursive>,
}

/// What [`DerivationGoal::spawn`] started, before it becomes a [`Build`] with the locks.
struct Spawned<R> {
    running: R,
    log: BuildLog,
    input_closure: BTreeSet<StorePath>,
    valid: BTreeSet<OutputName>,
    redirected: BTreeMap<OutputName, StorePath>,
    recursive: Option<RunningRecursive>,
}

/// A goal's state, with the data the goal has in it.
#[derive(Debug)]
pub enum GoalState<R> {
    Init,
    WaitingForInputs(Box<Loaded>),
    TryToBuild {
        loaded: Box<Loaded>,
        said_waiting_lock: bool,
        said_waiting_user: bool,
    },
    Building {
        loaded: Box<Loaded>,
        build: Box<Build<R>>,
    },
    /// Building on a remote machine (`builders`).
    BuildingRemotely {
        loaded: Box<Loaded>,
        build: Box<RemoteBuilding>,
    },
    /// Waiting for the goal of the derivation this one resolved to.
    WaitingForResolved {
        loaded: Box<Loaded>,
        resolved: StorePath,
    },
    Done(BuildResult),
}

/// What a goal waits for after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The goals of these input derivations (with the outputs wanted of each).
    Inputs(Vec<(StorePath, Wanted)>),
    /// A build slot (`max-jobs`).
    Slot,
    /// The output locks, which another process holds: try again in a while.
    Lock,
    /// A build user: every one is building. Try again in a while.
    BuildUser,
    /// Its builder, which is running: poll its log.
    Running,
    /// Every machine that fits is busy and this one cannot build it: wait for a build
    /// to end (Nix's hook answer `# postpone`).
    Postpone,
    /// Its remote machine failed: decide again now (another machine, or here).
    Retry,
    /// Nothing: it is [`GoalState::Done`].
    Done,
}

/// What a goal works with: the store, the settings, the builder and the event sink.
pub struct Context<'a, B: Builder> {
    pub store: &'a mut Store,
    pub settings: &'a Settings,
    pub builder: &'a mut B,
    pub events: &'a mut dyn BuildEvents,
    /// Serves the private daemon of recursive-Nix builds, if the worker has one.
    pub recursive: Option<&'a dyn RecursiveNix>,
    /// The remote machines (`builders`) and their state.
    pub dispatcher: &'a mut crate::remote::Dispatcher,
    /// A local build slot (`max-jobs`) is free.
    pub local_slot_free: bool,
}

impl<B: Builder> std::fmt::Debug for Context<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// One derivation to realise.
#[derive(Debug)]
pub struct DerivationGoal<R> {
    pub drv_path: StorePath,
    pub wanted: Wanted,
    /// Build what is missing, or rebuild valid outputs to compare them (`--check`) or
    /// to replace them (`--repair`): for top-level goals.
    pub mode: BuildMode,
    pub state: GoalState<R>,
    /// The derivation, when it is given rather than read from the store
    /// ([`crate::Worker::give`]).
    pub given: Option<Box<Derivation<'static>>>,
}

/// How long a build's output is polled after its end ([`DerivationGoal::log_fd`]).
pub const EOF_POLL: Duration = Duration::from_millis(5);

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a sandboxed builder could not start. Its program missing in the sandbox fails
/// the build as in Nix (exit 100); firn also says where the sandbox takes its files from.
fn sandbox_start_error(drv: String, source: ExecError) -> BuildError {
    match source {
        ExecError::Spawn { program, source } if source.kind() == std::io::ErrorKind::NotFound => {
            BuildError::BuilderNotFound { drv, program }
        }
        source => BuildError::SandboxStart { drv, source },
    }
}

fn builder_exit(s: ExitStatus) -> BuilderExit {
    match (s.code(), s.signal()) {
        (Some(c), _) => BuilderExit::Code(c),
        (_, Some(sig)) => BuilderExit::Signal(sig),
        _ => BuilderExit::Unknown,
    }
}

impl<R: RunningBuild> DerivationGoal<R> {
    pub fn new(drv_path: StorePath, wanted: Wanted) -> Self {
        Self {
            drv_path,
            wanted,
            mode: BuildMode::Normal,
            state: GoalState::Init,
            given: None,
        }
    }

    pub fn result(&self) -> Option<&BuildResult> {
        match &self.state {
            GoalState::Done(r) => Some(r),
            _ => None,
        }
    }

    /// Building here or on a machine.
    pub fn is_building(&self) -> bool {
        matches!(
            self.state,
            GoalState::Building { .. } | GoalState::BuildingRemotely { .. }
        )
    }

    /// Building here: taking a local slot.
    pub fn is_building_locally(&self) -> bool {
        matches!(self.state, GoalState::Building { .. })
    }

    /// The descriptor to poll for the build's output, if there is one to wait on. Once
    /// the output is at its end (always readable), it is polled only for
    /// [`EOF_POLL`]: the builder's exit usually follows at once (it closes its
    /// descriptors before it can be reaped); a builder that closed its output and
    /// goes on working is then looked at on the worker's short timer instead of
    /// keeping it busy.
    pub fn log_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match &self.state {
            GoalState::Building { build, .. } => match build.eof {
                Some(at) if at.elapsed() > EOF_POLL => None,
                _ => Some(build.running.log_fd()),
            },
            GoalState::BuildingRemotely { build, .. } => Some(build.log_fd()),
            _ => None,
        }
    }

    /// The last line the running build wrote.
    pub fn last_log_line(&self) -> Option<&str> {
        match &self.state {
            GoalState::Building { build, .. } => build.log.last_line(),
            GoalState::BuildingRemotely { build, .. } => build.last_line(),
            _ => None,
        }
    }

    /// Want more outputs of this goal. A goal that found what it was asked for valid
    /// must decide again (returns true: it is back in `Init`).
    pub fn want(&mut self, wanted: &Wanted) -> bool {
        let more = self.wanted.merge(wanted);
        let revisit = more
            && matches!(&self.state, GoalState::Done(r) if matches!(r.status, BuildStatus::AlreadyValid | BuildStatus::Substituted));
        if revisit {
            self.state = GoalState::Init;
        }
        revisit
    }

    fn done(&mut self, result: BuildResult) -> Next {
        self.state = GoalState::Done(result);
        Next::Done
    }

    fn fail(&mut self, error: BuildError) -> Next {
        self.done(BuildResult::failure(error))
    }

    /// `Init`: read the derivation, root what it names, and find out whether anything
    /// must be built.
    pub fn init<B: Builder<Build = R>>(&mut self, cx: &mut Context<'_, B>) -> Next {
        let sd = cx.store.store_dir().clone();
        let shown = sd.display(&self.drv_path);
        // Everything this goal reads or makes is a temporary GC root from here on (the
        // derivation before it is read, its outputs before their validity is checked),
        // so a concurrent `firn gc` cannot delete it under us (Nix's addTempRoot).
        if let Err(e) = cx.store.add_temp_root(&self.drv_path) {
            return self.fail(e.into());
        }
        let loaded = match &self.given {
            Some(d) => load_given(cx.store, &self.drv_path, (**d).clone()),
            None => load(cx.store, &self.drv_path),
        };
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => return self.fail(e),
        };
        // Content-addressed and impure derivations need their experimental features
        // (Nix asks when it reads them, and again for outputs not known in advance).
        match loaded.drv.derivation_type() {
            Ok(ty) => {
                let mut needed = Vec::new();
                needed.extend(ty.required_feature());
                if !ty.has_known_output_paths() {
                    needed.push("ca-derivations");
                }
                if let Some(f) = needed.into_iter().find(|f| !cx.settings.has_feature(f)) {
                    return self.fail(BuildError::MissingFeature { feature: f });
                }
            }
            Err(source) => {
                return self.fail(BuildError::Derivation {
                    drv: shown.clone(),
                    source,
                })
            }
        }
        // A valid output known from the derivation alone, without its realisation
        // (built without `ca-derivations`): record it, as Nix does.
        if cx.store.ca_derivations() && loaded.drv.derivation_type().is_ok_and(|t| t.is_pure()) {
            for (name, p) in &loaded.outputs {
                if loaded.unknown.contains(name) {
                    continue;
                }
                let Some(id) = loaded.drv_output(name) else {
                    continue;
                };
                let recorded = match cx.store.db().query_realisation(&id) {
                    Ok(r) => r.is_some(),
                    Err(e) => return self.fail(StoreError::from(e).into()),
                };
                if !recorded && cx.store.db().is_valid_path(p).unwrap_or(false) {
                    let r = firn_derivation::Realisation::new(id, p.clone());
                    if let Err(e) = cx.store.db_mut().register_drv_output(&r) {
                        return self.fail(StoreError::from(e).into());
                    }
                }
            }
        }
        let rooted = loaded
            .outputs
            .values()
            .chain(loaded.drv.input_srcs.iter())
            .try_for_each(|p| cx.store.add_temp_root(p));
        if let Err(e) = rooted {
            return self.fail(e.into());
        }
        if let Wanted::Some(w) = &self.wanted {
            if let Some(bad) = w.iter().find(|o| !loaded.outputs.contains_key(*o)) {
                return self.fail(BuildError::NoSuchOutput {
                    drv: shown,
                    output: bad.to_string(),
                });
            }
        }
        let mut all_wanted_valid = true;
        let mut every_valid = true;
        let mut missing_wanted = Vec::new();
        for (name, p) in &loaded.outputs {
            let valid = match loaded.unknown.contains(name) {
                true => Ok(false),
                false => cx.store.db().is_valid_path(p),
            };
            match valid {
                Ok(valid) => {
                    every_valid &= valid;
                    if self.wanted.contains(name.as_str()) {
                        all_wanted_valid &= valid;
                        // (An unknown output's path is a scratch path: its
                        // realisation names the real one.)
                        if !valid && !loaded.unknown.contains(name) {
                            missing_wanted.push(p.clone());
                        }
                    }
                }
                Err(e) => return self.fail(StoreError::from(e).into()),
            }
        }
        if self.mode != BuildMode::Normal {
            if self.mode == BuildMode::Check && !every_valid {
                return self.fail(BuildError::CheckNotPossible { drv: shown });
            }
            // The rebuilt outputs go to the sandbox's own store dir, beside the valid ones.
            match use_sandbox(cx.settings, &shown, &loaded.drv) {
                Ok(true) => {}
                Ok(false) => return self.fail(BuildError::CheckNeedsSandbox),
                Err(e) => return self.fail(e),
            }
        } else if all_wanted_valid {
            return self.done(BuildResult::already_valid(loaded.known_outputs()));
        } else if crate::substitute::allowed(&loaded.drv) {
            // The binary caches before building (Nix's `haveDerivation`): if they have
            // every missing wanted output, neither this nor its inputs are built. An
            // output whose path the build decides is found by its realisation first.
            use crate::substitute::Substituted;
            // The ids of the wanted outputs whose paths only a build decides (none
            // if one has no id: then it is built).
            let ids: Option<Vec<_>> = loaded
                .unknown
                .iter()
                .filter(|n| self.wanted.contains(n.as_str()))
                .map(|n| Some((n.clone(), loaded.drv_output(n)?)))
                .collect();
            let realised = match ids {
                Some(ids) if ids.is_empty() => Some(Default::default()),
                Some(ids) if cx.settings.ca_derivations() => {
                    match crate::substitute::realisations(cx.store, cx.settings, cx.events, &ids) {
                        Ok(r) => r,
                        Err(e) => return self.fail(e),
                    }
                }
                _ => None,
            };
            let Some(realised) = realised else {
                return self.wait_for_inputs(cx, loaded);
            };
            let mut missing_wanted = missing_wanted;
            for r in realised.outputs.values().chain(&realised.dependencies) {
                match cx.store.db().is_valid_path(&r.out_path) {
                    Ok(true) => {}
                    Ok(false) => missing_wanted.push(r.out_path.clone()),
                    Err(e) => return self.fail(StoreError::from(e).into()),
                }
            }
            // Fixed outputs are known by content: caches of other store dirs have them.
            let cas: BTreeMap<StorePath, firn_derivation::FixedOutputHash> = loaded
                .outputs
                .iter()
                .filter_map(|(name, p)| match loaded.drv.outputs.get(name.as_bytes()) {
                    Some(DerivationOutput::CAFixed(fixed)) => Some((p.clone(), *fixed)),
                    _ => None,
                })
                .collect();
            match crate::substitute::substitute(
                cx.store,
                cx.settings,
                cx.events,
                &missing_wanted,
                &cas,
            ) {
                Substituted::All => {
                    let mut outputs = loaded.known_outputs();
                    let crate::substitute::Realised {
                        outputs: mine,
                        dependencies,
                    } = realised;
                    for r in dependencies.iter().chain(mine.values()) {
                        if let Err(e) = cx.store.db_mut().register_drv_output(r) {
                            return self.fail(StoreError::from(e).into());
                        }
                    }
                    for (name, r) in mine {
                        outputs.insert(name, r.out_path);
                    }
                    return self.done(BuildResult::substituted(outputs));
                }
                Substituted::No => {}
                Substituted::Failed(e) => return self.fail(e),
            }
        }
        self.wait_for_inputs(cx, loaded)
    }

    /// Nothing could be substituted: the inputs first.
    fn wait_for_inputs<B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        loaded: Loaded,
    ) -> Next {
        let sd = cx.store.store_dir().clone();
        let shown = sd.display(&self.drv_path);
        // A pure derivation that is not fixed-output may not depend on an impure one
        // (Nix's `gaveUpOnSubstitution`).
        if let Ok(ty) = loaded.drv.derivation_type() {
            if ty.is_pure() && ty != firn_derivation::DerivationType::FixedOutput {
                for input in loaded.drv.input_drvs.keys() {
                    let impure = cx.store.read_derivation(input).is_ok_and(|d| {
                        d.derivation_type()
                            .is_ok_and(|t| t == firn_derivation::DerivationType::Impure)
                    });
                    if impure {
                        return self.fail(BuildError::DependsOnImpure {
                            drv: shown,
                            input: sd.display(input),
                        });
                    }
                }
            }
        }
        let inputs = loaded.inputs.clone();
        self.state = GoalState::WaitingForInputs(Box::new(loaded));
        Next::Inputs(inputs)
    }

    /// `WaitingForInputs`, once every input goal is done (`result` gives their
    /// results): fail if one failed; resolve the derivation if its inputs are
    /// content-addressed (then wait for the goal of the resolved one); else wait for a
    /// build slot.
    pub fn inputs_done<'r, B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        result: impl Fn(&StorePath) -> Option<&'r BuildResult>,
    ) -> Next {
        let store_dir = &cx.store.store_dir().clone();
        let GoalState::WaitingForInputs(loaded) =
            std::mem::replace(&mut self.state, GoalState::Init)
        else {
            return Next::Done;
        };
        let failed = loaded
            .inputs
            .iter()
            .filter(|(p, _)| !result(p).is_some_and(|r| r.status.success()))
            .count();
        if failed > 0 {
            return self.fail(BuildError::DependenciesFailed {
                drv: store_dir.display(&self.drv_path),
                count: failed,
            });
        }
        let ca = cx.settings.ca_derivations();
        match needs_resolving(&loaded.drv, ca) {
            Ok(false) => {}
            Ok(true) if !ca => {
                return self.fail(BuildError::MissingFeature {
                    feature: "ca-derivations",
                })
            }
            Ok(true) => return self.resolve(cx, loaded, result),
            Err(source) => {
                return self.fail(BuildError::Derivation {
                    drv: store_dir.display(&self.drv_path),
                    source,
                })
            }
        }
        self.state = GoalState::TryToBuild {
            loaded,
            said_waiting_lock: false,
            said_waiting_user: false,
        };
        Next::Slot
    }

    /// Resolve the derivation with its inputs' realised outputs, write the resolved one
    /// to the store and wait for its goal (Nix's `inputsRealised` and
    /// `resolvedFinished`).
    fn resolve<'r, B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        loaded: Box<Loaded>,
        result: impl Fn(&StorePath) -> Option<&'r BuildResult>,
    ) -> Next {
        let sd = cx.store.store_dir().clone();
        let shown = sd.display(&self.drv_path);
        let mut realised = |input: &StorePath, output: &str| {
            result(input).and_then(|r| r.outputs.get(output).cloned())
        };
        let resolved = match firn_derivation::resolve(&sd, &loaded.drv, &mut realised) {
            Ok(d) => d,
            Err(source) => return self.fail(BuildError::Resolve { drv: shown, source }),
        };
        let path = match cx.store.add_derivation(resolved, false) {
            Ok(p) => p,
            Err(e) => return self.fail(e.into()),
        };
        if let Err(e) = cx.store.add_temp_root(&path) {
            return self.fail(e.into());
        }
        let wanted = self.wanted.clone();
        self.state = GoalState::WaitingForResolved {
            loaded,
            resolved: path.clone(),
        };
        Next::Inputs(vec![(path, wanted)])
    }

    /// `WaitingForResolved`, once the resolved derivation's goal is done: its outputs
    /// are this derivation's, and realisations record them (with the realisations of
    /// the inputs they refer to).
    pub fn resolved_done<'r, B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        result: impl Fn(&StorePath) -> Option<&'r BuildResult>,
    ) -> Next {
        let GoalState::WaitingForResolved { loaded, resolved } =
            std::mem::replace(&mut self.state, GoalState::Init)
        else {
            return Next::Done;
        };
        let Some(r) = result(&resolved).cloned() else {
            return self.fail(BuildError::NotRealised);
        };
        if !r.status.success() {
            return self.done(BuildResult {
                outputs: BTreeMap::new(),
                ..r
            });
        }
        let ty = loaded.drv.derivation_type().ok();
        if cx.settings.ca_derivations() && ty.is_some_and(|t| t.is_pure()) {
            let fixed = ty == Some(firn_derivation::DerivationType::FixedOutput);
            for (name, path) in &r.outputs {
                if !self.wanted.contains(name.as_str()) {
                    continue;
                }
                let Some(id) = loaded.drv_output(name) else {
                    continue;
                };
                let mut realisation = firn_derivation::Realisation::new(id, path.clone());
                if !fixed {
                    match drv_output_references(cx.store, &loaded.drv, path) {
                        Ok(deps) => realisation.dependent_realisations = deps,
                        Err(e) => return self.fail(e),
                    }
                }
                if let Err(e) = sign_realisation(&mut realisation, cx.settings) {
                    return self.fail(e);
                }
                if let Err(e) = cx.store.db_mut().register_drv_output(&realisation) {
                    return self.fail(StoreError::from(e).into());
                }
            }
        }
        self.done(r)
    }

    /// `TryToBuild`, with a build slot: take the output locks and a build user without
    /// waiting, check validity again (another process may have built it meanwhile) and
    /// start the builder. `result` gives the input goals' results.
    pub fn try_to_build<'r, B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        result: impl Fn(&StorePath) -> Option<&'r BuildResult>,
    ) -> Next {
        let GoalState::TryToBuild {
            loaded,
            mut said_waiting_lock,
            mut said_waiting_user,
        } = std::mem::replace(&mut self.state, GoalState::Init)
        else {
            return Next::Done;
        };
        // Can this machine build it at all? (Nix's `canBuildLocally`.) Without machines
        // that is the end of it; with them, one may.
        let local = can_build_locally(cx, &self.drv_path, &loaded.drv);
        if cx.dispatcher.is_empty() {
            if let Err(e) = local {
                return self.fail(e);
            }
        }
        let reals: Vec<PathBuf> = loaded
            .outputs
            .values()
            .map(|p| cx.store.real_path(p))
            .collect();
        let mut locks = match PathLocks::lock(reals, false, |_| {}) {
            Ok(Some(l)) => l,
            Ok(None) => {
                if !said_waiting_lock {
                    let outputs: Vec<StorePath> = loaded.outputs.values().cloned().collect();
                    cx.events
                        .message(Message::WaitingForLocks { outputs: &outputs });
                    said_waiting_lock = true;
                }
                self.state = GoalState::TryToBuild {
                    loaded,
                    said_waiting_lock,
                    said_waiting_user,
                };
                return Next::Lock;
            }
            Err(e) => return self.fail(StoreError::from(e).into()),
        };
        // Which outputs are valid decides what the build may touch: a database error is
        // not "not valid" (that could delete a valid output), it fails the goal.
        let mut valid = BTreeSet::new();
        for (name, p) in &loaded.outputs {
            if loaded.unknown.contains(name) {
                continue;
            }
            match cx.store.db().is_valid_path(p) {
                Ok(true) => {
                    valid.insert(name.clone());
                }
                Ok(false) => {}
                Err(e) => return self.fail(StoreError::from(e).into()),
            }
        }
        if valid.len() == loaded.outputs.len() && self.mode == BuildMode::Normal {
            locks.set_deletion(true);
            return self.done(BuildResult::already_valid(loaded.known_outputs()));
        }
        // Nix's build hook: a machine of `builders` takes it, unless it is to be built
        // here (`preferLocalBuild` and this machine can, or `--check`/`--repair`).
        let (loaded, mut locks) = if cx.dispatcher.is_empty() {
            (loaded, locks)
        } else {
            let here = local.is_ok();
            let prefer_local = self.mode != BuildMode::Normal
                || (here && dispatch::prefer_local_build(&loaded.drv));
            let (loaded, locks) = match prefer_local {
                true => (loaded, locks),
                false => match self.try_remote(cx, loaded, locks, &valid, &result, here) {
                    dispatch::Tried::Done(next) => return next,
                    dispatch::Tried::Postponed(loaded) => {
                        self.state = GoalState::TryToBuild {
                            loaded,
                            said_waiting_lock,
                            said_waiting_user,
                        };
                        return Next::Postpone;
                    }
                    dispatch::Tried::Declined(loaded, locks) => (loaded, locks),
                },
            };
            if let Err(e) = local {
                let mut locks = locks;
                locks.set_deletion(true);
                return self.fail(match e {
                    BuildError::NoBuildSlots { drv } => BuildError::NoMachine {
                        drv,
                        machines: cx.dispatcher.describe(),
                    },
                    e => e,
                });
            }
            if !cx.local_slot_free {
                drop(locks);
                self.state = GoalState::TryToBuild {
                    loaded,
                    said_waiting_lock,
                    said_waiting_user,
                };
                return Next::Postpone;
            }
            (loaded, locks)
        };
        // A build user, or wait for one: never build as the caller instead.
        let user = match cx.builder.acquire_user() {
            Ok(AcquiredUser::Got(u)) => Some(u),
            Ok(AcquiredUser::NotConfigured) => None,
            Ok(AcquiredUser::Busy) => {
                drop(locks);
                if !said_waiting_user {
                    cx.events.message(Message::WaitingForBuildUser {
                        drv: &self.drv_path,
                    });
                    said_waiting_user = true;
                }
                self.state = GoalState::TryToBuild {
                    loaded,
                    said_waiting_lock,
                    said_waiting_user,
                };
                return Next::BuildUser;
            }
            Err(e) => {
                // Nothing was started: the lock files go too.
                locks.set_deletion(true);
                return self.fail(BuildError::Exec(e));
            }
        };
        match self.start(cx, &loaded, locks, user, valid, result) {
            Ok(build) => {
                self.state = GoalState::Building {
                    loaded,
                    build: Box::new(build),
                };
                Next::Running
            }
            Err(e) => self.fail(e),
        }
    }

    /// The closure of the wanted input outputs and the input sources.
    fn input_closure<'r>(
        &self,
        store: &Store,
        loaded: &Loaded,
        result: impl Fn(&StorePath) -> Option<&'r BuildResult>,
    ) -> Result<BTreeSet<StorePath>, BuildError> {
        let mut roots: Vec<StorePath> = Vec::new();
        for (p, wanted) in &loaded.inputs {
            if let Some(r) = result(p) {
                for (name, out) in &r.outputs {
                    if wanted.contains(name.as_str()) {
                        roots.push(out.clone());
                    }
                }
            }
        }
        roots.extend(loaded.drv.input_srcs.iter().cloned());
        Ok(store
            .db()
            .query_closure(&roots, false)
            .map_err(StoreError::from)?)
    }

    /// Start the builder, holding `locks`. If it cannot be started, nothing of it stays:
    /// no build directory, sandbox root or log (their owners remove them), and the lock
    /// files go too (nothing was built at the output paths).
    #[allow(clippy::too_many_arguments)]
    fn start<'r, B: Builder<Build = R>>(
        &self,
        cx: &mut Context<'_, B>,
        loaded: &Loaded,
        mut locks: PathLocks,
        user: Option<crate::builder::BuildUser>,
        valid: BTreeSet<OutputName>,
        result: impl Fn(&StorePath) -> Option<&'r BuildResult>,
    ) -> Result<Build<R>, BuildError> {
        match self.spawn(cx, loaded, user, valid, result) {
            Ok(s) => Ok(Build {
                running: s.running,
                log: s.log,
                locks,
                input_closure: s.input_closure,
                start_time: unix_now(),
                valid: s.valid,
                redirected: s.redirected,
                eof: None,
                recursive: s.recursive,
            }),
            Err(e) => {
                locks.set_deletion(true);
                Err(e)
            }
        }
    }

    fn spawn<'r, B: Builder<Build = R>>(
        &self,
        cx: &mut Context<'_, B>,
        loaded: &Loaded,
        user: Option<crate::builder::BuildUser>,
        valid: BTreeSet<OutputName>,
        result: impl Fn(&StorePath) -> Option<&'r BuildResult>,
    ) -> Result<Spawned<R>, BuildError> {
        let sd = cx.store.store_dir().clone();
        let shown = sd.display(&self.drv_path);
        let io = |path: PathBuf| move |source| BuildError::Io { path, source };
        let mut input_closure = self.input_closure(cx.store, loaded, result)?;
        // Leftovers of an interrupted build at the invalid output paths are removed; a
        // valid output is never touched (a check builds in the sandbox's store).
        if self.mode == BuildMode::Normal {
            for (_, p) in loaded.outputs.iter().filter(|(n, _)| !valid.contains(*n)) {
                let real = cx.store.real_path(p);
                firn_store::canonical::delete_path(&real).map_err(io(real.clone()))?;
            }
        }
        // Without the sandbox the builder writes into the real store: valid outputs go
        // to a fallback path instead (removed after the build).
        let sandboxed = use_sandbox(cx.settings, &shown, &loaded.drv)?;
        let mut redirected = BTreeMap::new();
        if !sandboxed && self.mode == BuildMode::Normal {
            for name in &valid {
                let p = &loaded.outputs[name];
                let fallback = fallback_path(&sd, &self.drv_path, p);
                let real = cx.store.real_path(&fallback);
                firn_store::canonical::delete_path(&real).map_err(io(real.clone()))?;
                redirected.insert(name.clone(), fallback);
            }
        }
        let sandbox_paths = match sandboxed {
            true => {
                let (rest, extra) = sandbox_paths_in_store(cx.store, &cx.settings.sandbox_paths)?;
                input_closure.extend(extra);
                rest
            }
            false => Vec::new(),
        };
        let build_dir = cx
            .builder
            .build_dir(&self.drv_path, user.as_ref(), sandboxed)
            .map_err(BuildError::Exec)?;
        let output_paths: BTreeMap<firn_derivation::ByteStr<'_>, StorePath> = loaded
            .outputs
            .iter()
            .map(|(k, v)| (std::borrow::Cow::Owned(k.as_bytes().to_vec()), v.clone()))
            .collect();
        let caller_env: BTreeMap<Vec<u8>, Vec<u8>> = std::env::vars_os()
            .map(|(k, v)| {
                use std::os::unix::ffi::OsStrExt;
                (k.as_bytes().to_vec(), v.as_bytes().to_vec())
            })
            .collect();
        let exported = export_references(cx.store, &self.drv_path, &loaded.drv, &input_closure)?;
        let build_plan = plan(&PlanInput {
            drv: &loaded.drv,
            store_dir: &sd,
            output_paths: &output_paths,
            build_dir: build_dir.seen(),
            cores: cx.settings.cores,
            caller_env: &caller_env,
            sandboxed,
            exported: &exported,
        })
        .map_err(|source| BuildError::Plan {
            drv: shown.clone(),
            source,
        })?;
        // The builder writes valid outputs at their fallback paths: every mention of
        // their hash parts is redirected (and rewritten back in the other outputs).
        let input_rewrites: Vec<(String, String)> = redirected
            .iter()
            .map(|(name, fallback)| {
                (
                    loaded.outputs[name].hash_part().to_owned(),
                    fallback.hash_part().to_owned(),
                )
            })
            .collect();
        let mut build_plan = build_plan;
        build_plan.rewrite_hashes(&input_rewrites);
        // Recursive Nix: the build's private daemon, listening before the builder starts
        // (Nix's `startDaemon`); it stops with the build (dropped on every error path).
        let builtin = loaded.drv.builder.starts_with(b"builtin:");
        let recursive = match !builtin
            && crate::platform::required_system_features(&loaded.drv)
                .contains(crate::recursive::FEATURE)
        {
            false => None,
            true => {
                if !cx.settings.has_feature(crate::recursive::FEATURE) {
                    return Err(BuildError::MissingFeature {
                        feature: crate::recursive::FEATURE,
                    });
                }
                let Some(hook) = cx.recursive else {
                    return Err(BuildError::NoRecursiveNix { drv: shown.clone() });
                };
                let allowed = AllowedPaths::new(input_closure.clone());
                let socket = build_dir.real().join(crate::recursive::SOCKET_NAME);
                let server = hook
                    .start(RecursiveRequest {
                        drv_path: &self.drv_path,
                        socket: socket.clone(),
                        owner: user.as_ref().map(|u| (u.uid, u.gid)),
                        allowed: allowed.clone(),
                        settings: cx.settings,
                    })
                    .map_err(|source| BuildError::RecursiveNixStart {
                        drv: shown.clone(),
                        socket,
                        source,
                    })?;
                let remote = crate::recursive::nix_remote(build_dir.seen());
                build_plan.set_env(b"NIX_REMOTE", remote.as_bytes());
                Some(RunningRecursive::new(server, allowed))
            }
        };
        let log_path = crate::log::log_path(&cx.store.layout().log_dir, &self.drv_path);
        let log = BuildLog::with_tail(log_path.clone(), cx.settings.log_lines as usize)
            .map_err(io(log_path))?;
        cx.events.build_started(crate::events::BuildStarted {
            drv: &self.drv_path,
            sandboxed,
            checking: self.mode == BuildMode::Check,
            repairing: self.mode == BuildMode::Repair,
            machine: None,
        });
        let running = cx
            .builder
            .start(BuildJob {
                drv_path: &self.drv_path,
                drv: &loaded.drv,
                plan: &build_plan,
                build_dir,
                inputs: &input_closure,
                sandbox_paths: &sandbox_paths,
                user,
                sandboxed,
                recursive: recursive.as_ref().map(RunningRecursive::allowed),
            })
            .map_err(|source| match sandboxed {
                true => sandbox_start_error(shown, source),
                false => BuildError::Exec(source),
            })?;
        Ok(Spawned {
            running,
            log,
            input_closure,
            valid,
            redirected,
            recursive,
        })
    }

    /// `Building`: read the builder's output (`readable`: its descriptor polled
    /// readable), enforce the time and log limits, and finish once it has exited.
    pub fn service<B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        readable: bool,
    ) -> Next {
        let sd = cx.store.store_dir().clone();
        let GoalState::Building { build, .. } = &mut self.state else {
            return Next::Done;
        };
        // On the stack: a heap buffer per call cost a fresh allocation, its page faults
        // and its free for every read of every build's output.
        let mut buf = [0u8; 65536];
        if readable && build.eof.is_none() {
            match build.running.read_log(&mut buf) {
                Ok(0) => build.eof = Some(Instant::now()),
                Ok(n) => {
                    let data = &buf[..n];
                    let _ = build.log.write(data);
                    cx.events.build_log(&self.drv_path, data);
                }
                Err(_) => build.eof = Some(Instant::now()),
            }
        }
        if let Some(e) = limit_hit(&build.log, cx.settings, || sd.display(&self.drv_path)) {
            let status = build.running.kill();
            return self.finish(cx, status, Some(e));
        }
        // The builder's exit comes from waitpid, not from EOF on its output.
        let status = match build.running.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => return Next::Running,
            Err(_) => return Next::Running,
        };
        // Collect what is still in the pipe, then finish.
        while build.eof.is_none() {
            let ready = {
                let fd = build.running.log_fd();
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
            };
            if !ready {
                break;
            }
            match build.running.read_log(&mut buf) {
                Ok(0) | Err(_) => build.eof = Some(Instant::now()),
                Ok(n) => {
                    let _ = build.log.write(&buf[..n]);
                    cx.events.build_log(&self.drv_path, &buf[..n]);
                }
            }
        }
        self.finish(cx, Some(status), None)
    }

    /// The builder exited (or was killed for `killed`): check and register the outputs,
    /// release the build.
    fn finish<B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        status: Option<ExitStatus>,
        killed: Option<BuildError>,
    ) -> Next {
        let GoalState::Building { loaded, build } =
            std::mem::replace(&mut self.state, GoalState::Init)
        else {
            return Next::Done;
        };
        let mut build = *build;
        // The builder has exited: its private daemon goes (Nix's `stopDaemon`), and
        // what it added may be referenced by the outputs.
        if let Some(r) = build.recursive.as_mut() {
            let added = r.stop();
            build.input_closure.extend(added);
        }
        let sd = cx.store.store_dir().clone();
        let shown = sd.display(&self.drv_path);
        let failed_exit = status.filter(|s| !s.success()).map(builder_exit);
        // A sandboxed builder that never started (found out only now: its sandbox sets
        // up while the worker goes on) fails as a `start` that failed would have, and
        // leaves as little: no build directory, log or lock file.
        let not_started = match (&killed, &failed_exit) {
            (None, Some(_)) => build
                .running
                .start_failure()
                .map(|e| sandbox_start_error(shown.clone(), e)),
            _ => None,
        };
        let started = not_started.is_none();
        let killed = killed.or(not_started);
        // The final paths of the outputs built (for floating ones, known only now).
        let mut finals: BTreeMap<OutputName, StorePath> = BTreeMap::new();
        let usage = build.running.usage();
        let limits = (cx.settings.build_memory_max.0, cx.settings.build_pids_max.0);
        let outcome: Result<(), BuildError> = match (killed, failed_exit) {
            (Some(e), _) => Err(e),
            // A failure at a limit says which (the builder's own message may not).
            (None, Some(exit)) => Err(match (usage, limits) {
                (Some(u), (Some(max), _)) if u.oom_killed => BuildError::MemoryLimit {
                    drv: shown.clone(),
                    exit,
                    max,
                },
                (Some(u), (_, Some(max))) if u.pids_limited => BuildError::ProcessLimit {
                    drv: shown.clone(),
                    exit,
                    max,
                },
                _ => BuildError::BuilderFailed {
                    drv: shown.clone(),
                    exit,
                },
            }),
            (None, None) if self.mode == BuildMode::Repair => {
                self.replace_outputs(cx, &loaded, &mut build)
            }
            (None, None) if self.mode == BuildMode::Check => crate::check::compare_outputs(
                cx.store,
                &self.drv_path,
                &loaded.outputs,
                &build.running,
                cx.settings.keep_failed,
                cx.events,
            ),
            (None, None) => self
                .collect_and_register(cx, &loaded, &mut build, &mut finals)
                .and_then(|()| register_realisations(cx.store, cx.settings, &loaded, &finals)),
        };
        // As Nix, never for builtins: their directory may hold privileged things.
        let builtin = loaded.drv.builder.starts_with(b"builtin:");
        let keep = outcome.is_err()
            && started
            && cx.settings.keep_failed
            && self.mode == BuildMode::Normal
            && !builtin;
        let Build {
            running,
            mut log,
            mut locks,
            start_time,
            valid,
            redirected,
            ..
        } = build;
        match cx.builder.release(running, keep) {
            Ok(Some(dir)) => cx.events.message(Message::KeepingBuildDir { path: &dir }),
            Ok(None) => {}
            Err(e) => {
                let text = e.to_string();
                cx.events.message(Message::Warning { text: &text });
            }
        }
        match started {
            true => drop(log.finish()),
            false => log.discard(),
        }
        // The builder's copies of valid outputs (at their fallback paths) are discarded.
        for fallback in redirected.values() {
            let _ = firn_store::canonical::delete_path(&cx.store.real_path(fallback));
        }
        if outcome.is_err() && self.mode != BuildMode::Check {
            // Nothing of a failed build stays at the output paths it may touch (a fixed
            // output's mismatching content was registered under its own path).
            for (_, p) in loaded.outputs.iter().filter(|(n, _)| !valid.contains(*n)) {
                if let Ok(false) = cx.store.db().is_valid_path(p) {
                    let _ = firn_store::canonical::delete_path(&cx.store.real_path(p));
                }
            }
        }
        if (outcome.is_ok() && self.mode != BuildMode::Check) || !started {
            locks.set_deletion(true);
        }
        drop(locks);
        // Nix 2.8 calls the failure of a builder that is not sandboxed in its terms (a
        // fixed-output derivation's) transient: exit 1, not 100.
        let fixed_output = loaded.drv.is_fixed_output();
        let mut outputs = loaded.known_outputs();
        if outcome.is_ok() {
            outputs.extend(finals);
        }
        let outcome = outcome.and_then(|()| self.run_post_build_hook(cx, &outputs));
        let (status, error) = match outcome {
            Ok(()) => (BuildStatus::Built, None),
            Err(e) => (
                match e.status() {
                    BuildStatus::PermanentFailure if fixed_output => BuildStatus::TransientFailure,
                    status => status,
                },
                Some(Arc::new(e)),
            ),
        };
        self.done(ran(
            (status, error),
            outputs,
            start_time,
            &log,
            cx.settings.log_lines,
            usage,
        ))
    }

    /// The `post-build-hook`, if one is set, after a successful build.
    fn run_post_build_hook<B: Builder<Build = R>>(
        &self,
        cx: &mut Context<'_, B>,
        outputs: &BTreeMap<OutputName, StorePath>,
    ) -> Result<(), BuildError> {
        let hook = cx.settings.post_build_hook.as_str();
        if hook.is_empty() {
            return Ok(());
        }
        let sd = cx.store.store_dir();
        let run = crate::post_build_hook::HookRun {
            hook,
            drv: &self.drv_path,
            drv_shown: sd.display(&self.drv_path),
            outputs: outputs.values().map(|p| sd.display(p)).collect(),
        };
        crate::post_build_hook::run_post_build_hook(&run, cx.settings, cx.events)
    }

    /// `--repair`: put the rebuilt outputs in place of the registered ones, each in one
    /// step (the old one is renamed aside, the new one renamed in, the old one deleted;
    /// if registering fails the old ones come back), and register what was built.
    fn replace_outputs<B: Builder<Build = R>>(
        &self,
        cx: &mut Context<'_, B>,
        loaded: &Loaded,
        build: &mut Build<R>,
    ) -> Result<(), BuildError> {
        let sd = cx.store.store_dir().clone();
        let mut moved: Vec<(PathBuf, PathBuf)> = Vec::new();
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| BuildError::Io { path, source }
        };
        let mut swap = || -> Result<(), BuildError> {
            for (name, p) in &loaded.outputs {
                let rebuilt = build.running.built_path(p);
                let real = cx.store.real_path(p);
                if std::fs::symlink_metadata(&rebuilt).is_err() {
                    return Err(crate::outputs::OutputError::Missing {
                        drv: sd.display(&self.drv_path),
                        output: name.to_string(),
                        path: rebuilt.display().to_string(),
                    }
                    .into());
                }
                let mut aside = real.clone().into_os_string();
                aside.push(format!(".repair-old-{}", std::process::id()));
                let aside = PathBuf::from(aside);
                let _ = firn_store::canonical::delete_path(&aside);
                if std::fs::symlink_metadata(&real).is_ok() {
                    firn_store::canonical::make_deletable(&real).map_err(io(&real))?;
                    std::fs::rename(&real, &aside).map_err(io(&real))?;
                }
                moved.push((real.clone(), aside));
                std::fs::rename(&rebuilt, &real).map_err(io(&real))?;
            }
            Ok(())
        };
        let swapped = swap();
        let registered = swapped.and_then(|()| {
            let mut candidates = build.input_closure.clone();
            candidates.extend(loaded.outputs.values().cloned());
            let keys = crate::outputs::load_secret_keys(&cx.settings.secret_key_files.0)?;
            let built = BuiltOutputs {
                drv_path: &self.drv_path,
                drv: &loaded.drv,
                outputs: loaded.outputs.clone(),
                input_closure: candidates,
                build_uid: build.running.build_uid(),
                missing_at: BTreeMap::new(),
                secret_keys: &keys,
            };
            register_outputs(cx.store, &built)
                .map(|_| ())
                .map_err(BuildError::from)
        });
        for (real, aside) in moved {
            match &registered {
                Ok(()) => {
                    let _ = firn_store::canonical::delete_path(&aside);
                }
                Err(_) => {
                    // Put the old ones back: nothing is half repaired.
                    if std::fs::symlink_metadata(&aside).is_ok() {
                        let _ = firn_store::canonical::delete_path(&real);
                        let _ = std::fs::rename(&aside, &real);
                    }
                }
            }
        }
        registered
    }

    /// Move the outputs that were not valid into the store, rewrite fallback hashes,
    /// and register them.
    fn collect_and_register<B: Builder<Build = R>>(
        &self,
        cx: &mut Context<'_, B>,
        loaded: &Loaded,
        build: &mut Build<R>,
        finals: &mut BTreeMap<OutputName, StorePath>,
    ) -> Result<(), BuildError> {
        let to_register: BTreeMap<OutputName, StorePath> = loaded
            .outputs
            .iter()
            .filter(|(n, _)| !build.valid.contains(*n))
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        let targets = to_register
            .iter()
            .map(|(n, p)| (n.clone(), (p.clone(), cx.store.real_path(p))))
            .collect();
        let collected = cx
            .builder
            .collect_outputs(&mut build.running, &targets)
            .map_err(BuildError::Exec)?;
        let rewrites: Vec<(String, String)> = build
            .redirected
            .iter()
            .map(|(name, fallback)| {
                (
                    fallback.hash_part().to_owned(),
                    loaded.outputs[name].hash_part().to_owned(),
                )
            })
            .collect();
        for p in to_register.values() {
            rewrite_hashes(&cx.store.real_path(p), &rewrites)?;
        }
        let mut candidates = build.input_closure.clone();
        candidates.extend(loaded.outputs.values().cloned());
        let keys = crate::outputs::load_secret_keys(&cx.settings.secret_key_files.0)?;
        let built = BuiltOutputs {
            drv_path: &self.drv_path,
            drv: &loaded.drv,
            outputs: to_register,
            input_closure: candidates,
            build_uid: build.running.build_uid(),
            missing_at: collected.missing_at,
            secret_keys: &keys,
        };
        let (_, paths) = register_outputs_with_paths(cx.store, &built)?;
        *finals = paths;
        Ok(())
    }

    /// Stop a running build (interrupt, or another build failed without `keep-going`):
    /// kill it, remove its partial outputs and build directory, and end the goal with
    /// `why`. A goal that is not building just ends. Returns whether a build was
    /// stopped.
    pub fn stop<B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        why: BuildError,
    ) -> bool {
        let was_building = match std::mem::replace(&mut self.state, GoalState::Init) {
            GoalState::Building { loaded, build } => {
                let Build {
                    mut running,
                    mut log,
                    valid,
                    redirected,
                    recursive,
                    ..
                } = *build;
                running.kill();
                drop(recursive);
                let _ = cx.builder.release(running, false);
                let _ = log.finish();
                for (_, p) in loaded.outputs.iter().filter(|(n, _)| !valid.contains(*n)) {
                    if let Ok(false) = cx.store.db().is_valid_path(p) {
                        let _ = firn_store::canonical::delete_path(&cx.store.real_path(p));
                    }
                }
                for p in redirected.values() {
                    let _ = firn_store::canonical::delete_path(&cx.store.real_path(p));
                }
                true
            }
            GoalState::BuildingRemotely { loaded, build } => {
                self.stop_remote(cx, &loaded, *build);
                true
            }
            GoalState::Done(r) => {
                self.state = GoalState::Done(r);
                return false;
            }
            _ => false,
        };
        self.fail(why);
        was_building
    }
}

/// The result of a build that ran (here or on a machine): how it ended, its outputs,
/// times and log (the last `log-lines` lines for the message).
pub(crate) fn ran(
    (status, error): (BuildStatus, Option<Arc<BuildError>>),
    outputs: BTreeMap<OutputName, StorePath>,
    start_time: u64,
    log: &BuildLog,
    log_lines: u64,
    usage: Option<crate::builder::cgroup::Usage>,
) -> BuildResult {
    BuildResult {
        status,
        error,
        outputs,
        start_time,
        stop_time: unix_now(),
        log: Some(log.path().to_path_buf()),
        log_tail: log
            .tail()
            .take(log_lines as usize)
            .map(str::to_owned)
            .collect(),
        usage,
    }
}

/// The time or log limit a running build went past (`max-build-log-size`, `timeout`,
/// `max-silent-time`), if any: the build is killed for it.
pub(crate) fn limit_hit(
    log: &BuildLog,
    settings: &Settings,
    shown: impl Fn() -> String,
) -> Option<BuildError> {
    let mut killed = None;
    if let Some(max) = settings.max_build_log_size.0 {
        if log.size > max {
            killed = Some(BuildError::LogLimit { drv: shown(), max });
        }
    }
    if let Some(t) = settings.timeout.0 {
        if log.started.elapsed() > t {
            killed = Some(BuildError::TimedOut {
                drv: shown(),
                secs: t.as_secs(),
            });
        }
    }
    if let Some(t) = settings.max_silent_time.0 {
        if log.last_output.elapsed() > t {
            killed = Some(BuildError::Silent {
                drv: shown(),
                secs: t.as_secs(),
            });
        }
    }
    killed
}

/// Sign a realisation with every key of `secret-key-files` (Nix's `signRealisation`:
/// the signed text is the realisation's JSON without its signatures).
fn sign_realisation(
    r: &mut firn_derivation::Realisation,
    settings: &Settings,
) -> Result<(), BuildError> {
    let keys = crate::outputs::load_secret_keys(&settings.secret_key_files.0)?;
    let fp = r.fingerprint();
    r.signatures.extend(keys.iter().map(|k| k.sign(&fp)));
    Ok(())
}

/// With `ca-derivations`, the realisations of the outputs a pure derivation just built
/// (`registerOutputs`): `DrvOutput` (its hash, the output) → the path.
fn register_realisations(
    store: &mut Store,
    settings: &Settings,
    loaded: &Loaded,
    finals: &BTreeMap<OutputName, StorePath>,
) -> Result<(), BuildError> {
    let pure = loaded.drv.derivation_type().is_ok_and(|t| t.is_pure());
    if !settings.ca_derivations() || !pure {
        return Ok(());
    }
    for (name, path) in finals {
        if let Some(id) = loaded.drv_output(name) {
            let mut r = firn_derivation::Realisation::new(id, path.clone());
            sign_realisation(&mut r, settings)?;
            store
                .db_mut()
                .register_drv_output(&r)
                .map_err(StoreError::from)?;
        }
    }
    Ok(())
}

/// Nix's `drvOutputReferences`: the realisations, among those of `drv`'s input
/// derivations' wanted outputs and the realisations they depend on (transitively),
/// whose paths `out_path` refers to.
fn drv_output_references(
    store: &Store,
    drv: &Derivation<'_>,
    out_path: &StorePath,
) -> Result<BTreeMap<firn_derivation::DrvOutput, StorePath>, BuildError> {
    let sd = store.store_dir();
    let mut work = Vec::new();
    for (input, outputs) in &drv.input_drvs {
        let input_drv = store.read_derivation(input)?;
        let hashes = output_hashes(store, input, &input_drv)?;
        for o in outputs {
            let name = String::from_utf8_lossy(o).into_owned();
            let missing = || BuildError::InputNotRealised {
                drv: sd.display(input),
                output: name.clone(),
            };
            let h = hashes
                .iter()
                .find(|(n, _)| n.as_str() == name)
                .map(|(_, h)| *h)
                .ok_or_else(missing)?;
            let id = firn_derivation::DrvOutput::new(h, name.as_str());
            let r = store
                .db()
                .query_realisation(&id)
                .map_err(StoreError::from)?
                .ok_or_else(missing)?;
            work.push(r);
        }
    }
    // `Realisation::closure`.
    let mut closure: BTreeMap<firn_derivation::DrvOutput, StorePath> = BTreeMap::new();
    while let Some(r) = work.pop() {
        if closure.insert(r.id.clone(), r.out_path.clone()).is_some() {
            continue;
        }
        for dep in r.dependent_realisations.keys() {
            if closure.contains_key(dep) {
                continue;
            }
            if let Some(d) = store
                .db()
                .query_realisation(dep)
                .map_err(StoreError::from)?
            {
                work.push(d);
            }
        }
    }
    let refs = store
        .db()
        .query_references(out_path)
        .map_err(StoreError::from)?;
    Ok(closure
        .into_iter()
        .filter(|(_, p)| refs.contains(p))
        .collect())
}

/// The closures `exportReferencesGraph` asks for (Nix's `exportReferences`): each named
/// path must be in the input closure; its closure is exported, and for every
/// derivation in it, the closures of its outputs too.
fn export_references(
    store: &Store,
    drv_path: &StorePath,
    drv: &Derivation<'_>,
    input_closure: &BTreeSet<StorePath>,
) -> Result<BTreeMap<String, Vec<crate::plan::ExportedPath>>, BuildError> {
    let sd = store.store_dir();
    let requests =
        crate::plan::export_references_requests(drv).map_err(|source| BuildError::Plan {
            drv: sd.display(drv_path),
            source,
        })?;
    let mut out = BTreeMap::new();
    for req in requests {
        let mut paths = BTreeSet::new();
        for given in &req.paths {
            // `isInStore` + `toStorePath`: the store path a path lies in.
            let p = given
                .strip_prefix(sd.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                .and_then(|rest| rest.split('/').next())
                .and_then(|base| StorePath::from_base_name(base.as_bytes()).ok())
                .ok_or_else(|| BuildError::ExportNonStorePath {
                    path: given.clone(),
                })?;
            if !input_closure.contains(&p) {
                return Err(BuildError::ExportNotInInputs {
                    path: sd.display(&p),
                });
            }
            paths.extend(
                store
                    .db()
                    .query_closure(std::slice::from_ref(&p), false)
                    .map_err(StoreError::from)?,
            );
        }
        let derivations: Vec<StorePath> = paths
            .iter()
            .filter(|p| p.is_derivation())
            .cloned()
            .collect();
        for d in derivations {
            let inner = store.read_derivation(&d)?;
            let outs = inner
                .output_paths_by_name(sd)
                .map_err(|source| BuildError::Derivation {
                    drv: sd.display(&d),
                    source,
                })?;
            let outs: Vec<StorePath> = outs.into_values().collect();
            for o in &outs {
                if !store.db().is_valid_path(o).map_err(StoreError::from)? {
                    return Err(StoreError::NotValid(sd.display(o)).into());
                }
            }
            paths.extend(
                store
                    .db()
                    .query_closure(&outs, false)
                    .map_err(StoreError::from)?,
            );
        }
        let mut graph = Vec::new();
        for p in &paths {
            let info = store
                .db()
                .query_path_info(p)
                .map_err(StoreError::from)?
                .ok_or_else(|| StoreError::NotValid(sd.display(p)))?;
            let closure = store
                .db()
                .query_closure(std::slice::from_ref(p), false)
                .map_err(StoreError::from)?;
            let mut closure_size = 0;
            for q in &closure {
                closure_size += store
                    .db()
                    .query_path_info(q)
                    .map_err(StoreError::from)?
                    .map_or(0, |i| i.nar_size);
            }
            let mut references: Vec<String> =
                info.references.iter().map(|r| sd.display(r)).collect();
            references.sort();
            graph.push(crate::plan::ExportedPath {
                path: sd.display(p),
                nar_hash: format!("{}:{}", info.nar_hash.algo(), info.nar_hash.to_nixbase32()),
                nar_size: info.nar_size,
                references,
                ca: info.ca.clone(),
                closure_size,
            });
        }
        out.insert(req.name, graph);
    }
    Ok(out)
}

/// Whether `drv` builds in the sandbox: always with `sandbox = true` (where a
/// `__noChroot` derivation is refused), never with `false`, and with `relaxed` unless it
/// is fixed-output or sets `__noChroot` (Nix 2.8's `useChroot`).
fn use_sandbox(
    settings: &Settings,
    drv_shown: &str,
    drv: &Derivation<'_>,
) -> Result<bool, BuildError> {
    let no_chroot = match drv.env.get(b"__json".as_slice()) {
        Some(json) => serde_json::from_slice::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("__noChroot").and_then(|b| b.as_bool()))
            .unwrap_or(false),
        None => drv
            .env
            .get(b"__noChroot".as_slice())
            .is_some_and(|v| v.as_ref() == b"1"),
    };
    match settings.sandbox {
        SandboxMode::On if no_chroot => Err(BuildError::NoChrootNotAllowed {
            drv: drv_shown.to_owned(),
        }),
        SandboxMode::On => Ok(true),
        SandboxMode::Off => Ok(false),
        SandboxMode::Relaxed => Ok(drv.is_sandboxed() && !no_chroot),
    }
}

/// Nix's `canBuildLocally`: the derivation's `system` is this machine's or one of
/// `extra-platforms`, its `requiredSystemFeatures` are all in `system-features`, and
/// `max-jobs` is not 0 (`builtin:` builders run anywhere).
fn can_build_locally<B: Builder>(
    cx: &Context<'_, B>,
    drv_path: &StorePath,
    drv: &Derivation<'_>,
) -> Result<(), BuildError> {
    let s = cx.settings;
    let builtin = drv.builder.starts_with(b"builtin:");
    let shown = cx.store.store_dir().display(drv_path);
    if s.max_jobs.0 == 0 && !builtin {
        return Err(BuildError::NoBuildSlots { drv: shown });
    }
    let platform = String::from_utf8_lossy(&drv.platform).into_owned();
    let required = crate::platform::required_system_features(drv);
    let platform_ok = builtin || platform == s.system || s.extra_platforms.0.contains(&platform);
    let features = s.effective_system_features();
    let features_ok = required.iter().all(|f| features.contains(f));
    if platform_ok && features_ok {
        return Ok(());
    }
    let have: Vec<String> = features.into_iter().collect();
    Err(BuildError::WrongPlatform {
        drv: shown,
        platform,
        required: required.into_iter().collect(),
        system: s.system.clone(),
        have,
    })
}

/// Nix's `makeFallbackPath` for a valid output that an unsandboxed build must not
/// overwrite: `rewrite:<drv>:<output>` with a zero hash, the output's name.
fn fallback_path(sd: &firn_derivation::StoreDir, drv: &StorePath, output: &StorePath) -> StorePath {
    use firn_derivation::{Hash, HashAlgo};
    // A sha256 digest has 32 bytes: from_slice cannot refuse them.
    let zero = Hash::from_slice(HashAlgo::Sha256, &[0; 32]).unwrap_or_else(|| Hash::sha256(b""));
    sd.make_store_path(
        &format!("rewrite:{}:{}", drv.base_name(), output.base_name()),
        &zero,
        output.name(),
    )
    // The name is a valid store path name already: this cannot fail; if it did, the
    // output's own path is the safe fallback (the build then simply fails to register).
    .unwrap_or_else(|_| output.clone())
}

/// `sandbox-paths` whose source is in the store bring their closure along, as in Nix;
/// they are mounted from the store's real directory (so a store rooted elsewhere than
/// `/` works). Returns the remaining entries and the store paths.
fn sandbox_paths_in_store(
    store: &Store,
    paths: &[SandboxPath],
) -> Result<(Vec<SandboxPath>, BTreeSet<StorePath>), BuildError> {
    use std::os::unix::ffi::OsStrExt;
    let sd = store.store_dir();
    let mut rest = Vec::new();
    let mut roots = Vec::new();
    for entry in paths {
        // The store path a source lies in (`/nix/store/<hash>-<name>[/...]`).
        let in_store = entry
            .source
            .strip_prefix(sd.as_str())
            .ok()
            .and_then(|rel| rel.components().next())
            .and_then(|c| StorePath::from_base_name(c.as_os_str().as_bytes()).ok());
        match in_store {
            // The whole store path, at its own place: the closure covers it.
            Some(p)
                if entry.target == entry.source
                    && entry.source.parent() == Some(std::path::Path::new(sd.as_str())) =>
            {
                roots.push(p)
            }
            Some(p) => {
                roots.push(p);
                let rel = entry
                    .source
                    .strip_prefix(sd.as_str())
                    .unwrap_or(&entry.source);
                rest.push(SandboxPath {
                    target: entry.target.clone(),
                    source: store.real_store_dir().join(rel),
                    optional: entry.optional,
                });
            }
            None => rest.push(entry.clone()),
        }
    }
    let mut valid = Vec::new();
    for p in roots {
        match store.db().is_valid_path(&p).map_err(StoreError::from)? {
            true => valid.push(p),
            false => {
                return Err(BuildError::SandboxPathNotValid {
                    path: sd.display(&p),
                })
            }
        }
    }
    let closure = store
        .db()
        .query_closure(&valid, false)
        .map_err(StoreError::from)?;
    Ok((rest, closure))
}

//! The `Worker`: Nix's realisation loop over [`DerivationGoal`]s.
//!
//! One goal per `.drv`, shared by everything that waits on it. The loop steps the goals
//! that are ready in rounds, as Nix's worker does — each round the goals ready at its
//! start, by derivation name then path; the goals they make ready wait for the next
//! round — and files each under what its transition says it waits for ([`Next`]):
//!
//! - its input goals: it is woken when the last of them is done;
//! - a build slot: woken when a build stops (local slots are counted from the goals
//!   that are `Building`, against `max-jobs`; each machine of `builders` has its own,
//!   counted by the [`Dispatcher`]); a goal that no free machine fits and that cannot
//!   be built here is *postponed* until a build stops;
//! - a while (output locks or every build user held by someone else): retried on the
//!   next turn of the loop, at most every 100 ms;
//! - its running builder: the log descriptors of all running builds are polled
//!   together (200 ms at most), and each goal whose builder is readable or has exited
//!   is serviced.
//!
//! Without `keep-going`, the first failure stops the rest: running builders are killed
//! and the goals not done yet fail. An interrupt (the check the caller injects, e.g.
//! SIGINT/SIGTERM for the CLI or a dropped connection for a daemon client) stops every
//! build, removes what they left, and ends the run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use firn_derivation::StorePath;
use firn_store::Store;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::builder::Builder;
use crate::error::BuildError;
use crate::events::{BuildEvents, Progress};
use crate::goal::{BuildMode, Context, DerivationGoal, GoalState, Next, Wanted};
use crate::recursive::RecursiveNix;
use crate::remote::Dispatcher;
use crate::result::{BuildResult, BuildStatus};
use crate::settings::Settings;

/// How often goals waiting for a machine's slot look again while builds run here.
const SLOT_LOOK: Duration = Duration::from_secs(1);

/// Goals in Nix's order: by derivation name, then path.
type GoalKey = (String, String, StorePath);

fn key_of(p: &StorePath) -> GoalKey {
    (p.name().to_owned(), p.base_name().to_owned(), p.clone())
}

/// Drives goals to completion.
pub struct Worker<'s, B: Builder> {
    store: &'s mut Store,
    settings: Settings,
    builder: B,
    events: &'s mut dyn BuildEvents,
    interrupted: Box<dyn Fn() -> bool + 's>,
    goals: BTreeMap<StorePath, DerivationGoal<B::Build>>,
    /// Goals to step now.
    ready: BTreeSet<GoalKey>,
    /// Input goal → the goals waiting for it.
    waiting_for_input: BTreeMap<StorePath, BTreeSet<StorePath>>,
    /// Goals waiting for a build slot.
    waiting_for_slot: BTreeSet<GoalKey>,
    /// Goals waiting for output locks or a build user.
    waiting_a_while: BTreeSet<GoalKey>,
    failed: bool,
    /// The builds that were running when an interrupt stopped the run.
    interrupted_builds: Vec<StorePath>,
    /// Derivations given rather than read from the store ([`Self::give`]).
    given: BTreeMap<StorePath, firn_derivation::Derivation<'static>>,
    /// Serves the private daemon of recursive-Nix builds, if this worker has one.
    recursive: Option<Arc<dyn RecursiveNix>>,
    /// The remote machines (`builders`), read when a run starts.
    dispatcher: Dispatcher,
}

impl<B: Builder> std::fmt::Debug for Worker<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("goals", &self.goals.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<'s, B: Builder> Worker<'s, B> {
    /// A worker on `store`; `interrupted` is asked on every turn of the loop whether to
    /// stop.
    pub fn new(
        store: &'s mut Store,
        settings: Settings,
        builder: B,
        events: &'s mut dyn BuildEvents,
        interrupted: impl Fn() -> bool + 's,
    ) -> Self {
        Self {
            store,
            settings,
            builder,
            events,
            interrupted: Box::new(interrupted),
            goals: BTreeMap::new(),
            ready: BTreeSet::new(),
            waiting_for_input: BTreeMap::new(),
            waiting_for_slot: BTreeSet::new(),
            waiting_a_while: BTreeSet::new(),
            failed: false,
            interrupted_builds: Vec::new(),
            given: BTreeMap::new(),
            recursive: None,
            dispatcher: Dispatcher::default(),
        }
    }

    /// Build `drv_path` from `drv` instead of reading its `.drv` from the store (Nix's
    /// `buildDerivation` of a `BasicDerivation`: the serve protocol sends the
    /// derivation, not the file). Call before [`Self::run`].
    pub fn give(&mut self, drv_path: StorePath, drv: firn_derivation::Derivation<'static>) {
        self.given.insert(drv_path, drv);
    }

    /// Give recursive-Nix builds (`requiredSystemFeatures = ["recursive-nix"]`) their
    /// private daemon through `hook`; without one, such a build fails to start.
    pub fn with_recursive_nix(mut self, hook: Arc<dyn RecursiveNix>) -> Self {
        self.recursive = Some(hook);
        self
    }

    /// The derivations whose builds an interrupt stopped.
    pub fn interrupted_builds(&self) -> &[StorePath] {
        &self.interrupted_builds
    }

    /// The store the worker builds into.
    pub fn store(&self) -> &Store {
        self.store
    }

    /// Every goal's result so far (for `--json` and exit codes).
    pub fn results(&self) -> impl Iterator<Item = (&StorePath, &BuildResult)> {
        self.goals
            .iter()
            .filter_map(|(k, g)| g.result().map(|r| (k, r)))
    }

    fn add_goal(&mut self, drv_path: &StorePath, wanted: &Wanted) {
        match self.goals.get_mut(drv_path) {
            Some(g) => {
                // Wanting more of a goal that found everything valid: it decides again.
                if g.want(wanted) {
                    self.ready.insert(key_of(drv_path));
                }
            }
            None => {
                let mut goal = DerivationGoal::new(drv_path.clone(), wanted.clone());
                goal.given = self.given.get(drv_path).cloned().map(Box::new);
                self.goals.insert(drv_path.clone(), goal);
                self.ready.insert(key_of(drv_path));
            }
        }
    }

    /// Builds running, here or on machines.
    fn running(&self) -> usize {
        self.goals.values().filter(|g| g.is_building()).count()
    }

    /// Builds running here (taking local slots).
    fn local_running(&self) -> usize {
        self.goals
            .values()
            .filter(|g| g.is_building_locally())
            .count()
    }

    /// Whether a goal that wants a slot could get one now: a local one or a machine's.
    /// When neither can ever come (`max-jobs = 0` and no usable machine), the goal is
    /// let through to fail with the reason. (Not letting waiters through while every
    /// slot is taken keeps them from taking their locks only to wait again.)
    fn may_start(&self, local_running: usize) -> bool {
        local_running < self.settings.max_jobs.0
            || self.dispatcher.any_free()
            || (self.settings.max_jobs.0 == 0 && !self.dispatcher.any_usable())
    }

    /// Realise `tops`; returns the result of each top-level goal, in order.
    pub fn run(
        &mut self,
        tops: &[(StorePath, Wanted)],
        mode: BuildMode,
    ) -> Vec<(StorePath, BuildResult)> {
        // With `ca-derivations`, the store's realisation tables are made (as Nix makes
        // them on opening the store) and asked.
        if self.settings.ca_derivations() && !self.store.ca_derivations() {
            if let Err(e) = self.store.enable_ca_derivations() {
                let e = std::sync::Arc::new(BuildError::from(e));
                return tops
                    .iter()
                    .map(|(p, _)| {
                        let mut r = BuildResult::failure(BuildError::NotRealised);
                        r.error = Some(e.clone());
                        (p.clone(), r)
                    })
                    .collect();
            }
        }
        // The machines of `builders` (a bad entry fails every goal, naming it).
        match crate::remote::machines::read_builders(&self.settings.builders, &self.settings.system)
        {
            Ok(m) => {
                let slots = crate::remote::Slots::new(&self.store.layout().state_dir);
                self.dispatcher = Dispatcher::new(m).with_slots(slots);
            }
            Err(e) => {
                let e = std::sync::Arc::new(BuildError::from(e));
                return tops
                    .iter()
                    .map(|(p, _)| {
                        let mut r = BuildResult::failure(BuildError::NotRealised);
                        r.status = BuildStatus::MiscFailure;
                        r.error = Some(e.clone());
                        (p.clone(), r)
                    })
                    .collect();
            }
        }
        for (p, w) in tops {
            self.add_goal(p, w);
            if let Some(g) = self.goals.get_mut(p) {
                g.mode = mode;
            }
        }
        let mut last_look = std::time::Instant::now();
        loop {
            if (self.interrupted)() {
                self.stop_all(true);
                break;
            }
            let stopping = |w: &Self| w.failed && !w.settings.keep_going;
            // In rounds, as Nix's worker: the goals ready now, in order; those they make
            // ready run in the next round. (So a leaf found early builds before one found
            // deeper down: the order Nix builds in.)
            'rounds: while !stopping(self) && !self.ready.is_empty() {
                let round = std::mem::take(&mut self.ready);
                for (_, _, key) in round {
                    if stopping(self) {
                        break 'rounds;
                    }
                    self.step(&key);
                }
            }
            if stopping(self) {
                self.stop_all(false);
            }
            if tops.iter().all(|(p, _)| self.is_done(p)) {
                break;
            }
            self.report_progress();
            if self.running() > 0 {
                self.wait_for_builds();
            } else if self.ready.is_empty() {
                let no_machine_wait =
                    self.waiting_for_slot.is_empty() || self.dispatcher.is_empty();
                if self.waiting_a_while.is_empty() && no_machine_wait {
                    // Nothing can move (a bug): end rather than spin.
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let again = std::mem::take(&mut self.waiting_a_while);
            self.ready.extend(again);
            // Machine slots other processes hold come free without a sign here: those
            // waiting for a slot look again now and then (Nix: `waitForAWhile`).
            if !self.waiting_for_slot.is_empty()
                && !self.dispatcher.is_empty()
                && (self.running() == 0 || last_look.elapsed() >= SLOT_LOOK)
            {
                last_look = std::time::Instant::now();
                let slots = std::mem::take(&mut self.waiting_for_slot);
                self.ready.extend(slots);
            }
        }
        self.events.finished();
        tops.iter()
            .map(|(p, _)| match self.goals.get(p).and_then(|g| g.result()) {
                Some(r) => (p.clone(), r.clone()),
                None => (p.clone(), BuildResult::failure(BuildError::NotRealised)),
            })
            .collect()
    }

    fn is_done(&self, p: &StorePath) -> bool {
        self.goals.get(p).is_some_and(|g| g.result().is_some())
    }

    /// Step one ready goal and file it under what it waits for.
    fn step(&mut self, key: &StorePath) {
        let Some(mut goal) = self.goals.remove(key) else {
            return;
        };
        // One pass over the goals for both (this runs for every step of every goal).
        let local_running = self.local_running();
        let may_start = self.may_start(local_running);
        let next = {
            let local_slot_free = local_running < self.settings.max_jobs.0;
            let Self {
                store,
                settings,
                builder,
                events,
                goals,
                recursive,
                dispatcher,
                ..
            } = self;
            let mut cx = Context {
                store,
                settings,
                builder,
                events: &mut **events,
                recursive: recursive.as_deref(),
                dispatcher,
                local_slot_free,
            };
            let result_of = |p: &StorePath| goals.get(p).and_then(|g| g.result());
            match &goal.state {
                GoalState::Init => goal.init(&mut cx),
                GoalState::WaitingForInputs(_) => goal.inputs_done(&mut cx, result_of),
                GoalState::WaitingForResolved { .. } => goal.resolved_done(&mut cx, result_of),
                GoalState::TryToBuild { .. } if !may_start => Next::Slot,
                GoalState::TryToBuild { .. } => goal.try_to_build(&mut cx, result_of),
                GoalState::Building { .. } | GoalState::BuildingRemotely { .. } => Next::Running,
                GoalState::Done(_) => Next::Done,
            }
        };
        self.goals.insert(key.clone(), goal);
        self.file(key, next);
    }

    /// File `key` under what it waits for now.
    fn file(&mut self, key: &StorePath, next: Next) {
        match next {
            Next::Inputs(inputs) => {
                let mut pending = false;
                for (p, w) in &inputs {
                    self.add_goal(p, w);
                    if !self.is_done(p) {
                        self.waiting_for_input
                            .entry(p.clone())
                            .or_default()
                            .insert(key.clone());
                        pending = true;
                    }
                }
                if !pending {
                    self.ready.insert(key_of(key));
                }
            }
            Next::Slot => {
                // Try now if a slot is free (straight from its inputs), else wait.
                if self.may_start(self.local_running()) {
                    self.ready.insert(key_of(key));
                } else {
                    self.waiting_for_slot.insert(key_of(key));
                }
            }
            // Only a build that stops can make room.
            Next::Postpone => {
                self.waiting_for_slot.insert(key_of(key));
            }
            // A machine failed: this goal decides again now, and so do those that waited
            // for machines (one fewer may fit them now).
            Next::Retry => {
                self.ready.insert(key_of(key));
                let slots = std::mem::take(&mut self.waiting_for_slot);
                self.ready.extend(slots);
            }
            // Whoever holds them gives no sign when they are free: ask again soon.
            Next::Lock | Next::BuildUser => {
                self.waiting_a_while.insert(key_of(key));
            }
            Next::Running => {}
            Next::Done => self.goal_done(key, true),
        }
    }

    /// `key` is done: report it (unless it was stopped) and wake who waits for it.
    fn goal_done(&mut self, key: &StorePath, report: bool) {
        let Some(result) = self.goals.get(key).and_then(|g| g.result()) else {
            return;
        };
        if !result.status.success() {
            self.failed = true;
        }
        if report {
            self.events.result(key, result);
        }
        self.waiting_for_slot.remove(&key_of(key));
        if let Some(waiters) = self.waiting_for_input.remove(key) {
            for w in waiters {
                let all_done = match self.goals.get(&w).map(|g| &g.state) {
                    Some(GoalState::WaitingForInputs(loaded)) => {
                        loaded.inputs.iter().all(|(p, _)| self.is_done(p))
                    }
                    Some(GoalState::WaitingForResolved { resolved, .. }) => self.is_done(resolved),
                    _ => false,
                };
                if all_done {
                    self.ready.insert(key_of(&w));
                }
            }
        }
        // A build slot may have come free.
        let slots = std::mem::take(&mut self.waiting_for_slot);
        self.ready.extend(slots);
    }

    /// Stop every running build and end every unfinished goal: interrupted, or
    /// cancelled because a build failed (without `keep-going`).
    fn stop_all(&mut self, interrupt: bool) {
        let keys: Vec<StorePath> = self.goals.keys().cloned().collect();
        let mut stopped = Vec::new();
        for key in &keys {
            let Some(mut goal) = self.goals.remove(key) else {
                continue;
            };
            let building = goal.is_building();
            let why = match (interrupt, building) {
                (true, _) => Some(BuildError::Interrupted),
                (false, true) => Some(BuildError::Cancelled),
                // Without a running build, a goal is failed only once nothing runs.
                (false, false) => None,
            };
            if let Some(why) = why {
                let mut cx = Context {
                    store: self.store,
                    settings: &self.settings,
                    builder: &mut self.builder,
                    events: &mut *self.events,
                    recursive: self.recursive.as_deref(),
                    dispatcher: &mut self.dispatcher,
                    local_slot_free: false,
                };
                if goal.stop(&mut cx, why) {
                    stopped.push(key.clone());
                }
            }
            self.goals.insert(key.clone(), goal);
        }
        if !interrupt && self.running() == 0 {
            // Everything left waits on a failure: mark it so.
            for goal in self.goals.values_mut() {
                if goal.result().is_none() {
                    goal.state =
                        GoalState::Done(BuildResult::failure(BuildError::CancelledByFailure));
                }
            }
        }
        if interrupt {
            self.interrupted_builds.extend(stopped);
        }
        self.ready.clear();
        self.waiting_for_slot.clear();
        self.waiting_a_while.clear();
        self.waiting_for_input.clear();
    }

    /// Poll every running build's log; service those that are readable or done.
    fn wait_for_builds(&mut self) {
        let keys: Vec<StorePath> = self
            .goals
            .iter()
            .filter(|(_, g)| g.is_building())
            .map(|(k, _)| k.clone())
            .collect();
        let ready: Vec<bool> = {
            // Which goal each polled descriptor is; a goal without one (its output
            // ended, it has not exited yet) is looked at on a short timer.
            let mut polled: Vec<usize> = Vec::with_capacity(keys.len());
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(keys.len());
            for (i, k) in keys.iter().enumerate() {
                if let Some(fd) = self.goals.get(k).and_then(|g| g.log_fd()) {
                    polled.push(i);
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                }
            }
            let timeout: u16 = match fds.len() < keys.len() {
                true => 10,
                false => 200,
            };
            let _ = poll(&mut fds, PollTimeout::from(timeout));
            let mut ready = vec![false; keys.len()];
            for (i, p) in polled.into_iter().zip(&fds) {
                ready[i] = p.revents().is_some_and(|r| !r.is_empty());
            }
            ready
        };
        for (key, readable) in keys.iter().zip(ready) {
            let Some(mut goal) = self.goals.remove(key) else {
                continue;
            };
            let next = {
                let mut cx = Context {
                    store: self.store,
                    settings: &self.settings,
                    builder: &mut self.builder,
                    events: &mut *self.events,
                    recursive: self.recursive.as_deref(),
                    dispatcher: &mut self.dispatcher,
                    local_slot_free: false,
                };
                match goal.state {
                    GoalState::BuildingRemotely { .. } => goal.service_remote(&mut cx, readable),
                    _ => goal.service(&mut cx, readable),
                }
            };
            self.goals.insert(key.clone(), goal);
            self.file(key, next);
        }
    }

    /// `[done/running/total] building a, b: last line`, through the events.
    fn report_progress(&mut self) {
        let mut p = Progress::default();
        for g in self.goals.values() {
            match &g.state {
                GoalState::Done(r) if r.status == BuildStatus::AlreadyValid => continue,
                GoalState::Done(_) => p.done += 1,
                GoalState::Building { .. } | GoalState::BuildingRemotely { .. } => {
                    p.running.push(g.drv_path.clone());
                    if let Some(l) = g.last_log_line() {
                        p.last_line = l.to_owned();
                    }
                }
                GoalState::Init => continue,
                _ => {}
            }
            p.total += 1;
        }
        self.events.progress(&p);
    }
}

//! A goal's remote build (Nix's `tryBuildHook` and the hook's work): choose a machine
//! of `builders` ([`crate::remote::Dispatcher`]), start a [`RemoteBuild`] there, follow
//! its log as a local build's, and when it is over take its outputs (imported by the
//! remote build, under this goal's output locks) or its failure. A machine that fails
//! (unreachable, connection lost, no serve protocol) is disabled for the rest of the run
//! and the goal decides again ([`Next::Retry`]): another machine, or here.

use std::collections::BTreeSet;

use firn_derivation::{Derivation, OutputName, StorePath};
use firn_protocol::serve::BuildSettings;
use firn_protocol::BasicDerivation;
use firn_store::lock::PathLocks;

use super::{unix_now, BuildMode, Context, DerivationGoal, GoalState, Loaded, Next};
use crate::builder::{Builder, RunningBuild};
use crate::error::BuildError;
use crate::events::Message;
use crate::log::BuildLog;
use crate::remote::ssh::SshStore;
use crate::remote::{RemoteBuild, RemoteDone, RemoteError, RemoteJob, Reserved, SlotLock};
use crate::result::{BuildResult, BuildStatus};

/// A build running on a machine, and what the goal holds meanwhile.
#[derive(Debug)]
pub struct RemoteBuilding {
    /// The machine's index in the dispatcher, and its store URI.
    machine: usize,
    uri: String,
    remote: RemoteBuild,
    log: BuildLog,
    /// The output locks: the remote build imports the outputs under them.
    locks: PathLocks,
    start_time: u64,
    /// Outputs valid here before the build: never touched.
    valid: BTreeSet<OutputName>,
    eof: bool,
    /// The machine's slot (Nix's `current-load` lock file), held while it builds.
    _slot: Option<SlotLock>,
    /// "building '…' on '…'" was said (once connected).
    announced: bool,
}

impl RemoteBuilding {
    pub fn log_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.remote.log_fd()
    }

    pub fn last_line(&self) -> Option<&str> {
        self.log.last_line()
    }
}

/// What [`DerivationGoal::try_remote`] did.
pub(super) enum Tried {
    /// Started on a machine, or failed: the goal's next step.
    Done(Next),
    /// Every machine that fits is busy and it cannot be built here: wait.
    Postponed(Box<Loaded>),
    /// No machine takes it: build it here, with the locks.
    Declined(Box<Loaded>, PathLocks),
}

/// `preferLocalBuild = true` (as an attribute or in `__json`).
pub(super) fn prefer_local_build(drv: &Derivation<'_>) -> bool {
    match drv.env.get(b"__json".as_slice()) {
        Some(json) => serde_json::from_slice::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("preferLocalBuild").and_then(|b| b.as_bool()))
            .unwrap_or(false),
        None => drv
            .env
            .get(b"preferLocalBuild".as_slice())
            .is_some_and(|v| v.as_ref() == b"1"),
    }
}

impl<R: RunningBuild> DerivationGoal<R> {
    /// Choose a machine and start the build there; a machine that cannot be started on
    /// is disabled and the choice made again.
    pub(super) fn try_remote<'r, B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        loaded: Box<Loaded>,
        mut locks: PathLocks,
        valid: &BTreeSet<OutputName>,
        result: &impl Fn(&StorePath) -> Option<&'r BuildResult>,
        here: bool,
    ) -> Tried {
        // Outputs known only once built come back as realisations, found by their
        // ids: without an id for each (no output hashes), it is built here.
        if loaded
            .unknown
            .iter()
            .any(|n| loaded.drv_output(n).is_none())
        {
            return Tried::Declined(loaded, locks);
        }
        let system = String::from_utf8_lossy(&loaded.drv.platform).into_owned();
        let required = crate::platform::required_system_features(&loaded.drv);
        loop {
            let (i, slot) =
                match cx
                    .dispatcher
                    .reserve(&system, &required, here && cx.local_slot_free)
                {
                    Reserved::Machine(i, slot) => (i, slot),
                    Reserved::Postpone => {
                        drop(locks);
                        return Tried::Postponed(loaded);
                    }
                    Reserved::Decline => return Tried::Declined(loaded, locks),
                };
            match self.start_remote(cx, &loaded, i, valid, result) {
                Ok((remote, log, uri)) => {
                    cx.dispatcher.started(i);
                    self.state = GoalState::BuildingRemotely {
                        loaded,
                        build: Box::new(RemoteBuilding {
                            machine: i,
                            uri,
                            remote,
                            log,
                            locks,
                            start_time: unix_now(),
                            valid: valid.clone(),
                            eof: false,
                            _slot: slot,
                            announced: false,
                        }),
                    };
                    return Tried::Done(Next::Running);
                }
                Err(StartError::Machine(e)) => {
                    let uri = cx.dispatcher.machine(i).store_uri.clone();
                    let why = e.to_string();
                    cx.events.message(Message::MachineFailed {
                        machine: &uri,
                        why: &why,
                    });
                    cx.dispatcher.disable(i, why);
                }
                Err(StartError::Build(e)) => {
                    locks.set_deletion(true);
                    return Tried::Done(self.fail(e));
                }
            }
        }
    }

    fn start_remote<'r, B: Builder<Build = R>>(
        &self,
        cx: &mut Context<'_, B>,
        loaded: &Loaded,
        machine: usize,
        valid: &BTreeSet<OutputName>,
        result: &impl Fn(&StorePath) -> Option<&'r BuildResult>,
    ) -> Result<(RemoteBuild, BuildLog, String), StartError> {
        let m = cx.dispatcher.machine(machine);
        let uri = m.store_uri.clone();
        let ssh = SshStore::of_machine(m).map_err(|e| StartError::Machine(e.into()))?;
        let sd = cx.store.store_dir().clone();
        let shown = sd.display(&self.drv_path);
        let inputs = self.input_closure(cx.store, loaded, result)?;
        let mut drv = BasicDerivation::from_derivation(&sd, &loaded.drv).map_err(|source| {
            BuildError::Derivation {
                drv: shown.clone(),
                source,
            }
        })?;
        // As build-remote: the whole input closure as sources when there are input
        // derivations (the remote has no `.drv`s of them), else as written (changing
        // them would change a content-addressed derivation's output ids).
        if !loaded.drv.input_drvs.is_empty() {
            drv.input_srcs = inputs.clone();
        }
        let mut outputs = BTreeSet::new();
        let mut floating = std::collections::BTreeMap::new();
        for (n, p) in loaded.outputs.iter().filter(|(n, _)| !valid.contains(*n)) {
            if loaded.unknown.contains(n) {
                if let Some(id) = loaded.drv_output(n) {
                    floating.insert(n.clone(), id);
                }
                continue;
            }
            // Leftovers of an interrupted build at an invalid output path go.
            let real = cx.store.real_path(p);
            firn_store::canonical::delete_path(&real)
                .map_err(|source| BuildError::Io { path: real, source })?;
            outputs.insert(p.clone());
        }
        let s = cx.settings;
        let secs = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_secs());
        let job = RemoteJob {
            layout: cx.store.layout().clone(),
            auto_optimise: s.auto_optimise_store,
            ssh,
            sshopts: std::env::var("NIX_SSHOPTS").unwrap_or_default(),
            control_dir: cx.dispatcher.control_dir(),
            drv_path: self.drv_path.clone(),
            drv,
            inputs,
            outputs,
            floating,
            settings: BuildSettings {
                max_silent_time: secs(s.max_silent_time.0),
                build_timeout: secs(s.timeout.0),
                max_log_size: s.max_build_log_size.0.unwrap_or(0),
                build_repeat: 0,
                enforce_determinism: false,
                keep_failed: s.keep_failed,
            },
            use_substitutes: s.builders_use_substitutes,
        };
        let log_path = crate::log::log_path(&cx.store.layout().log_dir, &self.drv_path);
        let log =
            BuildLog::with_tail(log_path.clone(), s.log_lines as usize).map_err(|source| {
                BuildError::Io {
                    path: log_path,
                    source,
                }
            })?;
        let remote = RemoteBuild::start(job).map_err(|e| match e.is_machine_failure() {
            true => StartError::Machine(e),
            false => StartError::Build(BuildError::Remote {
                drv: shown.clone(),
                machine: uri.clone(),
                source: Box::new(e),
            }),
        })?;
        Ok((remote, log, uri))
    }

    /// `BuildingRemotely`: read the log (`readable`), enforce the time and log limits
    /// here too, and finish once the remote build is over.
    pub fn service_remote<B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        readable: bool,
    ) -> Next {
        let sd = cx.store.store_dir().clone();
        let GoalState::BuildingRemotely { build, .. } = &mut self.state else {
            return Next::Done;
        };
        announce(build, &self.drv_path, cx);
        let mut buf = vec![0u8; 65536];
        if readable && !build.eof {
            read_some(build, &mut buf, &self.drv_path, cx);
        }
        let killed = super::limit_hit(&build.log, cx.settings, || sd.display(&self.drv_path));
        if let Some(e) = killed {
            build.remote.kill();
            return self.finish_remote(cx, Err(e));
        }
        let Some(outcome) = build.remote.try_finish() else {
            return Next::Running;
        };
        // ssh has exited: the rest of its output is in the pipe.
        while !build.eof {
            read_some(build, &mut buf, &self.drv_path, cx);
        }
        self.finish_remote(cx, Ok(outcome))
    }

    fn finish_remote<B: Builder<Build = R>>(
        &mut self,
        cx: &mut Context<'_, B>,
        outcome: Result<Result<RemoteDone, RemoteError>, BuildError>,
    ) -> Next {
        let GoalState::BuildingRemotely { loaded, build } =
            std::mem::replace(&mut self.state, GoalState::Init)
        else {
            return Next::Done;
        };
        let RemoteBuilding {
            machine,
            uri,
            remote,
            mut log,
            mut locks,
            start_time,
            valid,
            ..
        } = *build;
        drop(remote);
        cx.dispatcher.finished(machine);
        let _ = log.finish();
        let sd = cx.store.store_dir().clone();
        let shown = sd.display(&self.drv_path);
        // The outputs built there: the known ones that were not valid, and the paths of
        // the floating ones from the realisations.
        let mut finals: std::collections::BTreeMap<OutputName, StorePath> = loaded
            .known_outputs()
            .into_iter()
            .filter(|(n, _)| !valid.contains(n))
            .collect();
        let outcome: Result<(), BuildError> = match outcome {
            Err(e) => Err(e),
            Ok(Ok(done)) if done.result.status.is_success() => {
                finals.extend(done.realisations.into_iter().map(|(n, r)| (n, r.out_path)));
                // Every output must be valid now (imported, or valid there and here).
                let missing = loaded
                    .known_outputs()
                    .into_values()
                    .chain(finals.values().cloned())
                    .find(|p| !matches!(cx.store.db().is_valid_path(p), Ok(true)));
                match missing {
                    None => super::register_realisations(cx.store, cx.settings, &loaded, &finals),
                    Some(p) => Err(BuildError::Remote {
                        drv: shown.clone(),
                        machine: uri.clone(),
                        source: Box::new(RemoteError::MissingOutput {
                            path: sd.display(&p),
                        }),
                    }),
                }
            }
            Ok(Ok(done)) => Err(BuildError::RemoteFailed {
                drv: shown.clone(),
                machine: uri.clone(),
                status: done.result.status,
                msg: strip_ansi(&done.result.error_msg),
            }),
            Ok(Err(e)) if e.is_machine_failure() => {
                // The machine failed, not the build: elsewhere, or here.
                let last = log.tail().filter(|l| !l.trim().is_empty()).last();
                let why = match last {
                    Some(l) => format!("{e}: {}", l.trim()),
                    None => e.to_string(),
                };
                cx.events.message(Message::MachineFailed {
                    machine: &uri,
                    why: &why,
                });
                cx.dispatcher.disable(machine, why);
                self.remove_invalid_outputs(cx, &loaded, &valid);
                drop(locks);
                self.state = GoalState::TryToBuild {
                    loaded,
                    said_waiting_lock: false,
                    said_waiting_user: false,
                };
                return Next::Retry;
            }
            Ok(Err(e)) => Err(BuildError::Remote {
                drv: shown.clone(),
                machine: uri.clone(),
                source: Box::new(e),
            }),
        };
        let mut outputs = loaded.known_outputs();
        if outcome.is_ok() {
            outputs.extend(finals);
        }
        let outcome = outcome.and_then(|()| self.run_post_build_hook(cx, &outputs));
        match &outcome {
            Ok(()) => locks.set_deletion(true),
            Err(_) => self.remove_invalid_outputs(cx, &loaded, &valid),
        }
        drop(locks);
        let (status, error) = match outcome {
            Ok(()) => (BuildStatus::Built, None),
            Err(e) => (e.status(), Some(std::sync::Arc::new(e))),
        };
        self.done(super::ran(
            (status, error),
            outputs,
            start_time,
            &log,
            cx.settings.log_lines,
            None,
        ))
    }

    /// Stop a remote build (interrupt, or another build failed): kill it and remove
    /// what it left at the output paths.
    pub(super) fn stop_remote<B: Builder<Build = R>>(
        &self,
        cx: &mut Context<'_, B>,
        loaded: &Loaded,
        build: RemoteBuilding,
    ) {
        let RemoteBuilding {
            machine,
            mut remote,
            mut log,
            valid,
            ..
        } = build;
        remote.kill();
        cx.dispatcher.finished(machine);
        let _ = log.finish();
        self.remove_invalid_outputs(cx, loaded, &valid);
    }

    /// Nothing of a build that did not finish stays at the output paths it may touch.
    fn remove_invalid_outputs<B: Builder<Build = R>>(
        &self,
        cx: &mut Context<'_, B>,
        loaded: &Loaded,
        valid: &BTreeSet<OutputName>,
    ) {
        if self.mode == BuildMode::Check {
            return;
        }
        for (_, p) in loaded.outputs.iter().filter(|(n, _)| !valid.contains(*n)) {
            if let Ok(false) = cx.store.db().is_valid_path(p) {
                let _ = firn_store::canonical::delete_path(&cx.store.real_path(p));
            }
        }
    }
}

/// Why a remote build did not start.
enum StartError {
    /// The machine's fault: try another.
    Machine(RemoteError),
    Build(BuildError),
}

impl From<BuildError> for StartError {
    fn from(e: BuildError) -> Self {
        Self::Build(e)
    }
}

/// Say that the build runs on its machine, once the machine answered.
fn announce<B: Builder>(build: &mut RemoteBuilding, drv: &StorePath, cx: &mut Context<'_, B>) {
    if build.announced || !build.remote.connected() {
        return;
    }
    build.announced = true;
    cx.events.build_started(crate::events::BuildStarted {
        drv,
        sandboxed: false,
        checking: false,
        repairing: false,
        machine: Some(&build.uri),
    });
}

/// Nix's messages carry colours (`ANSI_*`); in a message of ours they are noise.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn read_some<B: Builder>(
    build: &mut RemoteBuilding,
    buf: &mut [u8],
    drv: &StorePath,
    cx: &mut Context<'_, B>,
) {
    match build.remote.read_log(buf) {
        Ok(0) | Err(_) => build.eof = true,
        Ok(n) => {
            let _ = build.log.write(&buf[..n]);
            cx.events.build_log(drv, &buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_of_a_remote_message_are_removed() {
        assert_eq!(
            strip_ansi("builder for '\u{1b}[35;1m/nix/store/x.drv\u{1b}[0m' failed"),
            "builder for '/nix/store/x.drv' failed"
        );
        assert_eq!(strip_ansi("plain [text]"), "plain [text]");
    }
}

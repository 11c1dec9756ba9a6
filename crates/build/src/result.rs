//! The result of a goal: Nix's `BuildResult` — its status, the error that caused it,
//! the outputs, times and log — and the exit status Nix derives from a set of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use firn_derivation::{OutputName, StorePath};

use crate::error::BuildError;

/// How a goal ended (Nix's `BuildResult::Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Built,
    AlreadyValid,
    /// Every wanted output was fetched from a binary cache.
    Substituted,
    PermanentFailure,
    /// A fixed-output derivation's builder failed (Nix: not worth remembering, and no
    /// build-failure exit status).
    TransientFailure,
    TimedOut,
    OutputRejected,
    HashMismatch,
    DependencyFailed,
    MiscFailure,
    LogLimitExceeded,
    /// The builder could not be given what it needs (a bad `exportReferencesGraph`).
    InputRejected,
    /// `--check` found different output.
    NotDeterministic,
}

impl BuildStatus {
    pub fn success(self) -> bool {
        matches!(self, Self::Built | Self::AlreadyValid | Self::Substituted)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Built => "Built",
            Self::AlreadyValid => "AlreadyValid",
            Self::Substituted => "Substituted",
            Self::PermanentFailure => "PermanentFailure",
            Self::TransientFailure => "TransientFailure",
            Self::TimedOut => "TimedOut",
            Self::OutputRejected => "OutputRejected",
            Self::HashMismatch => "HashMismatch",
            Self::DependencyFailed => "DependencyFailed",
            Self::MiscFailure => "MiscFailure",
            Self::LogLimitExceeded => "LogLimitExceeded",
            Self::InputRejected => "InputRejected",
            Self::NotDeterministic => "NotDeterministic",
        }
    }
}

/// The result of one goal.
#[derive(Debug, Clone)]
pub struct BuildResult {
    pub status: BuildStatus,
    /// Why it failed (shared: a result is handed to several waiters).
    pub error: Option<Arc<BuildError>>,
    /// All outputs of the derivation, by name.
    pub outputs: BTreeMap<OutputName, StorePath>,
    pub start_time: u64,
    pub stop_time: u64,
    pub log: Option<PathBuf>,
    /// The last lines of the build's log (`log-lines`), for the error message.
    pub log_tail: Vec<String>,
    /// What the build used, where its cgroup told (Nix HEAD's `cpuUser`, `cpuSystem`).
    pub usage: Option<crate::builder::cgroup::Usage>,
}

impl BuildResult {
    pub fn failure(error: BuildError) -> Self {
        Self {
            status: error.status(),
            error: Some(Arc::new(error)),
            outputs: BTreeMap::new(),
            start_time: 0,
            stop_time: 0,
            log: None,
            log_tail: Vec::new(),
            usage: None,
        }
    }

    /// Every wanted output was valid: nothing was built.
    pub fn already_valid(outputs: BTreeMap<OutputName, StorePath>) -> Self {
        Self {
            status: BuildStatus::AlreadyValid,
            error: None,
            outputs,
            start_time: 0,
            stop_time: 0,
            log: None,
            log_tail: Vec::new(),
            usage: None,
        }
    }
}

impl BuildResult {
    /// Every wanted output was fetched from a binary cache: nothing was built.
    pub fn substituted(outputs: BTreeMap<OutputName, StorePath>) -> Self {
        Self {
            status: BuildStatus::Substituted,
            ..Self::already_valid(outputs)
        }
    }
}

/// Nix's exit status for a set of results: 0 if all succeeded, else 0x60 | bits
/// (0x04 build failure, 0x01 timeout, 0x02 hash mismatch — the last two come with 0x04,
/// as observed: 101 and 102 —, 0x08 not deterministic), or 1 if no bit applies.
pub fn exit_status(results: &[&BuildResult]) -> u8 {
    let mut mask = 0u8;
    let mut failed = false;
    for r in results {
        match r.status {
            BuildStatus::Built | BuildStatus::AlreadyValid | BuildStatus::Substituted => {}
            // Nix 2.8 marks an input rejected in `startBuilder` a permanent failure too.
            BuildStatus::PermanentFailure | BuildStatus::InputRejected => mask |= 0x04,
            BuildStatus::TimedOut => mask |= 0x04 | 0x01,
            BuildStatus::NotDeterministic => mask |= 0x08,
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

impl BuildError {
    /// Nix's status for a goal that failed this way.
    pub fn status(&self) -> BuildStatus {
        match self {
            Self::DependenciesFailed { .. } | Self::CancelledByFailure => {
                BuildStatus::DependencyFailed
            }
            Self::LogLimit { .. } => BuildStatus::LogLimitExceeded,
            Self::ExportNonStorePath { .. }
            | Self::ExportNotInInputs { .. }
            | Self::Plan {
                source: crate::plan::PlanError::ExportOddTokens(_),
                ..
            } => BuildStatus::InputRejected,
            Self::TimedOut { .. } | Self::Silent { .. } => BuildStatus::TimedOut,
            Self::BuilderFailed { .. }
            | Self::BuilderNotFound { .. }
            | Self::MemoryLimit { .. }
            | Self::ProcessLimit { .. } => BuildStatus::PermanentFailure,
            Self::Outputs(e) if e.is_hash_mismatch() => BuildStatus::HashMismatch,
            Self::Outputs(_) => BuildStatus::OutputRejected,
            Self::NotDeterministic { .. } => BuildStatus::NotDeterministic,
            Self::RemoteFailed { status, msg, .. } => BuildStatus::from_remote(*status, msg),
            _ => BuildStatus::MiscFailure,
        }
    }
}

impl BuildStatus {
    /// The status a remote machine reported (serve BuildDerivation). Nix 2.8 carries a
    /// fixed output's hash mismatch as `OutputRejected`; its message tells it apart.
    pub fn from_remote(s: firn_protocol::BuildStatus, msg: &str) -> Self {
        use firn_protocol::BuildStatus as W;
        match s {
            W::Built => Self::Built,
            W::Substituted => Self::Substituted,
            W::AlreadyValid | W::ResolvesToAlreadyValid => Self::AlreadyValid,
            W::PermanentFailure | W::CachedFailure => Self::PermanentFailure,
            W::InputRejected => Self::InputRejected,
            W::OutputRejected if msg.contains("hash mismatch") => Self::HashMismatch,
            W::OutputRejected => Self::OutputRejected,
            W::TransientFailure => Self::TransientFailure,
            W::TimedOut => Self::TimedOut,
            W::MiscFailure | W::NoSubstituters => Self::MiscFailure,
            W::DependencyFailed => Self::DependencyFailed,
            W::LogLimitExceeded => Self::LogLimitExceeded,
            W::NotDeterministic => Self::NotDeterministic,
        }
    }
}

//! Why a goal failed: [`BuildError`], carried in its [`crate::result::BuildResult`] up to
//! the CLI (or a daemon client), which alone turns it into a line and an exit code.
//! Each variant knows its Nix `BuildResult::Status` (`BuildError::status`, in
//! `result.rs`). Paths are
//! carried as the store shows them (`/nix/store/…`), since the store directory is the
//! store's, not the error's.

use std::io;
use std::path::PathBuf;

use firn_store::StoreError;
use thiserror::Error;

use crate::builder::ExecError;
use crate::outputs::OutputError;

/// How a builder process ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuilderExit {
    Code(i32),
    Signal(i32),
    Unknown,
}

impl std::fmt::Display for BuilderExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "failed with exit code {c}"),
            Self::Signal(s) => write!(f, "failed due to signal {s}"),
            Self::Unknown => f.write_str("failed"),
        }
    }
}

/// How Nix's `statusToString` words a program's end (for programs other than builders).
fn program_status(exit: &BuilderExit) -> String {
    match exit {
        BuilderExit::Code(c) => format!("failed with exit code {c}"),
        BuilderExit::Signal(s) => format!("killed by signal {s}"),
        BuilderExit::Unknown => "died abnormally".to_owned(),
    }
}

#[derive(Debug, Error)]
pub enum BuildError {
    /// Paths (not derivations) to realise that no substituter has.
    #[error("path '{paths}' is required, but there is no substituter that can build it")]
    NoSubstituter { paths: String },
    /// Fetching `path` (the outputs of a derivation) from a binary cache failed.
    #[error(
        "substituting '{path}' failed (use '--option fallback true' to build it instead): {source}"
    )]
    Substitution {
        path: String,
        source: Box<firn_cache::CacheError>,
    },
    /// The `.drv` is neither valid nor readable.
    #[error("cannot build missing derivation '{drv}'")]
    MissingDerivation { drv: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The derivation's output paths cannot be computed.
    #[error("derivation '{drv}': {source}")]
    Derivation {
        drv: String,
        source: firn_derivation::DerivationError,
    },
    #[error("derivation '{drv}' does not have wanted outputs '{output}'")]
    NoSuchOutput { drv: String, output: String },
    #[error("some outputs of '{drv}' are not valid, so checking is not possible")]
    CheckNotPossible { drv: String },
    #[error("--check needs the sandbox: the rebuilt outputs go to its private store")]
    CheckNeedsSandbox,
    #[error("{count} dependenc{} of derivation '{drv}' failed to build", if *count == 1 { "y" } else { "ies" })]
    DependenciesFailed { drv: String, count: usize },
    /// Without `keep-going`, a goal that had not finished when another failed.
    #[error("cancelled because another build failed")]
    CancelledByFailure,
    /// A build that was running when another failed.
    #[error("cancelled")]
    Cancelled,
    #[error("interrupted")]
    Interrupted,
    /// Nix's `canBuildLocally` said no.
    #[error("a '{platform}' with features {{{}}} is required to build '{drv}', but I am a '{system}' with features {{{}}}", required.join(", "), have.join(", "))]
    WrongPlatform {
        drv: String,
        platform: String,
        required: Vec<String>,
        system: String,
        have: Vec<String>,
    },
    /// `max-jobs = 0` and no remote builder.
    #[error("unable to start any build; either increase '--max-jobs' or enable remote builds.")]
    NoBuildSlots { drv: String },
    #[error(
        "derivation '{drv}' has '__noChroot' set, but that's not allowed when 'sandbox' is 'true'"
    )]
    NoChrootNotAllowed { drv: String },
    #[error("'exportReferencesGraph' contains a non-store path '{path}'")]
    ExportNonStorePath { path: String },
    #[error("cannot export references of path '{path}' because it is not in the input closure of the derivation")]
    ExportNotInInputs { path: String },
    #[error("sandbox-paths: '{path}' is not a valid store path")]
    SandboxPathNotValid { path: String },
    /// The plan could not be made.
    #[error("derivation '{drv}': {source}")]
    Plan {
        drv: String,
        source: crate::plan::PlanError,
    },
    /// The sandboxed builder could not be started (set-up steps name themselves).
    #[error("cannot start the sandboxed builder for '{drv}': {source}")]
    SandboxStart { drv: String, source: ExecError },
    /// The builder program is not in the sandbox.
    #[error("builder for '{drv}' failed: the sandbox has no '{program}' (a build sees only its inputs and the sandbox-paths: add it to sandbox-paths, e.g. --option sandbox-paths {program}=/bin/busybox)")]
    BuilderNotFound { drv: String, program: String },
    /// Starting an unsandboxed builder, or a build user.
    #[error(transparent)]
    Exec(ExecError),
    #[error("building '{drv}' killed after writing more than {max} bytes of log output")]
    LogLimit { drv: String, max: u64 },
    #[error("building '{drv}' timed out after {secs} seconds")]
    TimedOut { drv: String, secs: u64 },
    #[error("building '{drv}' timed out after {secs} seconds of silence")]
    Silent { drv: String, secs: u64 },
    #[error("builder for '{drv}' {exit}")]
    BuilderFailed { drv: String, exit: BuilderExit },
    /// The kernel killed a process of the build at `build-memory-max`.
    #[error("builder for '{drv}' {exit}: it ran out of memory at build-memory-max = {max} bytes")]
    MemoryLimit {
        drv: String,
        exit: BuilderExit,
        max: u64,
    },
    /// A fork of the build failed at `build-pids-max`.
    #[error("builder for '{drv}' {exit}: it reached build-pids-max = {max} processes")]
    ProcessLimit {
        drv: String,
        exit: BuilderExit,
        max: u64,
    },
    #[error(transparent)]
    Outputs(#[from] OutputError),
    /// Reading or writing the build's log or outputs.
    #[error("{path}: {}", firn_store::error::strerror(source))]
    Io { path: PathBuf, source: io::Error },
    #[error("derivation '{drv}' may not be deterministic: output '{output}' differs")]
    NotDeterministic { drv: String, output: String },
    /// The `post-build-hook` could not be started.
    #[error("executing '{hook}': {}", firn_store::error::strerror(source))]
    PostBuildHookStart { hook: String, source: io::Error },
    /// The `post-build-hook` failed (the outputs stay registered).
    #[error("program '{hook}' {}", program_status(exit))]
    PostBuildHookFailed { hook: String, exit: BuilderExit },
    /// A top-level goal the worker never finished (a bug, reported, not a panic).
    #[error("not realised")]
    NotRealised,
    /// The derivation needs an experimental feature that is not enabled (Nix's
    /// `MissingExperimentalFeature`).
    #[error("experimental Nix feature '{feature}' is disabled; use '--extra-experimental-features {feature}' to override")]
    MissingFeature { feature: &'static str },
    /// A recursive-Nix build, but this worker was given no server for its socket.
    #[error(
        "cannot build '{drv}': recursive Nix is not available here (no daemon to serve its socket)"
    )]
    NoRecursiveNix { drv: String },
    /// The private daemon of a recursive-Nix build could not be started.
    #[error("cannot start the recursive Nix daemon of '{drv}' at '{}': {source}", socket.display())]
    RecursiveNixStart {
        drv: String,
        socket: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The hashes standing for the outputs (`staticOutputHashes`) cannot be computed.
    #[error("cannot compute the output hashes of '{drv}': {msg}")]
    OutputHashes { drv: String, msg: String },
    /// Resolving a derivation with content-addressed inputs failed.
    #[error("cannot resolve derivation '{drv}': {source}")]
    Resolve {
        drv: String,
        source: firn_derivation::ResolveError,
    },
    #[error("pure derivation '{drv}' depends on impure derivation '{input}'")]
    DependsOnImpure { drv: String, input: String },
    /// The remote machine's build failed: its status (as the protocol carried it) and
    /// message.
    #[error("build of '{drv}' on '{machine}' failed: {msg}")]
    RemoteFailed {
        drv: String,
        machine: String,
        status: firn_protocol::BuildStatus,
        msg: String,
    },
    /// A remote build that came back wrong (an output that does not import, …).
    #[error("build of '{drv}' on '{machine}' failed: {source}")]
    Remote {
        drv: String,
        machine: String,
        source: Box<crate::remote::RemoteError>,
    },
    /// `max-jobs = 0` and no machine can take the build.
    #[error("cannot build '{drv}': max-jobs is 0 and no remote machine can take it ({})", machines.join("; "))]
    NoMachine { drv: String, machines: Vec<String> },
    /// The `builders` setting cannot be read.
    #[error("{0}")]
    Machines(#[from] crate::remote::MachinesError),
    /// An input output whose realisation is not known (`drvOutputReferences`).
    #[error("output '{output}' of derivation '{drv}' isn't realised")]
    InputNotRealised { drv: String, output: String },
}

//! Builders: what runs a derivation's builder once the goal has decided to build.
//!
//! The worker drives every build through the [`Builder`] trait: take a build user
//! ([`Builder::acquire_user`]: one was free, all are busy — wait —, or none are
//! configured), [`Builder::start`] a [`BuildJob`], poll the [`RunningBuild`]'s log
//! descriptor together with every other build's, read its output, reap or kill it,
//! [`Builder::collect_outputs`] (move what the builder made to the output paths) and
//! [`Builder::release`] it (build directory, sandbox root). Implementations:
//!
//! - [`local::LocalBuilder`]: this machine, in the sandbox ([`sandbox`]) or, with
//!   `sandbox = false`, as a build user in a private mount namespace;
//! - `processes` (crate-private): the processes of a local build firn waits for;
//! - `sys` (crate-private): every `unsafe` of the crate, the system calls made
//!   between fork and exec as small safe wrappers;
//! - tests use a fake builder (`crates/build/tests/worker.rs`), so the goal and worker
//!   logic is tested without root.

pub mod build_dirs;
pub mod build_user;
pub mod cgroup;
pub mod error;
pub mod local;
mod processes;
pub mod sandbox;
#[allow(unsafe_code)]
pub(crate) mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use firn_derivation::{Derivation, OutputName, StorePath};

use crate::plan::BuildPlan;
use crate::recursive::AllowedPaths;

pub use build_user::{AcquiredUser, BuildUser, BuildUsers};
pub use error::ExecError;

/// A `sandbox-paths` entry: a host path mounted read-only into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath {
    /// Where the builder sees it.
    pub target: PathBuf,
    /// The host path.
    pub source: PathBuf,
    /// Skipped when the source does not exist (an entry ending in `?`).
    pub optional: bool,
}

/// A build's temporary directory: where it is on the host and where the builder sees
/// it (`/build` in the sandbox). Removed on drop unless a started build took it over.
#[derive(Debug)]
pub struct BuildDir {
    real: PathBuf,
    seen: PathBuf,
    /// Whether drop removes it.
    owned: bool,
}

impl BuildDir {
    pub fn new(real: PathBuf, seen: PathBuf) -> Self {
        Self {
            real,
            seen,
            owned: true,
        }
    }

    pub fn real(&self) -> &Path {
        &self.real
    }

    /// The directory as the builder sees it (what the plan names).
    pub fn seen(&self) -> &Path {
        &self.seen
    }

    /// Hand the directory over to a running build: dropping this no longer removes it.
    pub fn into_real(mut self) -> PathBuf {
        self.owned = false;
        std::mem::take(&mut self.real)
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if self.owned {
            let _ = firn_store::canonical::delete_path(&self.real);
        }
    }
}

/// What to build: everything a builder needs from the goal.
#[derive(Debug)]
pub struct BuildJob<'a> {
    pub drv_path: &'a StorePath,
    pub drv: &'a Derivation<'a>,
    /// What to run ([`crate::plan::plan`] for [`BuildJob::build_dir`]).
    pub plan: &'a BuildPlan,
    /// From [`Builder::build_dir`].
    pub build_dir: BuildDir,
    /// The closure of the inputs (and of the `sandbox-paths` in the store), which the
    /// sandbox makes visible.
    pub inputs: &'a BTreeSet<StorePath>,
    /// `sandbox-paths` outside the store (entries in the store are in `inputs`).
    pub sandbox_paths: &'a [SandboxPath],
    /// The build user it runs as, if any.
    pub user: Option<BuildUser>,
    /// In the sandbox, or (`sandbox = false`, or `relaxed` for this derivation) not.
    pub sandboxed: bool,
    /// A recursive-Nix build's allowed paths: a sandboxing builder sets how the paths
    /// the build adds are made visible to it ([`AllowedPaths::set_materialise`]).
    pub recursive: Option<&'a AllowedPaths>,
}

/// A builder process that was started.
pub trait RunningBuild {
    /// The read end of the builder's stdout and stderr, to poll.
    fn log_fd(&self) -> BorrowedFd<'_>;
    /// Read what is available on [`RunningBuild::log_fd`] (the caller polled it
    /// readable): `Ok(0)` at end of file.
    fn read_log(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// The builder's exit, once it has exited (from `waitpid`, never from end of file
    /// on its output: Nix 2.8 kills a builder that closes its output, #2176).
    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>>;
    /// Kill the builder and everything it started, and reap it.
    fn kill(&mut self) -> Option<ExitStatus>;
    /// Where the builder left `output` on the host (inside the sandbox's root, or at
    /// its real path).
    fn built_path(&self, output: &StorePath) -> PathBuf;
    /// The uid the builder ran as on the host (the owner its outputs must have).
    fn build_uid(&self) -> Option<u32>;
    /// The build directory on the host.
    fn build_dir(&self) -> &Path;
    /// What the build used (CPU, memory) and which limit it hit, where a cgroup told.
    fn usage(&self) -> Option<cgroup::Usage> {
        None
    }
    /// Once it has exited unsuccessfully: whether the builder never started — its
    /// sandbox could not be set up or its exec failed, found out after `start`
    /// returned (the sandbox sets up while firn goes on).
    fn start_failure(&mut self) -> Option<ExecError> {
        None
    }
}

/// Where the outputs of a finished build are.
#[derive(Debug, Default)]
pub struct Collected {
    /// Outputs the builder did not produce, with where they should have been (for the
    /// message).
    pub missing_at: BTreeMap<OutputName, PathBuf>,
}

/// Runs builds.
pub trait Builder {
    type Build: RunningBuild;

    /// A build user for the next build.
    fn acquire_user(&mut self) -> Result<AcquiredUser, ExecError>;

    /// A fresh build directory for `drv_path`, owned by `user`, for a build in the
    /// sandbox or not.
    fn build_dir(
        &mut self,
        drv_path: &StorePath,
        user: Option<&BuildUser>,
        sandboxed: bool,
    ) -> Result<BuildDir, ExecError>;

    /// Start `job`'s builder.
    fn start(&mut self, job: BuildJob<'_>) -> Result<Self::Build, ExecError>;

    /// Move the outputs the builder made (name → (store path, real path in the store))
    /// to their real paths. Outputs not listed (valid ones) are left where they are and
    /// go with [`Builder::release`].
    fn collect_outputs(
        &mut self,
        build: &mut Self::Build,
        outputs: &BTreeMap<OutputName, (StorePath, PathBuf)>,
    ) -> Result<Collected, ExecError>;

    /// The build is over: remove its build directory (unless `keep_build_dir`: then it
    /// is returned) and its sandbox root.
    fn release(
        &mut self,
        build: Self::Build,
        keep_build_dir: bool,
    ) -> Result<Option<PathBuf>, ExecError>;
}

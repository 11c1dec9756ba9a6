//! What the worker reports while it works, through [`BuildEvents`]: to a terminal (the
//! CLI's progress display), to a JSON log, or to a daemon client's stderr channel. The
//! worker never prints.

use std::path::Path;

use firn_derivation::StorePath;

use crate::result::BuildResult;

/// A message the worker has for whoever watches.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// Another process holds the output locks (Nix: "waiting for lock on …").
    WaitingForLocks { outputs: &'a [StorePath] },
    /// Every build user is busy (Nix: "waiting for UID to build …").
    WaitingForBuildUser { drv: &'a StorePath },
    /// A failed build's directory is kept (`keep-failed`).
    KeepingBuildDir { path: &'a Path },
    /// A `--check` found a differing output, kept beside the registered one.
    KeepingCheckOutput { path: &'a Path },
    /// A path is being fetched from a binary cache (Nix: "copying path '…' from '…'...").
    Substituting { path: &'a StorePath, from: &'a str },
    /// Something went wrong that does not fail the build by itself.
    Warning { text: &'a str },
    /// A remote machine failed; the build goes elsewhere (Nix: "cannot build on '…':
    /// …").
    MachineFailed { machine: &'a str, why: &'a str },
}

/// A builder that is about to start.
#[derive(Debug, Clone, Copy)]
pub struct BuildStarted<'a> {
    pub drv: &'a StorePath,
    /// In the sandbox.
    pub sandboxed: bool,
    /// A `--check` rebuild (Nix: "checking outputs of '…'...").
    pub checking: bool,
    /// A `--repair` rebuild (Nix: "repairing outputs of '…'...").
    pub repairing: bool,
    /// The remote machine it runs on (Nix: "building '…' on '<store URI>'...").
    pub machine: Option<&'a str>,
}

/// Where the builds are: for a progress line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Goals that were built or failed (not those that were valid already).
    pub done: usize,
    /// Builds running now, by derivation.
    pub running: Vec<StorePath>,
    /// Goals that build or built, in all.
    pub total: usize,
    /// The last line a running build wrote.
    pub last_line: String,
}

/// What the worker reports. Every method has a default that ignores the event.
pub trait BuildEvents {
    /// A builder is about to start (Nix: "building '…'...").
    fn build_started(&mut self, _build: BuildStarted<'_>) {}
    /// Output of a running builder, as it came.
    fn build_log(&mut self, _drv: &StorePath, _data: &[u8]) {}
    /// A goal finished on its own (built, found valid, or failed; not cancelled or
    /// interrupted).
    fn result(&mut self, _drv: &StorePath, _result: &BuildResult) {}
    /// The `post-build-hook` starts for a built derivation (Nix: "running
    /// post-build-hook '…'").
    fn post_build_hook_started(&mut self, _drv: &StorePath, _hook: &str) {}
    /// A line the hook wrote (standard output and error merged), without its newline.
    fn post_build_hook_line(&mut self, _drv: &StorePath, _line: &str) {}
    /// The hook exited.
    fn post_build_hook_finished(&mut self, _drv: &StorePath) {}
    /// A message.
    fn message(&mut self, _message: Message<'_>) {}
    /// The state of the run changed (called at most once per turn of the loop).
    fn progress(&mut self, _progress: &Progress) {}
    /// The run is over.
    fn finished(&mut self) {}
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct NoEvents;

impl BuildEvents for NoEvents {}

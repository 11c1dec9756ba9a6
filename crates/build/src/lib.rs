//! firn-build: realising derivations.
//!
//! - [`goal`]: `DerivationGoal`, whose states carry their data; [`result`]: how a goal
//!   ended and Nix's exit status;
//! - [`worker`]: the `Worker` loop that drives goals (waiters, build slots, polling);
//! - [`missing`]: what a realisation would build (the dry run); [`check`]: `--check`;
//! - [`substitute`]: fetching missing outputs from binary caches before building;
//! - [`builder`]: the `Builder` trait, the local builder, build users and the sandbox;
//! - [`builtins`]: Nix's `builtin:buildenv`, `builtin:fetchurl`, `builtin:unpack-channel`
//!   and how they are started (an exec of firn's binary);
//! - [`plan`]: the pure build plan (program, argv, environment, build-dir files) Nix 2.8
//!   computes from a derivation before starting its builder;
//! - [`outputs`]: `register_outputs`, what happens after a builder exits;
//! - [`post_build_hook`]: the `post-build-hook` run after each build;
//! - [`recursive`]: recursive Nix: what a build's private daemon may see, and the
//!   trait the server above this crate implements;
//! - [`log`]: a build's log file; [`events`]: what the worker reports;
//! - [`platform`]: what this machine builds (system, extra platforms, features);
//! - [`settings`]: the typed settings, [`config`]: the files they come from in
//!   `nix.conf` syntax; [`error`]: why a goal failed.

#![deny(unsafe_code)]

pub mod builder;
pub mod builtins;
pub mod check;
pub mod config;
pub mod error;
pub mod events;
pub mod goal;
pub mod log;
pub mod missing;
pub mod outputs;
pub mod plan;
pub mod platform;
pub mod post_build_hook;
pub mod recursive;
pub mod remote;
pub mod result;
pub mod settings;
pub mod substitute;
pub mod worker;

pub use error::BuildError;
pub use events::{BuildEvents, BuildStarted, Message, NoEvents, Progress};
pub use goal::{BuildMode, Wanted};
pub use result::{exit_status, BuildResult, BuildStatus};
pub use settings::{SandboxMode, SettingError, Settings};
pub use worker::Worker;

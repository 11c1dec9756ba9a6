//! firn-build: realising derivations.
//!
//! - [`executor`]: running a builder (unsandboxed) and reading its log;
//! - [`outputs`]: `register_outputs`, what happens after a builder exits;
//! - [`worker`]: the `Worker` and `DerivationGoal` state machine;
//! - [`sandbox`]: the pure plan of a sandboxed build's root;
//! - [`plan`]: the pure build plan (program, argv, environment, build-dir files) Nix 2.8
//!   computes from a derivation before starting its builder.

pub mod executor;
pub mod outputs;
pub mod plan;
pub mod progress;
pub mod sandbox;
pub mod sandbox_exec;
pub mod worker;

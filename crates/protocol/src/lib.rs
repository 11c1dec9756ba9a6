//! Nix 2.8's worker (daemon) protocol 1.34 and legacy serve protocol 2.7, as typed
//! values with readers and writers over [`std::io::Read`] / [`std::io::Write`] only:
//! no sockets, no store, no threads. `docs/protocol.md` describes what is implemented
//! and where firn is stricter than Nix.
//!
//! - [`wire`]: the primitives (ints, padded strings, lists, store paths, framed streams,
//!   logger fields) with a length-limited [`wire::Reader`] and a [`wire::Writer`].
//! - [`types`]: values both protocols send (path infos, build results, derivations, …).
//! - [`worker`]: the handshake, [`worker::Op`], [`worker::Request`], [`worker::Reply`].
//! - [`stderr`]: the daemon's log/activity channel ([`stderr::StderrMsg`]).
//! - [`serve`]: `nix-store --serve` commands and replies.
//!
//! Nothing here panics on any input; every error names the offset and the field (and the
//! op) at fault.

#![forbid(unsafe_code)]

pub mod basic_derivation;
pub mod serve;
pub mod stderr;
pub mod types;
pub mod wire;
pub mod worker;

pub use stderr::{ActivityType, RemoteError, ResultType, StderrMsg};
pub use types::{
    BasicDerivation, BuildMode, BuildResult, BuildStatus, ContentAddress, ContentAddressMethod,
    DerivedPath, GcAction, UnkeyedValidPathInfo, ValidPathInfo, Verbosity, WireOutput,
};
pub use wire::{Field, Limits, Reader, WireError, Writer};
pub use worker::{ClientHello, ClientSettings, Op, Payload, Reply, Request, WorkerError};

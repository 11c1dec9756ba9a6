//! firn-store: the Nix store on disk, compatible with Nix 2.8.
//!
//! - [`nar`]: NAR serialisation (dump, streaming hash, validated restore);
//! - [`references`]: scanning content for the hash parts of store paths;
//! - [`db`]: the SQLite database with Nix's schema;
//! - [`layout`]: where a store is ([`StoreLayout`]: a chroot root, or Nix's
//!   `NIX_STORE_DIR`/`NIX_STATE_DIR`/`NIX_LOG_DIR`);
//! - [`store`]: a [`Store`] opened on a [`StoreLayout`];
//! - [`gc`]: garbage collection: roots, liveness, deletion; [`temproots`]: temporary
//!   roots and the GC lock; [`roots`]: permanent and indirect roots named as Nix does;
//! - [`import`]: store objects arriving as NARs with their info (substitutes), staged
//!   and checked, then registered together;
//! - [`content_address`]: `ca` fields and the check of imported paths against them;
//! - [`optimise`]: identical files hard-linked through `.links` (`--optimise`);
//! - [`verify`]: `nix-store --verify`;
//! - [`message`]: what the store has to say, as typed events (it prints nothing);
//! - [`durable`]: content on disk before it is valid, with few syscalls;
//! - [`lock`]: path locks compatible with Nix's; [`canonical`]: canonical metadata.

pub mod alive;
pub mod canonical;
pub mod content_address;
pub mod db;
pub mod durable;
pub mod error;
pub mod gc;
pub mod import;
pub mod layout;
pub mod lock;
pub mod message;
pub mod nar;
pub mod nar_bound;
pub mod optimise;
pub mod os_error;
pub mod references;
pub mod roots;
pub mod store;
pub mod temproots;
pub mod verify;

pub use db::{Database, DbError, Registration, ValidPathInfo};
pub use error::StoreError;
pub use gc::{AliveReason, GcAction, GcOptions, GcResults, Needer};
pub use import::Staged;
pub use layout::{LayoutError, StoreLayout};
pub use message::{Reporter, StoreMessage};
pub use store::{Store, StoreOptions};
pub use verify::{VerifyEvent, VerifyOptions, VerifyReport};

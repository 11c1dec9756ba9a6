//! firn-derivation: the pure data model of the Nix store, byte-compatible with Nix 2.8.
//!
//! - [`nixbase32`] and [`hash`]: digests and their textual forms;
//! - [`store_path`]: [`StorePath`], [`StoreDir`] and the path constructors;
//! - [`derivation`]: the [`Derivation`] model; [`aterm`]: the `.drv` format;
//!   [`json`]: the `nix show-derivation` JSON;
//! - [`modulo`]: `hashDerivationModulo`, output paths and the `.drv`'s own path;
//! - [`realisation`]: `DrvOutput` and `Realisation` (content-addressed derivations);
//!   [`resolve`]: resolving a derivation whose inputs are content-addressed.
//!
//! This crate does no I/O: whatever must be read (input derivations) comes in through
//! callbacks, so the caller decides where from and memoises.

#![forbid(unsafe_code)]

pub mod aterm;
pub mod ca;
pub mod derivation;
pub mod hash;
pub mod json;
pub mod modulo;
pub mod nixbase32;
pub mod output_name;
pub mod realisation;
pub mod resolve;
pub mod store_path;

pub use aterm::{parse_derivation, ParseError, ParseErrorKind};
pub use ca::{ContentAddress, FileIngestionMethod, FixedOutputHash};
pub use derivation::{
    hash_placeholder, name_from_drv_base_name, output_name, ByteStr, Derivation, DerivationError,
    DerivationOutput, DerivationType,
};
pub use hash::{Encoding, Hash, HashAlgo, HashError, Hasher};
pub use json::{parse_show_derivation, write_show_derivation, JsonError};
pub use modulo::{
    compute_output_paths, hash_derivation_modulo, impure_output_hash, static_output_hashes,
    DrvHashModulo, InputDrvHash, ModuloCache, ModuloError,
};
pub use output_name::OutputName;
pub use realisation::{DrvOutput, Realisation, RealisationError};
pub use resolve::{downstream_placeholder, resolve, ResolveError};
pub use store_path::{StoreDir, StorePath, StorePathError};

//! firn-cache: binary caches as Nix 2.8 reads and writes them.
//!
//! - [`keys`]: ed25519 signing keys in Nix's `NAME:base64` form, path fingerprints,
//!   signing and checking signatures against `trusted-public-keys`;
//! - [`narinfo`]: the `<hash>.narinfo` files (reader with hard limits, writer in Nix's
//!   field order); [`cache_info`]: `nix-cache-info`;
//! - [`compression`]: `xz`, `zstd`, `bzip2` and `none`;
//! - [`cache`]: a binary cache by URL (`file:///DIR?compression=…&secret-key=…`);
//! - [`disk_cache`]: Nix's narinfo disk cache (`binary-cache-v6.sqlite`), shared with Nix;
//! - [`http`]: GETs over `http://` and `https://` (rustls, `ssl-cert-file`);
//! - [`copy`]: `firn copy --to` / `--from`; [`substitute`]: substitution for builds;
//! - [`serve`]: the store as a read-only HTTP binary cache (`firn serve-cache`).
//!
//! Nothing here prints: results are values, failures [`CacheError`]s naming the path,
//! file or URL at fault.

pub mod cache;
pub mod cache_info;
pub mod compression;
pub mod copy;
pub mod disk_cache;
pub mod error;
pub mod http;
pub mod http_request;
pub mod keys;
pub mod narinfo;
pub mod serve;
pub mod substitute;

pub use cache::{BinaryCache, CacheUrl};
pub use error::CacheError;
pub use keys::{PublicKey, PublicKeys, SecretKey};
pub use narinfo::NarInfo;

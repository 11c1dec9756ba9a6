//! firn-build: realising derivations.
//!
//! - [`outputs`]: `register_outputs`, what happens after a builder exits.

pub mod outputs;

//! Resolving a derivation (`Derivation::tryResolve`): once its input derivations are
//! built, a derivation whose inputs are content-addressed is rewritten into one without
//! input derivations — each input output's `downstreamPlaceholder` replaced by the path
//! it was realised at, that path an input source — and its deferred outputs get their
//! input-addressed paths. The resolved derivation is what is built (or found built);
//! the original's realisations point at its outputs.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::derivation::{output_name_str, ByteStr, Derivation, DerivationError, DerivationOutput};
use crate::hash::Hash;
use crate::modulo::{hash_derivation_modulo, DrvHashModulo, InputDrvHash, ModuloError};
use crate::store_path::{output_path_name, StoreDir, StorePath};

/// `downstreamPlaceholder(drvPath, output)`: what a derivation sees for an output of an
/// input derivation whose path is not known when it is written: `/` + nixbase32 of
/// sha256(`nix-upstream-output:<drv hash part>:<output path name>`).
pub fn downstream_placeholder(drv_path: &StorePath, output: &str) -> String {
    let drv_name = drv_path
        .name()
        .strip_suffix(".drv")
        .unwrap_or(drv_path.name());
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(drv_name, output)
    );
    format!("/{}", Hash::sha256(clear.as_bytes()).to_nixbase32())
}

/// Nix's `rewriteStrings`: each `from` (in order) replaced by its `to` everywhere.
pub fn rewrite_strings(s: &[u8], rewrites: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut s = s.to_vec();
    for (from, to) in rewrites {
        if from == to || from.is_empty() {
            continue;
        }
        let mut out = Vec::with_capacity(s.len());
        let mut rest = &s[..];
        while let Some(i) = memchr::memmem::find(rest, from) {
            out.extend_from_slice(&rest[..i]);
            out.extend_from_slice(to);
            rest = &rest[i + from.len()..];
        }
        out.extend_from_slice(rest);
        s = out;
    }
    s
}

/// Why a derivation could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// An input output that was not realised (Nix warns and does not resolve).
    #[error("output '{output}' of input '{drv}' missing, aborting the resolving")]
    MissingInput { drv: String, output: String },
    #[error(transparent)]
    Derivation(#[from] DerivationError),
}

/// `tryResolve` followed by `rewriteDerivation`: `realised(drv, output)` gives the path
/// each wanted output of each input derivation was realised at.
pub fn resolve(
    store_dir: &StoreDir,
    drv: &Derivation<'_>,
    realised: &mut dyn FnMut(&StorePath, &str) -> Option<StorePath>,
) -> Result<Derivation<'static>, ResolveError> {
    let mut resolved = drv.clone().into_owned();
    resolved.input_drvs.clear();
    let mut rewrites = BTreeMap::new();
    for (input, outputs) in &drv.input_drvs {
        for output in outputs {
            let name = output_name_str(output)?;
            let path = realised(input, name).ok_or_else(|| ResolveError::MissingInput {
                drv: store_dir.display(input),
                output: name.to_owned(),
            })?;
            rewrites.insert(
                downstream_placeholder(input, name).into_bytes(),
                store_dir.display(&path).into_bytes(),
            );
            resolved.input_srcs.insert(path);
        }
    }
    let rw = |s: &ByteStr<'_>| -> ByteStr<'static> { Cow::Owned(rewrite_strings(s, &rewrites)) };
    resolved.builder = rw(&resolved.builder);
    resolved.args = resolved.args.iter().map(rw).collect();
    let mut env = BTreeMap::new();
    for (k, v) in &resolved.env {
        // The first of two variables that become one name wins (`emplace`).
        env.entry(rw(k)).or_insert_with(|| rw(v));
    }
    resolved.env = env;
    // Deferred outputs become input-addressed (the resolved derivation has no input
    // derivations, so the hash needs no lookup).
    if resolved
        .outputs
        .values()
        .any(|o| matches!(o, DerivationOutput::Deferred))
    {
        let mut none = |_: &StorePath| -> Result<InputDrvHash, ()> { Err(()) };
        let h = match hash_derivation_modulo(store_dir, &resolved, true, &mut none) {
            Ok(DrvHashModulo::Regular(h) | DrvHashModulo::Deferred(h)) => h,
            Ok(DrvHashModulo::FixedOutput(_)) => {
                return Err(DerivationError::MixedOutputTypes.into())
            }
            Err(ModuloError::Derivation(e)) => return Err(e.into()),
            Err(_) => return Err(DerivationError::MixedOutputTypes.into()),
        };
        let names: Vec<Vec<u8>> = resolved
            .outputs
            .iter()
            .filter(|(_, o)| matches!(o, DerivationOutput::Deferred))
            .map(|(n, _)| n.to_vec())
            .collect();
        for name in names {
            let path = store_dir
                .make_output_path(output_name_str(&name)?, &h, &resolved.name)
                .map_err(DerivationError::from)?;
            resolved.env.insert(
                Cow::Owned(name.clone()),
                Cow::Owned(store_dir.display(&path).into_bytes()),
            );
            resolved
                .outputs
                .insert(Cow::Owned(name), DerivationOutput::InputAddressed(path));
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_strings_replaces_every_occurrence() {
        let rw: BTreeMap<Vec<u8>, Vec<u8>> = [(b"ab".to_vec(), b"X".to_vec())].into();
        assert_eq!(rewrite_strings(b"abcabab", &rw), b"XcXX");
        assert_eq!(rewrite_strings(b"none", &rw), b"none");
    }
}

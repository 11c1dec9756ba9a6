//! `hashDerivationModulo`, output paths and the `.drv`'s own store path.
//!
//! The modulo hash of a derivation stands in for it wherever another derivation depends
//! on it, so that output paths depend on *what* is built rather than on incidental `.drv`
//! bytes:
//!
//! - fixed-output: `sha256("fixed:out:" [r:]algo ":" hex ":" outPath)`, per output;
//! - otherwise: sha256 of the ATerm with every input derivation replaced by the hex of
//!   its own (unmasked) modulo hash — entries with equal hashes merge — and, when
//!   `mask_outputs`, the output paths and their env entries emptied.
//!
//! Input derivations are looked up through a callback; [`ModuloCache`] memoises.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use thiserror::Error;

use crate::aterm::Unparse;
use crate::derivation::{
    output_name_str, ByteStr, Derivation, DerivationError, DerivationOutput, DerivationType,
};
use crate::hash::Hash;
use crate::store_path::{StoreDir, StorePath};

/// The result of `hashDerivationModulo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrvHashModulo {
    /// A fixed-output derivation: the hash of its one output `out`.
    FixedOutput(Hash),
    /// Any other derivation: one hash, the same for every output.
    Regular(Hash),
}

impl DrvHashModulo {
    /// The hash standing for output `output` of this derivation, if it has it.
    pub fn for_output(&self, drv: &Derivation<'_>, output: &[u8]) -> Option<Hash> {
        match self {
            Self::FixedOutput(h) if output == b"out" => Some(*h),
            Self::FixedOutput(_) => None,
            Self::Regular(h) => drv.outputs.contains_key(output).then_some(*h),
        }
    }
}

/// Why a modulo hash or output path could not be computed.
#[derive(Debug, Error)]
pub enum ModuloError<E> {
    #[error(transparent)]
    Derivation(#[from] DerivationError),
    #[error("input derivation '{drv}' has no output '{output}'")]
    MissingInputOutput { drv: String, output: String },
    #[error("derivation '{drv}' has incorrect output '{actual}', should be '{expected}'")]
    IncorrectOutput {
        drv: String,
        actual: String,
        expected: String,
    },
    #[error(
        "derivation '{drv}' has incorrect environment variable '{var}', should be '{expected}'"
    )]
    IncorrectEnv {
        drv: String,
        var: String,
        expected: String,
    },
    /// The lookup callback failed.
    #[error(transparent)]
    Lookup(E),
}

/// `hashDerivationModulo(drv, mask_outputs)`. `lookup` returns an input derivation
/// (parsed) together with its *unmasked* modulo hash; see [`ModuloCache`].
pub fn hash_derivation_modulo<E>(
    store_dir: &StoreDir,
    drv: &Derivation<'_>,
    mask_outputs: bool,
    lookup: &mut dyn FnMut(&StorePath) -> Result<InputDrvHash, E>,
) -> Result<DrvHashModulo, ModuloError<E>> {
    if drv.derivation_type()? == DerivationType::FixedOutput {
        let (name, output) = drv
            .outputs
            .iter()
            .next()
            .ok_or(DerivationError::NoOutputs)?;
        let DerivationOutput::CAFixed(fixed) = output else {
            return Err(DerivationError::MixedOutputTypes.into());
        };
        let path = drv
            .output_path(store_dir, name, output)?
            .ok_or(DerivationError::NoOutputs)?;
        let s = format!(
            "fixed:out:{}:{}:{}",
            fixed.method_algo(),
            fixed.hash.to_base16(),
            store_dir.display(&path)
        );
        return Ok(DrvHashModulo::FixedOutput(Hash::sha256(s.as_bytes())));
    }

    let mut inputs: BTreeMap<String, BTreeSet<ByteStr<'_>>> = BTreeMap::new();
    for (path, wanted) in &drv.input_drvs {
        let input = lookup(path).map_err(ModuloError::Lookup)?;
        for output in wanted {
            let h = input
                .hash_for(output)
                .ok_or_else(|| ModuloError::MissingInputOutput {
                    drv: store_dir.display(path),
                    output: String::from_utf8_lossy(output).into_owned(),
                })?;
            inputs
                .entry(h.to_base16())
                .or_default()
                .insert(output.clone());
        }
    }
    let mut text = Vec::new();
    drv.unparse(
        store_dir,
        Unparse::Modulo {
            inputs: &inputs,
            mask_outputs,
        },
        &mut text,
    )?;
    Ok(DrvHashModulo::Regular(Hash::sha256(&text)))
}

/// What `hash_derivation_modulo` needs to know about an input derivation: its modulo
/// hash and the names of its outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputDrvHash {
    pub hash: DrvHashModulo,
    pub outputs: BTreeSet<Vec<u8>>,
}

impl InputDrvHash {
    /// The unmasked modulo hash of `drv`, whose inputs are looked up through `lookup`.
    pub fn of<E>(
        store_dir: &StoreDir,
        drv: &Derivation<'_>,
        lookup: &mut dyn FnMut(&StorePath) -> Result<InputDrvHash, E>,
    ) -> Result<Self, ModuloError<E>> {
        Ok(Self {
            hash: hash_derivation_modulo(store_dir, drv, false, lookup)?,
            outputs: drv.outputs.keys().map(|k| k.to_vec()).collect(),
        })
    }

    fn hash_for(&self, output: &[u8]) -> Option<Hash> {
        match self.hash {
            DrvHashModulo::FixedOutput(h) => (output == b"out").then_some(h),
            DrvHashModulo::Regular(h) => self.outputs.contains(output).then_some(h),
        }
    }
}

/// Memoised modulo hashes of input derivations, loaded on demand by a callback
/// (the store reads `.drv` files; tests read fixtures). Each `.drv` is hashed once.
#[derive(Debug, Default)]
pub struct ModuloCache {
    hashes: HashMap<StorePath, InputDrvHash>,
}

impl ModuloCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The unmasked modulo hash of the derivation at `path`, loading it (and, recursively,
    /// its inputs) with `load` unless known.
    pub fn get<E>(
        &mut self,
        store_dir: &StoreDir,
        path: &StorePath,
        load: &mut dyn FnMut(&StorePath) -> Result<Derivation<'static>, E>,
    ) -> Result<InputDrvHash, ModuloError<E>> {
        if let Some(h) = self.hashes.get(path) {
            return Ok(h.clone());
        }
        let drv = load(path).map_err(ModuloError::Lookup)?;
        // Depth-first over inputs; the recursion depth is the depth of the drv graph.
        let h = InputDrvHash::of(store_dir, &drv, &mut |p: &StorePath| {
            self.get(store_dir, p, load)
        })
        .map_err(flatten)?;
        self.hashes.insert(path.clone(), h.clone());
        Ok(h)
    }
}

/// A failed lookup that is itself a modulo error is that error.
fn flatten<E>(e: ModuloError<ModuloError<E>>) -> ModuloError<E> {
    match e {
        ModuloError::Lookup(inner) => inner,
        ModuloError::Derivation(e) => ModuloError::Derivation(e),
        ModuloError::MissingInputOutput { drv, output } => {
            ModuloError::MissingInputOutput { drv, output }
        }
        ModuloError::IncorrectOutput {
            drv,
            actual,
            expected,
        } => ModuloError::IncorrectOutput {
            drv,
            actual,
            expected,
        },
        ModuloError::IncorrectEnv { drv, var, expected } => {
            ModuloError::IncorrectEnv { drv, var, expected }
        }
    }
}

/// The paths every output should have: input-addressed outputs from the masked modulo
/// hash, fixed outputs from their hash (what `derivation add` fills in and Nix checks).
pub fn compute_output_paths<E>(
    store_dir: &StoreDir,
    drv: &Derivation<'_>,
    lookup: &mut dyn FnMut(&StorePath) -> Result<InputDrvHash, E>,
) -> Result<BTreeMap<Vec<u8>, StorePath>, ModuloError<E>> {
    let mut paths = BTreeMap::new();
    let mut masked = None;
    for (name, output) in &drv.outputs {
        let path = match output {
            DerivationOutput::CAFixed(_) => drv
                .output_path(store_dir, name, output)?
                .ok_or(DerivationError::NoOutputs)?,
            DerivationOutput::InputAddressed(_) | DerivationOutput::Deferred => {
                let h = match masked {
                    Some(h) => h,
                    None => {
                        let DrvHashModulo::Regular(h) =
                            hash_derivation_modulo(store_dir, drv, true, lookup)?
                        else {
                            return Err(DerivationError::MixedOutputTypes.into());
                        };
                        *masked.insert(h)
                    }
                };
                store_dir
                    .make_output_path(output_name_str(name)?, &h, &drv.name)
                    .map_err(DerivationError::from)?
            }
        };
        paths.insert(name.to_vec(), path);
    }
    Ok(paths)
}

impl Derivation<'_> {
    /// Compute every output path and write it into the outputs and the env, turning
    /// deferred outputs into input-addressed ones (what the evaluator does before
    /// writing a `.drv`).
    pub fn fill_output_paths<E>(
        &mut self,
        store_dir: &StoreDir,
        lookup: &mut dyn FnMut(&StorePath) -> Result<InputDrvHash, E>,
    ) -> Result<(), ModuloError<E>> {
        self.derivation_type()?;
        let paths = compute_output_paths(store_dir, self, lookup)?;
        for (name, path) in paths {
            let output = self
                .outputs
                .get_mut(name.as_slice())
                .ok_or(DerivationError::NoOutputs)?;
            if !matches!(output, DerivationOutput::CAFixed(_)) {
                *output = DerivationOutput::InputAddressed(path.clone());
            }
            self.env
                .insert(name.into(), store_dir.display(&path).into_bytes().into());
        }
        Ok(())
    }

    /// Nix's `checkDerivationOutputs`: every output path and its env variable must be
    /// what the derivation's contents imply. `drv_path` is only used in messages.
    pub fn check_output_paths<E>(
        &self,
        store_dir: &StoreDir,
        drv_path: &StorePath,
        lookup: &mut dyn FnMut(&StorePath) -> Result<InputDrvHash, E>,
    ) -> Result<(), ModuloError<E>> {
        self.derivation_type()?;
        let expected = compute_output_paths(store_dir, self, lookup)?;
        for (name, output) in &self.outputs {
            let Some(want) = expected.get(&name[..]) else {
                continue;
            };
            if let DerivationOutput::Deferred = output {
                continue;
            }
            if let DerivationOutput::InputAddressed(actual) = output {
                if actual != want {
                    return Err(ModuloError::IncorrectOutput {
                        drv: store_dir.display(drv_path),
                        actual: store_dir.display(actual),
                        expected: store_dir.display(want),
                    });
                }
            }
            let env_ok = self
                .env
                .get(&name[..])
                .and_then(|v| store_dir.parse_path(v).ok())
                .is_some_and(|p| &p == want);
            if !env_ok {
                return Err(ModuloError::IncorrectEnv {
                    drv: store_dir.display(drv_path),
                    var: String::from_utf8_lossy(name).into_owned(),
                    expected: store_dir.display(want),
                });
            }
        }
        Ok(())
    }

    /// The references of the `.drv` file: its input sources and input derivations.
    pub fn references(&self) -> BTreeSet<&StorePath> {
        self.input_srcs
            .iter()
            .chain(self.input_drvs.keys())
            .collect()
    }

    /// The `.drv`'s own store path: a text path named `<name>.drv` over the ATerm bytes,
    /// with the input sources and input derivations as references.
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, DerivationError> {
        let text = self.to_aterm(store_dir)?;
        self.drv_path_of_text(store_dir, &text)
    }

    /// [`Self::drv_path`] when the ATerm text is already at hand.
    pub fn drv_path_of_text(
        &self,
        store_dir: &StoreDir,
        aterm: &[u8],
    ) -> Result<StorePath, DerivationError> {
        if self.name.is_empty() {
            return Err(DerivationError::EmptyName(self.name.clone()));
        }
        Ok(store_dir.make_text_path(
            &format!("{}.drv", self.name),
            &Hash::sha256(aterm),
            self.references(),
        )?)
    }
}

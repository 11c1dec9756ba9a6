//! `hashDerivationModulo`, output paths and the `.drv`'s own store path.
//!
//! The modulo hash of a derivation stands in for it wherever another derivation depends
//! on it, so that output paths depend on *what* is built rather than on incidental `.drv`
//! bytes:
//!
//! - fixed-output: `sha256("fixed:out:" [r:]algo ":" hex ":" outPath)`, per output;
//! - impure: `sha256("impure")`, deferred;
//! - otherwise: sha256 of the ATerm with every input derivation replaced by the hex of
//!   its own (unmasked) modulo hash — entries with equal hashes merge — and, when
//!   `mask_outputs`, the output paths and their env entries emptied. The hash is
//!   *deferred* (Nix's `DrvHash::Kind::Deferred`) when the derivation is floating
//!   content-addressed or an input's hash is deferred: its outputs' paths are not known
//!   before the content-addressed inputs are built (the derivation is then resolved).
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
    /// A floating content-addressed or impure derivation, or one depending on such:
    /// one hash for every output, which stands for the outputs (as a `DrvOutput`) but
    /// gives no output path.
    Deferred(Hash),
}

impl DrvHashModulo {
    /// The hash standing for output `output` of this derivation, if it has it.
    pub fn for_output(&self, drv: &Derivation<'_>, output: &[u8]) -> Option<Hash> {
        match self {
            Self::FixedOutput(h) if output == b"out" => Some(*h),
            Self::FixedOutput(_) => None,
            Self::Regular(h) | Self::Deferred(h) => drv.outputs.contains_key(output).then_some(*h),
        }
    }

    /// Whether the outputs' paths follow from the hash (not deferred).
    pub fn is_deferred(&self) -> bool {
        matches!(self, Self::Deferred(_))
    }
}

/// Nix's `impureOutputHash`: sha256 of `impure`.
pub fn impure_output_hash() -> Hash {
    Hash::sha256(b"impure")
}

/// Why a modulo hash or output path could not be computed.
#[derive(Debug, Error)]
pub enum ModuloError<E> {
    #[error(transparent)]
    Derivation(#[from] DerivationError),
    #[error("input derivation '{drv}' has no output '{output}'")]
    MissingInputOutput { drv: String, output: String },
    /// An output path that is not what the derivation's contents give. The first part
    /// is Nix 2.8's line; the output's name follows.
    #[error(
        "derivation '{drv}' has incorrect output '{actual}', should be '{expected}' \
         (output '{output}')"
    )]
    IncorrectOutput {
        drv: String,
        output: String,
        actual: String,
        expected: String,
    },
    /// The environment variable of output `var` is not its path (`actual`: what it is,
    /// `None` when missing). The first part is Nix 2.8's line.
    #[error(
        "derivation '{drv}' has incorrect environment variable '{var}', should be \
         '{expected}' ({})",
        match actual { Some(a) => format!("it is '{a}'"), None => "it is missing".to_owned() }
    )]
    IncorrectEnv {
        drv: String,
        var: String,
        actual: Option<String>,
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
    let ty = drv.derivation_type()?;
    if ty == DerivationType::Impure {
        return Ok(DrvHashModulo::Deferred(impure_output_hash()));
    }
    if ty == DerivationType::FixedOutput {
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

    let mut deferred = ty == DerivationType::Floating;
    let mut inputs: BTreeMap<String, BTreeSet<ByteStr<'_>>> = BTreeMap::new();
    for (path, wanted) in &drv.input_drvs {
        let input = lookup(path).map_err(ModuloError::Lookup)?;
        deferred |= input.hash.is_deferred();
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
    let h = Hash::sha256(&text);
    Ok(match deferred {
        true => DrvHashModulo::Deferred(h),
        false => DrvHashModulo::Regular(h),
    })
}

/// Nix's `staticOutputHashes`: the hash standing for each output (masked), which with
/// the output's name is its `DrvOutput`.
pub fn static_output_hashes<E>(
    store_dir: &StoreDir,
    drv: &Derivation<'_>,
    lookup: &mut dyn FnMut(&StorePath) -> Result<InputDrvHash, E>,
) -> Result<BTreeMap<Vec<u8>, Hash>, ModuloError<E>> {
    let h = hash_derivation_modulo(store_dir, drv, true, lookup)?;
    Ok(drv
        .outputs
        .keys()
        .filter_map(|name| Some((name.to_vec(), h.for_output(drv, name)?)))
        .collect())
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
            DrvHashModulo::Regular(h) | DrvHashModulo::Deferred(h) => {
                self.outputs.contains(output).then_some(h)
            }
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
            output,
            actual,
            expected,
        } => ModuloError::IncorrectOutput {
            drv,
            output,
            actual,
            expected,
        },
        ModuloError::IncorrectEnv {
            drv,
            var,
            actual,
            expected,
        } => ModuloError::IncorrectEnv {
            drv,
            var,
            actual,
            expected,
        },
    }
}

/// The paths every output should have: input-addressed outputs from the masked modulo
/// hash, fixed outputs from their hash (what `derivation add` fills in and Nix checks).
/// Outputs without a path are left out: floating and impure ones, and deferred ones
/// whose hash is deferred (they depend on content-addressed derivations).
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
            DerivationOutput::CAFloating { .. } | DerivationOutput::Impure { .. } => continue,
            DerivationOutput::InputAddressed(_) | DerivationOutput::Deferred => {
                let h = match masked {
                    Some(h) => h,
                    None => *masked.insert(hash_derivation_modulo(store_dir, drv, true, lookup)?),
                };
                let h = match (h, output) {
                    (DrvHashModulo::Regular(h), _) => h,
                    (DrvHashModulo::Deferred(_), DerivationOutput::Deferred) => continue,
                    (DrvHashModulo::Deferred(h), _) => h,
                    (DrvHashModulo::FixedOutput(_), _) => {
                        return Err(DerivationError::MixedOutputTypes.into())
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
    /// Compute the output paths left to be computed and write them into the outputs and
    /// the env (what the evaluator does before writing a `.drv`): a deferred output
    /// (`""` in the `.drv`) and an output's env variable that is `""` or missing are
    /// filled in. A missing variable is first added as `""`, as the evaluator has it
    /// when it hashes, so that the result passes [`Self::check_output_paths`].
    ///
    /// What is given must be right: an output path, or an output's env variable, other
    /// than the one computed is an error (`IncorrectOutput`, `IncorrectEnv`, naming the
    /// `.drv` path of the derivation as given), and `self` is left unchanged.
    pub fn fill_output_paths<E>(
        &mut self,
        store_dir: &StoreDir,
        lookup: &mut dyn FnMut(&StorePath) -> Result<InputDrvHash, E>,
    ) -> Result<(), ModuloError<E>> {
        self.derivation_type()?;
        let mut filled = self.clone();
        for name in self.outputs.keys() {
            filled
                .env
                .entry(name.clone())
                .or_insert(std::borrow::Cow::Borrowed(b""));
        }
        let paths = compute_output_paths(store_dir, &filled, lookup)?;
        // Only for messages: the path the derivation as given would have.
        let given = || {
            self.drv_path(store_dir)
                .map(|p| store_dir.display(&p))
                .unwrap_or_else(|_| format!("{}.drv", self.name))
        };
        for (name, want) in &paths {
            let shown = String::from_utf8_lossy(name).into_owned();
            let output = filled
                .outputs
                .get_mut(name.as_slice())
                .ok_or(DerivationError::NoOutputs)?;
            match output {
                DerivationOutput::InputAddressed(actual) if actual != want => {
                    return Err(ModuloError::IncorrectOutput {
                        drv: given(),
                        output: shown,
                        actual: store_dir.display(actual),
                        expected: store_dir.display(want),
                    });
                }
                DerivationOutput::Deferred => {
                    *output = DerivationOutput::InputAddressed(want.clone());
                }
                DerivationOutput::InputAddressed(_)
                | DerivationOutput::CAFixed(_)
                | DerivationOutput::CAFloating { .. }
                | DerivationOutput::Impure { .. } => {}
            }
            let var = filled
                .env
                .get_mut(name.as_slice())
                .ok_or(DerivationError::NoOutputs)?;
            if var.is_empty() {
                *var = store_dir.display(want).into_bytes().into();
            } else if store_dir.parse_path(var).ok().as_ref() != Some(want) {
                // (A non-canonical spelling of the right path is kept, as Nix accepts it.)
                return Err(ModuloError::IncorrectEnv {
                    drv: given(),
                    var: shown,
                    actual: self
                        .env
                        .get(name.as_slice())
                        .map(|v| String::from_utf8_lossy(v).into_owned()),
                    expected: store_dir.display(want),
                });
            }
        }
        *self = filled;
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
            if let DerivationOutput::Deferred
            | DerivationOutput::CAFloating { .. }
            | DerivationOutput::Impure { .. } = output
            {
                continue;
            }
            if let DerivationOutput::InputAddressed(actual) = output {
                if actual != want {
                    return Err(ModuloError::IncorrectOutput {
                        drv: store_dir.display(drv_path),
                        output: String::from_utf8_lossy(name).into_owned(),
                        actual: store_dir.display(actual),
                        expected: store_dir.display(want),
                    });
                }
            }
            let var = self.env.get(&name[..]);
            let env_ok = var
                .and_then(|v| store_dir.parse_path(v).ok())
                .is_some_and(|p| &p == want);
            if !env_ok {
                return Err(ModuloError::IncorrectEnv {
                    drv: store_dir.display(drv_path),
                    var: String::from_utf8_lossy(name).into_owned(),
                    actual: var.map(|v| String::from_utf8_lossy(v).into_owned()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aterm::parse_derivation;

    /// nix-2.8-vectors' `single` (`fixtures/cases/single`).
    const SINGLE: &[u8] = br#"Derive([("out","/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hello > $out"],[("builder","/bin/sh"),("name","single"),("out","/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single"),("system","x86_64-linux")])"#;
    const OUT: &str = "/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-single";
    const WRONG: &str = "/nix/store/00000000000000000000000000000000-single";

    fn single(text: &[u8]) -> Derivation<'static> {
        parse_derivation(&StoreDir::default(), text, "single")
            .unwrap()
            .into_owned()
    }

    fn fill(drv: &mut Derivation<'_>) -> Result<(), ModuloError<String>> {
        let mut no_inputs = |p: &StorePath| Err(format!("no input {p}"));
        drv.fill_output_paths(&StoreDir::default(), &mut no_inputs)
    }

    fn with(out_path: &str, env_out: Option<&str>) -> Derivation<'static> {
        let mut text = String::from_utf8(SINGLE.to_vec()).unwrap().replacen(
            &format!(r#"("out","{OUT}","","")"#),
            &format!(r#"("out","{out_path}","","")"#),
            1,
        );
        text = match env_out {
            Some(v) => text.replace(&format!(r#"("out","{OUT}")"#), &format!(r#"("out","{v}")"#)),
            None => text.replace(&format!(r#",("out","{OUT}")"#), ""),
        };
        single(text.as_bytes())
    }

    #[test]
    fn fill_keeps_right_paths_and_computes_empty_ones() {
        let sd = StoreDir::default();
        let want = single(SINGLE);
        for (path, env) in [
            (OUT, Some(OUT)),
            ("", Some("")),
            ("", Some(OUT)),
            (OUT, Some("")),
        ] {
            let mut drv = with(path, env);
            fill(&mut drv).unwrap();
            assert_eq!(drv, want, "path {path:?}, env {env:?}");
        }
        // A missing env variable is added as the evaluator has it, so that the result is
        // a derivation Nix accepts (its path is not that of `single`: the env differs).
        let mut drv = with("", None);
        fill(&mut drv).unwrap();
        assert!(drv.env.contains_key(b"out".as_slice()));
        let path = drv.drv_path(&sd).unwrap();
        let mut no_inputs = |p: &StorePath| Err(format!("no input {p}"));
        drv.check_output_paths(&sd, &path, &mut no_inputs).unwrap();
        // The right path spelt another way is the derivation as given: kept.
        let odd = "/nix//store/./qhk42s8j7kqg82l6ncz33d8xx332vz9f-single";
        let mut drv = with(OUT, Some(odd));
        fill(&mut drv).unwrap();
        assert_eq!(drv.env[b"out".as_slice()].as_ref(), odd.as_bytes());
    }

    #[test]
    fn fill_refuses_wrong_paths_and_changes_nothing() {
        let mut drv = with(WRONG, Some(OUT));
        let before = drv.clone();
        let e = fill(&mut drv).unwrap_err();
        assert_eq!(drv, before);
        let shown = StoreDir::default().display(&before.drv_path(&StoreDir::default()).unwrap());
        assert_eq!(
            e.to_string(),
            format!(
                "derivation '{shown}' has incorrect output '{WRONG}', should be '{OUT}' \
                 (output 'out')"
            )
        );
        for (path, env) in [(OUT, WRONG), ("", WRONG), ("", "not a path")] {
            let mut drv = with(path, Some(env));
            let before = drv.clone();
            let e = fill(&mut drv).unwrap_err();
            assert_eq!(drv, before);
            assert!(
                matches!(&e, ModuloError::IncorrectEnv { var, actual: Some(a), expected, .. }
                    if var == "out" && a == env && expected == OUT),
                "{e}"
            );
            assert!(e
                .to_string()
                .contains(&format!("should be '{OUT}' (it is '{env}')")));
        }
    }
}

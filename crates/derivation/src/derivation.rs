//! The derivation data model (`BasicDerivation` + `inputDrvs` in Nix).
//!
//! Strings are byte strings: Nix writes whatever bytes the evaluator produced, UTF-8 or
//! not, and firn must read them back unchanged. Fields borrow from the parsed text when
//! they contain no escapes (`Cow::Borrowed`), so parsing allocates little.
//!
//! Maps and sets are ordered byte-wise, the order of Nix's `std::map<std::string, …>`
//! and of `StorePath` (by base name); this is also the order they are printed in.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::ca::{FileIngestionMethod, FixedOutputHash};
use crate::hash::HashAlgo;
use crate::output_name::OutputName;
use crate::store_path::{StoreDir, StorePath, StorePathError};

/// A byte string that borrows from the parsed input where it can.
pub type ByteStr<'a> = Cow<'a, [u8]>;

/// One output of a derivation, as the `.drv` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivationOutput {
    /// `("out","/nix/store/…","","")`: the path is fixed by `hashDerivationModulo`.
    InputAddressed(StorePath),
    /// `("out","/nix/store/…","r:sha256","<hex>")`: the path follows from the declared
    /// hash and the derivation's name; the path written in the `.drv` is not kept
    /// (Nix 2.8 recomputes it, so a wrong one is silently corrected on printing).
    CAFixed(FixedOutputHash),
    /// `("out","","r:sha256","")`: a floating content-addressed output (experimental
    /// feature `ca-derivations`): its path is known once it is built, from its contents.
    CAFloating {
        method: FileIngestionMethod,
        algo: HashAlgo,
    },
    /// `("out","","","")`: an input-addressed output whose path is not computed yet
    /// (or cannot be before its content-addressed inputs are built).
    Deferred,
    /// `("out","","r:sha256","impure")`: an impure output (experimental feature
    /// `impure-derivations`), content-addressed like a floating one but never cached.
    Impure {
        method: FileIngestionMethod,
        algo: HashAlgo,
    },
}

impl DerivationOutput {
    /// `[r:]algo` of a content-addressed output (the `.drv`'s hashAlgo field).
    pub fn method_algo(&self) -> Option<String> {
        match self {
            Self::CAFixed(f) => Some(f.method_algo().to_string()),
            Self::CAFloating { method, algo } | Self::Impure { method, algo } => {
                Some(format!("{}{}", method.prefix(), algo))
            }
            Self::InputAddressed(_) | Self::Deferred => None,
        }
    }
}

/// What kind of derivation this is, from the kinds of its outputs (`Derivation::type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivationType {
    /// All outputs input-addressed; `deferred` if their paths are not yet computed.
    InputAddressed { deferred: bool },
    /// A single fixed output named `out`.
    FixedOutput,
    /// Floating content-addressed outputs only (`ca-derivations`).
    Floating,
    /// Impure outputs only (`impure-derivations`).
    Impure,
}

impl DerivationType {
    /// Whether every output path is known from the derivation alone
    /// (`hasKnownOutputPaths`).
    pub fn has_known_output_paths(self) -> bool {
        matches!(
            self,
            Self::InputAddressed { deferred: false } | Self::FixedOutput
        )
    }

    /// Not impure (`isPure`): its outputs may be cached and realisations recorded.
    pub fn is_pure(self) -> bool {
        !matches!(self, Self::Impure)
    }

    /// The experimental feature building such a derivation needs, if any.
    pub fn required_feature(self) -> Option<&'static str> {
        match self {
            Self::InputAddressed { deferred: false } | Self::FixedOutput => None,
            Self::InputAddressed { deferred: true } | Self::Floating => Some("ca-derivations"),
            Self::Impure => Some("impure-derivations"),
        }
    }
}

/// Why a derivation is not well-formed. Messages follow Nix 2.8's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DerivationError {
    #[error("derivation must have at least one output")]
    NoOutputs,
    #[error("can't mix derivation output types")]
    MixedOutputTypes,
    #[error("only one fixed output is allowed")]
    MultipleFixedOutputs,
    #[error("single fixed output must be named \"out\"")]
    FixedOutputNotOut,
    #[error("all floating outputs must use the same hash type")]
    FloatingHashTypes,
    #[error("output name '{0}' is not valid UTF-8")]
    NonUtf8OutputName(String),
    #[error("derivation name '{0}' must not be empty")]
    EmptyName(String),
    #[error(transparent)]
    StorePath(#[from] StorePathError),
}

/// A derivation: what `.drv` files contain, plus the name taken from the `.drv`'s path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation<'a> {
    /// The name (the `.drv` path's name without `.drv`): fixed-output paths depend on it.
    pub name: String,
    pub outputs: BTreeMap<ByteStr<'a>, DerivationOutput>,
    /// Input derivations and the outputs wanted from each.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<ByteStr<'a>>>,
    pub input_srcs: BTreeSet<StorePath>,
    /// `system`.
    pub platform: ByteStr<'a>,
    pub builder: ByteStr<'a>,
    pub args: Vec<ByteStr<'a>>,
    pub env: BTreeMap<ByteStr<'a>, ByteStr<'a>>,
}

fn own<'b>(s: &ByteStr<'_>) -> ByteStr<'b> {
    Cow::Owned(s.to_vec())
}

/// `hashPlaceholder(name)`: `/` + nixbase32 of sha256(`nix-output:<name>`), what
/// `builtins.placeholder` returns and what the builder sees replaced by the output path.
pub fn hash_placeholder(output_name: &[u8]) -> Vec<u8> {
    let mut data = b"nix-output:".to_vec();
    data.extend_from_slice(output_name);
    let mut s = b"/".to_vec();
    s.extend_from_slice(crate::Hash::sha256(&data).to_nixbase32().as_bytes());
    s
}

impl Derivation<'_> {
    /// A copy that borrows nothing.
    pub fn into_owned(self) -> Derivation<'static> {
        Derivation {
            name: self.name,
            outputs: self
                .outputs
                .iter()
                .map(|(k, v)| (own(k), v.clone()))
                .collect(),
            input_drvs: self
                .input_drvs
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(own).collect()))
                .collect(),
            input_srcs: self.input_srcs,
            platform: own(&self.platform),
            builder: own(&self.builder),
            args: self.args.iter().map(own).collect(),
            env: self.env.iter().map(|(k, v)| (own(k), own(v))).collect(),
        }
    }

    /// Classify the derivation by its outputs (Nix's `BasicDerivation::type`).
    pub fn derivation_type(&self) -> Result<DerivationType, DerivationError> {
        let (mut ia, mut fixed, mut floating, mut deferred, mut impure) = (0, 0, 0, 0, 0);
        let mut floating_algo = None;
        for out in self.outputs.values() {
            match out {
                DerivationOutput::InputAddressed(_) => ia += 1,
                DerivationOutput::CAFixed(_) => fixed += 1,
                DerivationOutput::CAFloating { algo, .. } => {
                    floating += 1;
                    if *floating_algo.get_or_insert(*algo) != *algo {
                        return Err(DerivationError::FloatingHashTypes);
                    }
                }
                DerivationOutput::Deferred => deferred += 1,
                DerivationOutput::Impure { .. } => impure += 1,
            }
        }
        match (ia, fixed, floating, deferred, impure) {
            (0, 0, 0, 0, 0) => Err(DerivationError::NoOutputs),
            (_, 0, 0, 0, 0) => Ok(DerivationType::InputAddressed { deferred: false }),
            (0, 1, 0, 0, 0) if self.outputs.contains_key(b"out".as_slice()) => {
                Ok(DerivationType::FixedOutput)
            }
            (0, 1, 0, 0, 0) => Err(DerivationError::FixedOutputNotOut),
            (0, _, 0, 0, 0) => Err(DerivationError::MultipleFixedOutputs),
            (0, 0, _, 0, 0) => Ok(DerivationType::Floating),
            (0, 0, 0, _, 0) => Ok(DerivationType::InputAddressed { deferred: true }),
            (0, 0, 0, 0, _) => Ok(DerivationType::Impure),
            _ => Err(DerivationError::MixedOutputTypes),
        }
    }

    /// The path of output `name` as the `.drv` states it: input-addressed paths as
    /// written, fixed-output paths computed from the hash; `None` when deferred.
    pub fn output_path(
        &self,
        store_dir: &StoreDir,
        name: &[u8],
        output: &DerivationOutput,
    ) -> Result<Option<StorePath>, DerivationError> {
        Ok(match output {
            DerivationOutput::InputAddressed(p) => Some(p.clone()),
            DerivationOutput::CAFixed(fixed) => {
                let out_name = output_name_str(name)?;
                Some(store_dir.make_fixed_output_path(
                    fixed,
                    &crate::store_path::output_path_name(&self.name, out_name),
                )?)
            }
            DerivationOutput::Deferred
            | DerivationOutput::CAFloating { .. }
            | DerivationOutput::Impure { .. } => None,
        })
    }

    /// The paths of all outputs whose path is known, by output name.
    pub fn output_paths(
        &self,
        store_dir: &StoreDir,
    ) -> Result<BTreeMap<ByteStr<'_>, StorePath>, DerivationError> {
        let mut out = BTreeMap::new();
        for (name, output) in &self.outputs {
            if let Some(p) = self.output_path(store_dir, name, output)? {
                out.insert(Cow::Borrowed(&name[..]), p);
            }
        }
        Ok(out)
    }

    /// The paths of all outputs whose path is known, by [`OutputName`].
    pub fn output_paths_by_name(
        &self,
        store_dir: &StoreDir,
    ) -> Result<BTreeMap<OutputName, StorePath>, DerivationError> {
        self.output_paths(store_dir)?
            .into_iter()
            .map(|(name, path)| Ok((output_name(&name)?, path)))
            .collect()
    }

    /// The names of the outputs.
    pub fn output_names(&self) -> Result<Vec<OutputName>, DerivationError> {
        self.outputs.keys().map(|n| output_name(n)).collect()
    }

    /// Whether an output is fixed-output (the derivation then gets the caller's
    /// `impureEnvVars` and the host's network).
    pub fn is_fixed_output(&self) -> bool {
        self.outputs
            .values()
            .any(|o| matches!(o, DerivationOutput::CAFixed(_)))
    }

    /// Whether the derivation builds sandboxed (`isSandboxed`): all but fixed-output and
    /// impure ones, which get the caller's `impureEnvVars` and the host's network.
    pub fn is_sandboxed(&self) -> bool {
        !self.outputs.values().any(|o| {
            matches!(
                o,
                DerivationOutput::CAFixed(_) | DerivationOutput::Impure { .. }
            )
        })
    }

    /// Whether the derivation uses `__structuredAttrs` (its env has `__json`).
    pub fn has_structured_attrs(&self) -> bool {
        self.env.contains_key(b"__json".as_slice())
    }
}

/// An [`OutputName`] from a `.drv`'s bytes.
pub fn output_name(name: &[u8]) -> Result<OutputName, DerivationError> {
    OutputName::from_bytes(name).map_err(|e| DerivationError::NonUtf8OutputName(e.0))
}

/// Output names are used in store path names, which are ASCII.
pub(crate) fn output_name_str(name: &[u8]) -> Result<&str, DerivationError> {
    std::str::from_utf8(name)
        .map_err(|_| DerivationError::NonUtf8OutputName(String::from_utf8_lossy(name).into()))
}

/// The derivation name for a `.drv` file's base name: the store path name if the base
/// name is one (`<hash>-<name>.drv`), else the base name, without `.drv` either way
/// (`Derivation::nameFromPath`).
pub fn name_from_drv_base_name(base: &str) -> &str {
    let name = match StorePath::from_base_name(base.as_bytes()) {
        Ok(_) => &base[crate::store_path::HASH_PART_LEN + 1..],
        Err(_) => base,
    };
    name.strip_suffix(".drv").unwrap_or(name)
}

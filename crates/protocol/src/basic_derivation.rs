//! `BasicDerivation`: a derivation without its input derivations, as the serve
//! protocol's BuildDerivation (and the worker protocol's) sends it.
//!
//! ```text
//! BasicDerivation = int n, n × (name, path | "", hashAlgo, hash)   (outputs, by name)
//!                   inputSrcs:list<path> platform:string builder:string
//!                   args:list<string> env:map<string,string>
//! output          = input-addressed: path, "", ""
//!                   fixed:           path, "[r:]algo", base16 hash
//!                   floating:        "",   "[r:]algo", ""
//!                   impure:          "",   "[r:]algo", "impure"
//!                   deferred:        "",   "", ""
//! ```
//!
//! The name is not on the wire: it is the `.drv` path's name minus `.drv`. A client
//! sends each output as `outputsAndOptPaths` gives it (fixed outputs with their path);
//! a server reads them back as a `.drv`'s outputs are read (the path of a fixed output
//! is recomputed from its hash, not taken from the wire).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use firn_derivation::{
    Derivation, DerivationError, DerivationOutput, FileIngestionMethod, FixedOutputHash, Hash,
    HashAlgo, StoreDir, StorePath,
};

use crate::wire::{Reader, WireResult, Writer};

/// One output of a [`BasicDerivation`] as sent: path (none for floating/deferred),
/// hash algorithm (`[r:]algo` or `""`) and hash (base16, `""`, or `impure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireOutput {
    pub path: Option<StorePath>,
    pub hash_algo: String,
    pub hash: String,
}

/// A derivation without its input derivations (`BasicDerivation`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    pub outputs: BTreeMap<String, WireOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: Vec<u8>,
    pub builder: Vec<u8>,
    pub args: Vec<Vec<u8>>,
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl BasicDerivation {
    /// Read as `readDerivation` does: a repeated output keeps the first, a repeated
    /// environment variable the last.
    pub fn read<R: Read>(r: &mut Reader<R>) -> WireResult<Self> {
        let n = r.read_count("outputs")?;
        let mut outputs = BTreeMap::new();
        for _ in 0..n {
            let name = r.read_string("output name")?;
            let path = r.read_opt_store_path("output path")?;
            let hash_algo = r.read_string("output hashAlgo")?;
            let hash = r.read_string("output hash")?;
            outputs.entry(name).or_insert(WireOutput {
                path,
                hash_algo,
                hash,
            });
        }
        let input_srcs = r.read_store_path_set("inputSrcs")?;
        let platform = r.read_bytes("platform")?;
        let builder = r.read_bytes("builder")?;
        let args = r.read_bytes_list("args")?;
        let n = r.read_count("env")?;
        let mut env = BTreeMap::new();
        for _ in 0..n {
            let k = r.read_bytes("env name")?;
            let v = r.read_bytes("env value")?;
            env.insert(k, v);
        }
        Ok(Self {
            outputs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    pub fn write<W: Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.write_u64(self.outputs.len() as u64)?;
        for (name, o) in &self.outputs {
            w.write_str(name)?;
            w.write_opt_store_path(o.path.as_ref())?;
            w.write_str(&o.hash_algo)?;
            w.write_str(&o.hash)?;
        }
        w.write_store_paths(&self.input_srcs)?;
        w.write_bytes(&self.platform)?;
        w.write_bytes(&self.builder)?;
        w.write_strings(&self.args)?;
        w.write_string_map(&self.env)
    }

    /// What a client sends for `drv` (Nix's `writeDerivation` of a `BasicDerivation`):
    /// every output with its path where the derivation knows it, `inputSrcs` as given
    /// (the caller replaces them by the whole input closure when it should).
    pub fn from_derivation(
        store_dir: &StoreDir,
        drv: &Derivation<'_>,
    ) -> Result<Self, DerivationError> {
        let mut outputs = BTreeMap::new();
        for (name, output) in &drv.outputs {
            let path = drv.output_path(store_dir, name, output)?;
            let (hash_algo, hash) = match output {
                DerivationOutput::CAFixed(f) => (f.method_algo().to_string(), f.hash.to_base16()),
                DerivationOutput::CAFloating { .. } => {
                    (output.method_algo().unwrap_or_default(), String::new())
                }
                DerivationOutput::Impure { .. } => (
                    output.method_algo().unwrap_or_default(),
                    "impure".to_owned(),
                ),
                DerivationOutput::InputAddressed(_) | DerivationOutput::Deferred => {
                    (String::new(), String::new())
                }
            };
            outputs.insert(
                String::from_utf8_lossy(name).into_owned(),
                WireOutput {
                    path,
                    hash_algo,
                    hash,
                },
            );
        }
        Ok(Self {
            outputs,
            input_srcs: drv.input_srcs.clone(),
            platform: drv.platform.to_vec(),
            builder: drv.builder.to_vec(),
            args: drv.args.iter().map(|a| a.to_vec()).collect(),
            env: drv
                .env
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
        })
    }

    /// The derivation a server builds for `drv_path` (no input derivations; outputs
    /// read as in a `.drv`). The message says which output is bad.
    pub fn to_derivation(&self, drv_path: &StorePath) -> Result<Derivation<'static>, String> {
        let name = firn_derivation::derivation::name_from_drv_base_name(drv_path.base_name());
        let mut outputs = BTreeMap::new();
        for (id, o) in &self.outputs {
            firn_derivation::output_name(id.as_bytes()).map_err(|e| e.to_string())?;
            outputs.insert(id.as_bytes().to_vec().into(), o.to_output(id)?);
        }
        Ok(Derivation {
            name: name.to_owned(),
            outputs,
            input_drvs: BTreeMap::new(),
            input_srcs: self.input_srcs.clone(),
            platform: self.platform.clone().into(),
            builder: self.builder.clone().into(),
            args: self.args.iter().map(|a| a.clone().into()).collect(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone().into(), v.clone().into()))
                .collect(),
        })
    }
}

impl WireOutput {
    /// The output as a `.drv` would have it (`id` names it in the message).
    pub fn to_output(&self, id: &str) -> Result<DerivationOutput, String> {
        if self.hash_algo.is_empty() {
            return Ok(match &self.path {
                Some(p) => DerivationOutput::InputAddressed(p.clone()),
                None => DerivationOutput::Deferred,
            });
        }
        let (method, algo_name) = match self.hash_algo.strip_prefix("r:") {
            Some(rest) => (FileIngestionMethod::Recursive, rest),
            None => (FileIngestionMethod::Flat, self.hash_algo.as_str()),
        };
        let algo = HashAlgo::parse(algo_name).map_err(|e| format!("output '{id}': {e}"))?;
        match self.hash.as_str() {
            "" if self.path.is_none() => Ok(DerivationOutput::CAFloating { method, algo }),
            "impure" if self.path.is_none() => Ok(DerivationOutput::Impure { method, algo }),
            "" | "impure" => Err(format!("output '{id}' has a path but no hash")),
            h => {
                let hash = Hash::parse_non_sri_unprefixed(h, algo)
                    .map_err(|e| format!("output '{id}': {e}"))?;
                Ok(DerivationOutput::CAFixed(FixedOutputHash { method, hash }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn path(base: &str) -> StorePath {
        StoreDir::default()
            .parse(&format!("/nix/store/{base}"))
            .unwrap()
    }

    #[test]
    fn a_basic_derivation_becomes_a_derivation_with_its_outputs_read_as_in_a_drv() {
        let drv_path = path("9f8ybc553mfy693dwvw1j9wnk6haq9ab-top.drv");
        let out = path("mb6l93qbm9lkxa98dvwjacnys5i1cdvz-top");
        let mut basic = BasicDerivation {
            platform: b"x86_64-linux".to_vec(),
            builder: b"/bin/sh".to_vec(),
            ..BasicDerivation::default()
        };
        basic.outputs.insert(
            "out".into(),
            WireOutput {
                path: Some(out.clone()),
                hash_algo: String::new(),
                hash: String::new(),
            },
        );
        let d = basic.to_derivation(&drv_path).unwrap();
        assert_eq!(d.name, "top");
        assert!(d.input_drvs.is_empty());
        assert_eq!(
            d.outputs.get(&b"out"[..]),
            Some(&DerivationOutput::InputAddressed(out))
        );
        let fixed = WireOutput {
            path: None,
            hash_algo: "r:sha256".into(),
            hash: Hash::sha256(b"x").to_base16(),
        };
        assert!(matches!(
            fixed.to_output("out"),
            Ok(DerivationOutput::CAFixed(_))
        ));
        let bad = WireOutput {
            hash_algo: "r:sha3".into(),
            ..fixed.clone()
        };
        assert!(bad.to_output("dev").is_err());
        let floating = WireOutput {
            hash: String::new(),
            ..fixed
        };
        assert!(matches!(
            floating.to_output("out"),
            Ok(DerivationOutput::CAFloating { .. })
        ));
        // A bad output is an error of the whole derivation.
        basic.outputs.insert("dev".into(), bad);
        assert!(basic.to_derivation(&drv_path).is_err());
    }

    /// What a client sends is what Nix sends: a fixed output with its path, algorithm
    /// and base16 hash; a floating one with neither path nor hash. Read back by a
    /// server it is the same derivation.
    #[test]
    fn a_derivation_sent_and_read_back_is_the_same() {
        let sd = StoreDir::default();
        let text = br#"Derive([("out","/nix/store/8cs3il3zzq4zvb6jpmynmg6wiqnxnf3g-f","r:sha256","2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")],[],["/nix/store/mb6l93qbm9lkxa98dvwjacnys5i1cdvz-src"],"x86_64-linux","/bin/sh",["-c","echo"],[("out","/nix/store/8cs3il3zzq4zvb6jpmynmg6wiqnxnf3g-f")])"#;
        let drv = firn_derivation::parse_derivation(&sd, text, "f").unwrap();
        let basic = BasicDerivation::from_derivation(&sd, &drv).unwrap();
        let out = &basic.outputs["out"];
        assert_eq!(out.hash_algo, "r:sha256");
        assert_eq!(
            out.hash,
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        );
        let expected = drv
            .output_path(&sd, b"out", &drv.outputs[&b"out"[..]])
            .unwrap();
        assert!(expected.is_some());
        assert_eq!(out.path, expected);
        let mut bytes = Vec::new();
        basic.write(&mut Writer::new(&mut bytes)).unwrap();
        let mut r = Reader::new(&bytes[..]);
        let again = BasicDerivation::read(&mut r).unwrap();
        assert_eq!(again, basic);
        let drv_path = path("9f8ybc553mfy693dwvw1j9wnk6haq9ab-f.drv");
        let back = again.to_derivation(&drv_path).unwrap();
        assert_eq!(back.outputs, drv.outputs);
        assert_eq!(back.env, drv.env);
        assert_eq!(back.args, drv.args);
        assert_eq!(back.input_srcs, drv.input_srcs);
    }
}

//! After the builder exits: `registerOutputs`. Each output must exist and not be
//! group- or world-writable; its metadata is canonicalised; its NAR is hashed and
//! scanned for references (candidates: the input closure and the outputs themselves);
//! fixed outputs are checked against their declared hash — on a mismatch the content is
//! registered under the path of the hash it has, as Nix 2.8 does, and the build then
//! fails; reference constraints are checked; all outputs are registered in one
//! transaction, ordered so that referenced outputs come first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use firn_cache::SecretKey;
use firn_derivation::{
    Derivation, DerivationOutput, FileIngestionMethod, FixedOutputHash, Hash, OutputName, StorePath,
};
use firn_store::canonical::{canonicalise_path_metadata, delete_path};
use firn_store::content_address::HashModuloSink;
use firn_store::db::{topo_sort, Registration, ValidPathInfo};
use firn_store::nar::HashSink;
use firn_store::references::scan_path;
use firn_store::store::{fixed_ca, now};
use firn_store::{Store, StoreError};
use thiserror::Error;

/// Why the outputs of a finished build were not accepted.
#[derive(Debug, Error)]
pub enum OutputError {
    /// A `secret-key-files` key could not be read.
    #[error(transparent)]
    Key(#[from] firn_cache::keys::KeyError),
    #[error("builder for '{drv}' failed to produce output path for output '{output}' at '{path}'")]
    Missing {
        drv: String,
        output: String,
        path: String,
    },
    #[error("suspicious ownership or permission on '{0}'; rejecting this build output")]
    Suspicious(String),
    #[error(
        "output path '{0}' should be a non-executable regular file since recursive hashing \
         is not enabled (outputHashMode=flat)"
    )]
    FlatNotRegular(String),
    #[error("illegal path references in fixed-output derivation '{0}'")]
    FixedOutputReferences(String),
    /// Only recursive sha256 content may have references (`makeFixedOutputPath`).
    #[error("output '{output}' of '{drv}' has references, which only recursive sha256 content-addressed outputs may have")]
    FloatingReferences { drv: String, output: String },
    #[error("hash mismatch in fixed-output derivation '{drv}': specified: {specified} got: {got}")]
    HashMismatch {
        drv: String,
        specified: String,
        got: String,
    },
    #[error("cycle detected in build of '{drv}' in the references of output '{output}' from output '{from}'")]
    Cycle {
        drv: String,
        output: String,
        from: String,
    },
    #[error("output '{path}' is not allowed to refer to the following paths: {paths}")]
    Disallowed { path: String, paths: String },
    #[error("derivation '{drv}' contains an illegal reference specifier '{spec}'")]
    IllegalSpecifier { drv: String, spec: String },
    #[error("{what} of path '{path}' is too large at {size} bytes; limit is {limit} bytes")]
    TooLarge {
        what: &'static str,
        path: String,
        size: u64,
        limit: u64,
    },
    #[error("{path}: {}", firn_store::error::strerror(source))]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OutputError {
    /// Nix's exit-status bit: 0x02 for a hash mismatch; other rejections are exit 1.
    pub fn is_hash_mismatch(&self) -> bool {
        matches!(self, Self::HashMismatch { .. })
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `register_outputs` needs to know about the build.
#[derive(Debug)]
pub struct BuiltOutputs<'d> {
    pub drv_path: &'d StorePath,
    pub drv: &'d Derivation<'d>,
    /// Output name → final store path.
    pub outputs: BTreeMap<OutputName, StorePath>,
    /// The closure of the inputs (reference candidates besides the outputs).
    pub input_closure: BTreeSet<StorePath>,
    /// The uid the builder ran as (the owner a top-level output must have), if any.
    pub build_uid: Option<u32>,
    /// Where a missing output should have been (inside the sandbox), for the message.
    pub missing_at: BTreeMap<OutputName, PathBuf>,
    /// `secret-key-files`: every registered output is signed with each (Nix's
    /// `signPathInfo`).
    pub secret_keys: &'d [SecretKey],
}

/// Check, canonicalise, scan and register the outputs, which are at their final real
/// paths. Returns the registered infos (in registration order).
pub fn register_outputs(
    store: &mut Store,
    built: &BuiltOutputs<'_>,
) -> Result<Vec<ValidPathInfo>, OutputError> {
    register_outputs_with_paths(store, built).map(|(infos, _)| infos)
}

/// [`register_outputs`], also giving each output's final path: a floating
/// content-addressed output is built at a scratch path and moved to the path its
/// contents give.
pub fn register_outputs_with_paths(
    store: &mut Store,
    built: &BuiltOutputs<'_>,
) -> Result<(Vec<ValidPathInfo>, BTreeMap<OutputName, StorePath>), OutputError> {
    let floating = built.outputs.keys().any(|n| {
        matches!(
            built.drv.outputs.get(n.as_bytes()),
            Some(DerivationOutput::CAFloating { .. } | DerivationOutput::Impure { .. })
        )
    });
    if floating {
        return register_floating_outputs(store, built);
    }
    let infos = register_static_outputs(store, built)?;
    Ok((infos, built.outputs.clone()))
}

/// Outputs whose paths the derivation states.
fn register_static_outputs(
    store: &mut Store,
    built: &BuiltOutputs<'_>,
) -> Result<Vec<ValidPathInfo>, OutputError> {
    let sd = store.store_dir().clone();
    let drv_shown = sd.display(built.drv_path);
    let time = now();
    let mut candidates: BTreeSet<StorePath> = built.input_closure.clone();
    candidates.extend(built.outputs.values().cloned());

    let mut regs = Vec::new();
    let mut mismatch = None;
    for (name, path) in &built.outputs {
        let (real, scan) = check_and_scan(store, built, &drv_shown, name, path, &candidates)?;
        store.auto_optimise_path(&real)?;
        let mut info = ValidPathInfo {
            path: path.clone(),
            nar_hash: scan.nar_hash,
            nar_size: scan.nar_size,
            references: scan.references,
            deriver: Some(built.drv_path.clone()),
            registration_time: time,
            ultimate: true,
            sigs: Vec::new(),
            ca: None,
        };
        if let Some(DerivationOutput::CAFixed(fixed)) = built.drv.outputs.get(name.as_bytes()) {
            if !info.references.is_empty() {
                return Err(OutputError::FixedOutputReferences(drv_shown.clone()));
            }
            let got = content_hash(&real, fixed, &scan.nar_hash)?;
            let actual = FixedOutputHash {
                method: fixed.method,
                hash: got,
            };
            info.ca = Some(fixed_ca(&actual));
            if got != fixed.hash {
                // Nix 2.8 keeps what was built, under the path its real hash gives.
                let actual_path = sd
                    .make_fixed_output_path(&actual, path.name())
                    .map_err(StoreError::from)?;
                let actual_real = store.real_path(&actual_path);
                if store
                    .db()
                    .is_valid_path(&actual_path)
                    .map_err(StoreError::from)?
                {
                    delete_path(&real).map_err(io_err(&real))?;
                } else {
                    delete_path(&actual_real).map_err(io_err(&actual_real))?;
                    fs::rename(&real, &actual_real).map_err(io_err(&actual_real))?;
                    info.path = actual_path;
                    sign(&sd, &mut info, built.secret_keys);
                    regs.push(Registration {
                        info: info.clone(),
                        drv_outputs: BTreeMap::new(),
                    });
                }
                mismatch = Some(OutputError::HashMismatch {
                    drv: drv_shown.clone(),
                    specified: fixed.hash.to_sri(),
                    got: got.to_sri(),
                });
                continue;
            }
        }
        sign(&sd, &mut info, built.secret_keys);
        regs.push(Registration {
            info,
            drv_outputs: BTreeMap::new(),
        });
    }

    if let Some(e) = mismatch {
        store
            .db_mut()
            .register_valid_paths(&regs)
            .map_err(StoreError::from)?;
        return Err(e);
    }

    // Outputs that refer to each other in a cycle cannot be registered.
    let by_path: BTreeMap<&StorePath, &str> =
        built.outputs.iter().map(|(n, p)| (p, n.as_str())).collect();
    let sorted = topo_sort(&regs, &|p| sd.display(p)).map_err(|e| match e {
        firn_store::DbError::Cycle { path, from } => {
            let name_of = |s: &str| {
                sd.parse(s)
                    .ok()
                    .and_then(|p| by_path.get(&p).map(|n| (*n).to_owned()))
                    .unwrap_or_else(|| s.to_owned())
            };
            OutputError::Cycle {
                drv: drv_shown.clone(),
                output: name_of(&path),
                from: name_of(&from),
            }
        }
        other => OutputError::Store(other.into()),
    })?;
    let sorted: Vec<Registration> = sorted.into_iter().cloned().collect();

    check_constraints(store, built, &sorted)?;
    store
        .db_mut()
        .register_valid_paths(&sorted)
        .map_err(StoreError::from)?;
    Ok(sorted.into_iter().map(|r| r.info).collect())
}

/// An output as the builder left it: there, not writable by others nor owned by anyone
/// but the build user (`suspicious ownership or permission`), then canonicalised and
/// scanned for references among `candidates` (with its NAR hash). Returns its real path.
fn check_and_scan(
    store: &Store,
    built: &BuiltOutputs<'_>,
    drv_shown: &str,
    name: &OutputName,
    path: &StorePath,
    candidates: &BTreeSet<StorePath>,
) -> Result<(PathBuf, firn_store::references::PathScan), OutputError> {
    let real = store.real_path(path);
    let meta = fs::symlink_metadata(&real).map_err(|_| OutputError::Missing {
        drv: drv_shown.to_owned(),
        output: name.to_string(),
        path: built
            .missing_at
            .get(name)
            .unwrap_or(&real)
            .display()
            .to_string(),
    })?;
    let owner_ok = built.build_uid.is_none_or(|uid| meta.uid() == uid);
    if !meta.file_type().is_symlink() && (meta.mode() & 0o022 != 0 || !owner_ok) {
        return Err(OutputError::Suspicious(real.display().to_string()));
    }
    canonicalise_path_metadata(&real).map_err(io_err(&real))?;
    let scan = scan_path(&real, candidates).map_err(StoreError::from)?;
    Ok((real, scan))
}

/// Read the `secret-key-files` (each build, as Nix: a key changed on disk applies to
/// the next build).
pub fn load_secret_keys(files: &[String]) -> Result<Vec<SecretKey>, OutputError> {
    files
        .iter()
        .map(|f| SecretKey::read_file(Path::new(f)).map_err(OutputError::from))
        .collect()
}

/// Add a signature by each key to `info` (a path of NAR size 0 has no fingerprint).
fn sign(sd: &firn_derivation::StoreDir, info: &mut ValidPathInfo, keys: &[SecretKey]) {
    if let Some(fp) = firn_cache::keys::info_fingerprint(sd, info) {
        info.sigs.extend(keys.iter().map(|k| k.sign(&fp)));
    }
}

/// Floating content-addressed (and impure) outputs, built at scratch paths (Nix's
/// `registerOutputs`, `newInfoFromCA`): in the order of their references to each other,
/// each output has the scratch hashes of the outputs moved before it rewritten to their
/// final ones, is hashed modulo its own scratch hash part, gets the path
/// `makeFixedOutputPath` gives that hash with its references (and itself), has its own
/// scratch hash part rewritten to the final one, and is moved there and registered with
/// `ca = fixed:…` right away. An output whose path is valid already (the same content
/// built before) is dropped for the valid one.
fn register_floating_outputs(
    store: &mut Store,
    built: &BuiltOutputs<'_>,
) -> Result<(Vec<ValidPathInfo>, BTreeMap<OutputName, StorePath>), OutputError> {
    let sd = store.store_dir().clone();
    let drv_shown = sd.display(built.drv_path);
    let mut candidates: BTreeSet<StorePath> = built.input_closure.clone();
    candidates.extend(built.outputs.values().cloned());
    let mut refs_of: BTreeMap<OutputName, BTreeSet<StorePath>> = BTreeMap::new();
    for (name, path) in &built.outputs {
        let (_, scan) = check_and_scan(store, built, &drv_shown, name, path, &candidates)?;
        refs_of.insert(name.clone(), scan.references);
    }
    let order =
        output_order(&built.outputs, &refs_of).map_err(|(output, from)| OutputError::Cycle {
            drv: drv_shown.clone(),
            output,
            from,
        })?;
    let mut rewrites: Vec<(String, String)> = Vec::new();
    let mut finals: BTreeMap<OutputName, StorePath> = BTreeMap::new();
    let mut infos = Vec::new();
    let mut regs = Vec::new();
    for name in order {
        let scratch = &built.outputs[&name];
        let real = store.real_path(scratch);
        let (method, algo) = match built.drv.outputs.get(name.as_bytes()) {
            Some(
                DerivationOutput::CAFloating { method, algo }
                | DerivationOutput::Impure { method, algo },
            ) => (*method, *algo),
            _ => continue,
        };
        if method == FileIngestionMethod::Flat {
            let meta = fs::symlink_metadata(&real).map_err(io_err(&real))?;
            if !meta.is_file() || meta.mode() & 0o100 != 0 {
                return Err(OutputError::FlatNotRegular(real.display().to_string()));
            }
        }
        rewrite_in_nar(&real, &rewrites)?;
        let mut sink = HashModuloSink::new(algo, scratch.hash_part().as_bytes());
        match method {
            FileIngestionMethod::Recursive => {
                firn_store::nar::dump_path(&real, &mut sink).map_err(StoreError::from)?
            }
            FileIngestionMethod::Flat => {
                let mut f = fs::File::open(&real).map_err(io_err(&real))?;
                io::copy(&mut f, &mut sink).map_err(io_err(&real))?;
            }
        }
        let got = sink.finish();
        // The references with the scratch paths of earlier outputs renamed; a
        // reference to itself is `self`.
        let mut self_ref = false;
        let mut refs = BTreeSet::new();
        for r in &refs_of[&name] {
            if r == scratch {
                self_ref = true;
                continue;
            }
            let renamed = rewrites
                .iter()
                .find(|(from, _)| from == r.hash_part())
                .and_then(|(_, to)| {
                    StorePath::from_base_name(format!("{to}-{}", r.name()).as_bytes()).ok()
                });
            refs.insert(renamed.unwrap_or_else(|| r.clone()));
        }
        let fixed = FixedOutputHash { method, hash: got };
        let path_name = scratch.name().to_owned();
        let final_path = sd
            .make_fixed_output_path_with_references(&fixed, &path_name, &refs, self_ref)
            .map_err(StoreError::from)?
            .ok_or_else(|| OutputError::FloatingReferences {
                drv: drv_shown.clone(),
                output: name.to_string(),
            })?;
        if &final_path != scratch {
            rewrite_in_nar(
                &real,
                &[(
                    scratch.hash_part().to_owned(),
                    final_path.hash_part().to_owned(),
                )],
            )?;
            rewrites.push((
                scratch.hash_part().to_owned(),
                final_path.hash_part().to_owned(),
            ));
        }
        canonicalise_path_metadata(&real).map_err(io_err(&real))?;
        let final_real = store.real_path(&final_path);
        let _lock = firn_store::lock::PathLocks::lock([final_real.clone()], true, |_| {})
            .map_err(StoreError::from)?;
        let already = store
            .db()
            .is_valid_path(&final_path)
            .map_err(StoreError::from)?;
        if already {
            // The same content was built before: keep what is registered.
            delete_path(&real).map_err(io_err(&real))?;
        } else {
            if final_real != real {
                delete_path(&final_real).map_err(io_err(&final_real))?;
                fs::rename(&real, &final_real).map_err(io_err(&final_real))?;
            }
            let mut hasher = HashSink::new();
            firn_store::nar::dump_path(&final_real, &mut hasher).map_err(StoreError::from)?;
            let (nar_hash, nar_size) = hasher.finish();
            if self_ref {
                refs.insert(final_path.clone());
            }
            store.auto_optimise_path(&final_real)?;
            let mut info = ValidPathInfo {
                path: final_path.clone(),
                nar_hash,
                nar_size,
                references: refs,
                deriver: Some(built.drv_path.clone()),
                registration_time: now(),
                ultimate: true,
                sigs: Vec::new(),
                ca: Some(fixed_ca(&fixed)),
            };
            sign(&sd, &mut info, built.secret_keys);
            let reg = Registration {
                info: info.clone(),
                drv_outputs: BTreeMap::new(),
            };
            // Registered right away, as Nix does: its path was not known before.
            store
                .db_mut()
                .register_valid_paths(std::slice::from_ref(&reg))
                .map_err(StoreError::from)?;
            regs.push(reg);
            infos.push(info);
        }
        finals.insert(name, final_path);
    }
    let checked = BuiltOutputs {
        drv_path: built.drv_path,
        drv: built.drv,
        outputs: finals.clone(),
        input_closure: built.input_closure.clone(),
        build_uid: built.build_uid,
        missing_at: BTreeMap::new(),
        secret_keys: built.secret_keys,
    };
    check_constraints(store, &checked, &regs)?;
    Ok((infos, finals))
}

/// Nix's `rewriteOutput`: the NAR of `real` with each `from` replaced by its `to`
/// (file contents, symlink targets and names alike), restored in its place. Works on
/// canonicalised (read-only) outputs, which are replaced rather than written.
fn rewrite_in_nar(real: &Path, rewrites: &[(String, String)]) -> Result<(), OutputError> {
    if rewrites.is_empty() {
        return Ok(());
    }
    let mut nar = Vec::new();
    firn_store::nar::dump_path(real, &mut nar).map_err(StoreError::from)?;
    let mut changed = false;
    for (from, to) in rewrites {
        let finder = memchr::memmem::Finder::new(from.as_bytes());
        let hits: Vec<usize> = finder.find_iter(&nar).collect();
        for at in hits {
            nar[at..at + to.len()].copy_from_slice(to.as_bytes());
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    let mut tmp = real.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    delete_path(&tmp).map_err(io_err(&tmp))?;
    firn_store::nar::restore_path(&mut nar.as_slice(), &tmp).map_err(StoreError::from)?;
    delete_path(real).map_err(io_err(real))?;
    fs::rename(&tmp, real).map_err(io_err(real))?;
    Ok(())
}

/// The outputs in an order where an output comes after those it refers to (by their
/// scratch paths); a cycle is `(output, from)`.
fn output_order(
    outputs: &BTreeMap<OutputName, StorePath>,
    refs_of: &BTreeMap<OutputName, BTreeSet<StorePath>>,
) -> Result<Vec<OutputName>, (String, String)> {
    let by_path: BTreeMap<&StorePath, &OutputName> = outputs.iter().map(|(n, p)| (p, n)).collect();
    let deps = |n: &OutputName| -> Vec<OutputName> {
        refs_of
            .get(n)
            .into_iter()
            .flatten()
            .filter_map(|r| by_path.get(r).copied())
            .filter(|d| *d != n)
            .cloned()
            .collect()
    };
    // 0 unvisited, 1 on the stack, 2 done.
    let mut state: BTreeMap<OutputName, u8> = BTreeMap::new();
    let mut order = Vec::new();
    fn visit(
        n: &OutputName,
        parent: Option<&OutputName>,
        deps: &dyn Fn(&OutputName) -> Vec<OutputName>,
        state: &mut BTreeMap<OutputName, u8>,
        order: &mut Vec<OutputName>,
    ) -> Result<(), (String, String)> {
        match state.get(n).copied().unwrap_or(0) {
            2 => return Ok(()),
            1 => {
                return Err((
                    n.to_string(),
                    parent.map(|p| p.to_string()).unwrap_or_default(),
                ))
            }
            _ => {}
        }
        state.insert(n.clone(), 1);
        for d in deps(n) {
            visit(&d, Some(n), deps, state, order)?;
        }
        state.insert(n.clone(), 2);
        order.push(n.clone());
        Ok(())
    }
    for n in outputs.keys() {
        visit(n, None, &deps, &mut state, &mut order)?;
    }
    Ok(order)
}

/// The hash a fixed output actually has: its contents (flat) or its NAR (recursive),
/// with the declared algorithm.
fn content_hash(
    real: &Path,
    fixed: &FixedOutputHash,
    nar_sha256: &Hash,
) -> Result<Hash, OutputError> {
    match fixed.method {
        FileIngestionMethod::Flat => {
            let meta = fs::symlink_metadata(real).map_err(io_err(real))?;
            if !meta.is_file() || meta.mode() & 0o100 != 0 {
                return Err(OutputError::FlatNotRegular(real.display().to_string()));
            }
            let mut h = HashSink::with_algo(fixed.hash.algo());
            let mut f = fs::File::open(real).map_err(io_err(real))?;
            io::copy(&mut f, &mut h).map_err(io_err(real))?;
            Ok(h.finish().0)
        }
        FileIngestionMethod::Recursive
            if fixed.hash.algo() == firn_derivation::HashAlgo::Sha256 =>
        {
            Ok(*nar_sha256)
        }
        FileIngestionMethod::Recursive => {
            let mut h = HashSink::with_algo(fixed.hash.algo());
            firn_store::nar::dump_path(real, &mut h).map_err(StoreError::from)?;
            Ok(h.finish().0)
        }
    }
}

/// One output's constraints, from the legacy env attributes or `outputChecks`.
#[derive(Debug, Default)]
struct Checks {
    allowed_references: Option<Vec<String>>,
    disallowed_references: Vec<String>,
    allowed_requisites: Option<Vec<String>>,
    disallowed_requisites: Vec<String>,
    max_size: Option<u64>,
    max_closure_size: Option<u64>,
}

fn env_list(drv: &Derivation<'_>, key: &str) -> Option<Vec<String>> {
    drv.env.get(key.as_bytes()).map(|v| {
        String::from_utf8_lossy(v)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    })
}

fn checks_for(drv: &Derivation<'_>, output: &str) -> Checks {
    if let Some(json) = drv.env.get(b"__json".as_slice()) {
        let Ok(attrs) = serde_json::from_slice::<serde_json::Value>(json) else {
            return Checks::default();
        };
        let Some(oc) = attrs
            .get("outputChecks")
            .and_then(|o| o.get(output))
            .and_then(|v| v.as_object())
        else {
            return Checks::default();
        };
        let list = |k: &str| {
            oc.get(k).and_then(|v| v.as_array()).map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
        };
        return Checks {
            allowed_references: list("allowedReferences"),
            disallowed_references: list("disallowedReferences").unwrap_or_default(),
            allowed_requisites: list("allowedRequisites"),
            disallowed_requisites: list("disallowedRequisites").unwrap_or_default(),
            max_size: oc.get("maxSize").and_then(|v| v.as_u64()),
            max_closure_size: oc.get("maxClosureSize").and_then(|v| v.as_u64()),
        };
    }
    Checks {
        allowed_references: env_list(drv, "allowedReferences"),
        disallowed_references: env_list(drv, "disallowedReferences").unwrap_or_default(),
        allowed_requisites: env_list(drv, "allowedRequisites"),
        disallowed_requisites: env_list(drv, "disallowedRequisites").unwrap_or_default(),
        max_size: None,
        max_closure_size: None,
    }
}

fn check_constraints(
    store: &Store,
    built: &BuiltOutputs<'_>,
    regs: &[Registration],
) -> Result<(), OutputError> {
    let sd = store.store_dir();
    let drv_shown = sd.display(built.drv_path);
    let infos: BTreeMap<&StorePath, &ValidPathInfo> =
        regs.iter().map(|r| (&r.info.path, &r.info)).collect();
    // Closure of a path among this build's outputs and the valid store.
    let closure = |start: &StorePath| -> Result<BTreeSet<StorePath>, OutputError> {
        let mut seen = BTreeSet::new();
        let mut work = vec![start.clone()];
        while let Some(p) = work.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            match infos.get(&p) {
                Some(i) => work.extend(i.references.iter().cloned()),
                None => {
                    seen.extend(
                        store
                            .db()
                            .query_closure(&[p], false)
                            .map_err(StoreError::from)?,
                    );
                }
            }
        }
        Ok(seen)
    };
    // A specifier is a store path or an output name.
    let resolve = |specs: &[String]| -> Result<BTreeSet<StorePath>, OutputError> {
        specs
            .iter()
            .map(|s| {
                if let Some(p) = built.outputs.get(s.as_str()) {
                    Ok(p.clone())
                } else {
                    sd.parse(s).map_err(|_| OutputError::IllegalSpecifier {
                        drv: drv_shown.clone(),
                        spec: s.clone(),
                    })
                }
            })
            .collect()
    };
    for (name, path) in &built.outputs {
        let Some(info) = infos.get(path) else {
            continue;
        };
        let checks = checks_for(built.drv, name.as_str());
        let shown = sd.display(path);
        let reject = |bad: BTreeSet<StorePath>| -> Result<(), OutputError> {
            if bad.is_empty() {
                return Ok(());
            }
            Err(OutputError::Disallowed {
                path: shown.clone(),
                paths: bad
                    .iter()
                    .map(|p| sd.display(p))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        };
        if let Some(max) = checks.max_size {
            if info.nar_size > max {
                return Err(OutputError::TooLarge {
                    what: "size",
                    path: shown,
                    size: info.nar_size,
                    limit: max,
                });
            }
        }
        let needs_closure = checks.allowed_requisites.is_some()
            || !checks.disallowed_requisites.is_empty()
            || checks.max_closure_size.is_some();
        let requisites = if needs_closure {
            closure(path)?
        } else {
            BTreeSet::new()
        };
        if let Some(max) = checks.max_closure_size {
            let mut total = 0;
            for p in &requisites {
                total += match infos.get(p) {
                    Some(i) => i.nar_size,
                    None => store
                        .db()
                        .query_path_info(p)
                        .map_err(StoreError::from)?
                        .map(|i| i.nar_size)
                        .unwrap_or(0),
                };
            }
            if total > max {
                return Err(OutputError::TooLarge {
                    what: "closure size",
                    path: shown,
                    size: total,
                    limit: max,
                });
            }
        }
        if let Some(allowed) = &checks.allowed_references {
            let allowed = resolve(allowed)?;
            reject(
                info.references
                    .iter()
                    .filter(|r| !allowed.contains(*r))
                    .cloned()
                    .collect(),
            )?;
        }
        let disallowed = resolve(&checks.disallowed_references)?;
        reject(
            info.references
                .iter()
                .filter(|r| disallowed.contains(*r))
                .cloned()
                .collect(),
        )?;
        // Requisite checks ignore the output itself.
        if let Some(allowed) = &checks.allowed_requisites {
            let allowed = resolve(allowed)?;
            reject(
                requisites
                    .iter()
                    .filter(|r| *r != path && !allowed.contains(*r))
                    .cloned()
                    .collect(),
            )?;
        }
        let disallowed = resolve(&checks.disallowed_requisites)?;
        reject(
            requisites
                .iter()
                .filter(|r| *r != path && disallowed.contains(*r))
                .cloned()
                .collect(),
        )?;
    }
    Ok(())
}

/// Replace each `from` hash part by its `to` (same length) in the file contents and
/// symlink targets under `path`: an unsandboxed build of a derivation with valid outputs
/// wrote their fallback paths where the real ones belong (Nix's hash rewriting).
pub fn rewrite_hashes(path: &Path, rewrites: &[(String, String)]) -> Result<(), OutputError> {
    if rewrites.is_empty() {
        return Ok(());
    }
    let replace = |data: &mut Vec<u8>| -> bool {
        let mut changed = false;
        for (from, to) in rewrites {
            debug_assert_eq!(from.len(), to.len());
            let finder = memchr::memmem::Finder::new(from.as_bytes());
            let hits: Vec<usize> = finder.find_iter(data).collect();
            for at in hits {
                data[at..at + to.len()].copy_from_slice(to.as_bytes());
                changed = true;
            }
        }
        changed
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        // A missing output is reported by register_outputs.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path).map_err(io_err(path))?;
        let mut bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec();
        if replace(&mut bytes) {
            fs::remove_file(path).map_err(io_err(path))?;
            let target: &std::ffi::OsStr = std::os::unix::ffi::OsStrExt::from_bytes(&bytes);
            std::os::unix::fs::symlink(target, path).map_err(io_err(path))?;
        }
    } else if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            rewrite_hashes(&entry.path(), rewrites)?;
        }
    } else if meta.is_file() {
        let mut data = fs::read(path).map_err(io_err(path))?;
        if replace(&mut data) {
            fs::write(path, &data).map_err(io_err(path))?;
        }
    }
    Ok(())
}

//! What a realisation would build (`nix-store -r --dry-run`'s "these derivations will
//! be built"): the derivations reachable from the wanted ones through inputs, whose
//! wanted outputs are not all valid. Derivations are read as the goals read them
//! ([`crate::goal::load`]); one that cannot be read is left to the real run to report.
//! [`build_order`] puts them in the order Nix 2.8 prints them (`printMissing`: its
//! `topoSortPaths`, reversed): every derivation after the ones it depends on.

use std::collections::BTreeSet;

use firn_derivation::StorePath;
use firn_store::{Store, StoreError};

use crate::goal::{load, Wanted};

/// `paths` in Nix's build order: a depth-first walk over each path's references within
/// `paths` (paths and references in sorted order), each path after what it refers to.
pub fn build_order(
    store: &Store,
    paths: &BTreeSet<StorePath>,
) -> Result<Vec<StorePath>, StoreError> {
    fn visit(
        store: &Store,
        p: &StorePath,
        paths: &BTreeSet<StorePath>,
        visited: &mut BTreeSet<StorePath>,
        out: &mut Vec<StorePath>,
    ) -> Result<(), StoreError> {
        if !visited.insert(p.clone()) {
            return Ok(());
        }
        for r in store.db().query_references(p)? {
            if &r != p && paths.contains(&r) {
                visit(store, &r, paths, visited, out)?;
            }
        }
        out.push(p.clone());
        Ok(())
    }
    let mut visited = BTreeSet::new();
    let mut out = Vec::new();
    for p in paths {
        visit(store, p, paths, &mut visited, &mut out)?;
    }
    Ok(out)
}

/// The derivations that will be built to realise `tops`.
pub fn derivations_to_build(
    store: &Store,
    tops: &[(StorePath, Wanted)],
) -> Result<BTreeSet<StorePath>, StoreError> {
    let mut to_build = BTreeSet::new();
    let mut work: Vec<(StorePath, Wanted)> = tops.to_vec();
    let mut seen: BTreeSet<(StorePath, String)> = BTreeSet::new();
    while let Some((p, wanted)) = work.pop() {
        if !seen.insert((p.clone(), format!("{wanted:?}"))) {
            continue;
        }
        let Ok(loaded) = load(store, &p) else {
            continue;
        };
        let mut missing = false;
        for (name, out) in &loaded.outputs {
            if wanted.contains(name.as_str()) && !store.db().is_valid_path(out)? {
                missing = true;
            }
        }
        if missing {
            to_build.insert(p.clone());
            work.extend(loaded.inputs);
        }
    }
    Ok(to_build)
}

/// What realising some derivations would do (Nix's `queryMissing`): the derivations to
/// build, the paths to fetch from the substituters, and the sizes of those.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Missing {
    pub will_build: BTreeSet<StorePath>,
    pub will_substitute: BTreeSet<StorePath>,
    /// Compressed bytes to download (as far as the narinfos say).
    pub download_size: u64,
    /// Bytes unpacked.
    pub nar_size: u64,
}

/// [`Missing`] for `tops`: a derivation whose missing wanted outputs all have
/// substitutes (closures included) is fetched, not built, and its inputs are not
/// looked at; the others are built, and their inputs looked at in turn.
pub fn query_missing(
    store: &Store,
    settings: &crate::settings::Settings,
    tops: &[(StorePath, Wanted)],
) -> Result<Missing, crate::error::BuildError> {
    let mut m = Missing::default();
    let mut work: Vec<(StorePath, Wanted)> = tops.to_vec();
    let mut seen: BTreeSet<(StorePath, String)> = BTreeSet::new();
    let mut fetched: BTreeSet<StorePath> = BTreeSet::new();
    while let Some((p, wanted)) = work.pop() {
        if !seen.insert((p.clone(), format!("{wanted:?}"))) {
            continue;
        }
        let Ok(loaded) = load(store, &p) else {
            continue;
        };
        let mut missing = Vec::new();
        for (name, out) in &loaded.outputs {
            if wanted.contains(name.as_str())
                && !store.db().is_valid_path(out).map_err(StoreError::from)?
            {
                missing.push(out.clone());
            }
        }
        if missing.is_empty() {
            continue;
        }
        if crate::substitute::allowed(&loaded.drv) {
            if let Some(plan) = crate::substitute::plan(store, settings, &missing)? {
                if plan.missing.is_empty() {
                    for (info, _) in &plan.fetch {
                        if fetched.insert(info.path.clone()) {
                            m.download_size += info.file_size.unwrap_or(0);
                            m.nar_size += info.nar_size;
                        }
                    }
                    continue;
                }
            }
        }
        m.will_build.insert(p.clone());
        work.extend(loaded.inputs);
    }
    m.will_substitute = fetched;
    Ok(m)
}

/// Add to `m` the closures of `paths` (not derivations), which must be fetched: an
/// error names the paths no substituter has (Nix's words).
pub fn add_paths(
    store: &Store,
    settings: &crate::settings::Settings,
    paths: &[StorePath],
    m: &mut Missing,
) -> Result<(), crate::error::BuildError> {
    if paths.is_empty() {
        return Ok(());
    }
    let plan = crate::substitute::plan(store, settings, paths)?.unwrap_or_default();
    if !plan.missing.is_empty() {
        let sd = store.store_dir();
        let lacking: Vec<String> = plan.missing.iter().map(|p| sd.display(p)).collect();
        return Err(crate::error::BuildError::NoSubstituter {
            paths: lacking.join("', '"),
        });
    }
    for (info, _) in &plan.fetch {
        if m.will_substitute.insert(info.path.clone()) {
            m.download_size += info.file_size.unwrap_or(0);
            m.nar_size += info.nar_size;
        }
    }
    Ok(())
}

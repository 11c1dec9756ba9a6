//! Substitution for builds, as Nix 2.8's `PathSubstitutionGoal` decides it: for each
//! path, the substituters in priority order; a cache without the path is skipped; a
//! narinfo not signed by a key of `trusted-public-keys` (when `require-sigs`) is
//! skipped with Nix's warning; an unreadable cache is skipped with `fallback`, else an
//! error. A closure is planned whole (every path of it must have a substitute), then
//! fetched and registered in one transaction ([`crate::copy::import`]).

use std::collections::{BTreeMap, BTreeSet};

use firn_derivation::{DrvOutput, FixedOutputHash, Realisation, StoreDir, StorePath};
use firn_store::Store;

use crate::cache::{BinaryCache, CacheOptions, CacheUrl};
use crate::copy::{acceptable, import, walk_missing};
use crate::error::CacheError;
use crate::keys::PublicKeys;
use crate::narinfo::NarInfo;

/// The caches to substitute from and how to trust them.
#[derive(Debug)]
pub struct Substituters {
    caches: Vec<BinaryCache>,
    keys: PublicKeys,
    require_sigs: bool,
    fallback: bool,
}

/// What a plan fetches.
#[derive(Debug, Default)]
pub struct Plan {
    /// Each path with its narinfo and the index of the cache it comes from.
    pub fetch: Vec<(NarInfo, usize)>,
    /// Paths that have no (acceptable) substitute.
    pub missing: BTreeSet<StorePath>,
    /// Warnings (unsigned substitutes, caches that failed with `fallback`).
    pub warnings: Vec<String>,
}

impl Plan {
    /// Bytes to download (the compressed sizes that are known) and unpacked.
    pub fn sizes(&self) -> (u64, u64) {
        self.fetch.iter().fold((0, 0), |(d, u), (i, _)| {
            (d + i.file_size.unwrap_or(0), u + i.nar_size)
        })
    }
}

impl Substituters {
    /// Open the caches of `urls` (the `substituters` setting), ordered by priority.
    /// A cache that cannot be opened is left out, with a warning (as Nix does).
    /// `trusted_public_keys` are the words of that setting; the public halves of
    /// `secret_key_files` are trusted too.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        sd: &StoreDir,
        opts: &CacheOptions,
        urls: &[String],
        trusted_public_keys: &[String],
        secret_key_files: &[String],
        require_sigs: bool,
        fallback: bool,
    ) -> Result<(Self, Vec<String>), CacheError> {
        let keys = crate::keys::trusted_keys(trusted_public_keys, secret_key_files)?;
        let mut warnings = Vec::new();
        let mut caches = Vec::new();
        for u in urls {
            match CacheUrl::parse(u).and_then(|url| BinaryCache::open(&url, sd, opts)) {
                Ok(c) => caches.push(c),
                Err(e) => warnings.push(format!("cannot use the substituter '{u}': {e}")),
            }
        }
        caches.sort_by_key(|c| c.priority());
        Ok((
            Self {
                caches,
                keys,
                require_sigs,
                fallback,
            },
            warnings,
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.caches.is_empty()
    }

    pub fn cache(&self, i: usize) -> &BinaryCache {
        &self.caches[i]
    }

    /// The substitute of `p`: the first cache with an acceptable narinfo.
    fn find(
        &self,
        sd: &StoreDir,
        p: &StorePath,
        cas: &BTreeMap<StorePath, FixedOutputHash>,
        warnings: &std::sync::Mutex<Vec<String>>,
    ) -> Result<Option<(NarInfo, usize)>, CacheError> {
        let warn = |w: String| warnings.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        for (i, c) in self.caches.iter().enumerate() {
            let found = match c.foreign_store_dir(sd) {
                None => c.query(sd, p),
                Some(theirs) => match cas.get(p) {
                    // Only a path whose content address is known can be looked up in
                    // a cache of another store directory (Nix's
                    // `makeFixedOutputPathFromCA`), and it is taken under our path.
                    Some(fixed) => query_foreign(c, &theirs, fixed, p),
                    None => continue,
                },
            };
            let info = match found {
                Ok(Some(info)) => info,
                Ok(None) => continue,
                Err(e) if self.fallback => {
                    warn(e.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !acceptable(sd, &info, &self.keys, self.require_sigs, c.url.trusted) {
                warn(format!(
                    "the substitute for '{}' from '{}' is not signed by any of the keys in 'trusted-public-keys'",
                    sd.display(p),
                    c.url.base
                ));
                continue;
            }
            return Ok(Some((info, i)));
        }
        Ok(None)
    }

    /// The realisation `id` from the first cache (by priority) that has it, with the
    /// index of that cache (Nix's `DrvOutputSubstitutionGoal`); an unreadable cache is
    /// skipped with `fallback`, else an error.
    pub fn query_realisation(
        &self,
        id: &DrvOutput,
    ) -> Result<Option<(Realisation, usize)>, CacheError> {
        for (i, c) in self.caches.iter().enumerate() {
            match c.query_realisation(id) {
                Ok(Some(r)) => return Ok(Some((r, i))),
                Ok(None) => {}
                Err(_) if self.fallback => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// What substituting the closures of `paths` would fetch (paths valid in `store`
    /// are not looked up).
    pub fn plan(&self, store: &Store, paths: &[StorePath]) -> Result<Plan, CacheError> {
        self.plan_with_cas(store, paths, &BTreeMap::new())
    }

    /// [`Substituters::plan`], knowing the content addresses `cas` of some paths (the
    /// fixed outputs of a derivation), which caches of other store directories can
    /// then provide.
    pub fn plan_with_cas(
        &self,
        store: &Store,
        paths: &[StorePath],
        cas: &BTreeMap<StorePath, FixedOutputHash>,
    ) -> Result<Plan, CacheError> {
        let sd = store.store_dir().clone();
        let warnings = std::sync::Mutex::new(Vec::new());
        let parallel = crate::copy::transfers(self.caches.iter());
        let (found, missing) = walk_missing(store, paths, parallel, |p| {
            self.find(&sd, p, cas, &warnings)
        })?;
        let mut warnings = warnings.into_inner().unwrap_or_else(|e| e.into_inner());
        // Threads finish in any order: the same warnings, the same order, every time.
        warnings.sort();
        warnings.dedup();
        Ok(Plan {
            fetch: found.into_values().collect(),
            missing,
            warnings,
        })
    }

    /// Fetch what `plan` says, all or nothing; `on_fetch` hears of each path as its
    /// download starts (with the cache's URL).
    pub fn fetch(
        &self,
        store: &mut Store,
        plan: &Plan,
        mut on_fetch: impl FnMut(&StorePath, &str),
    ) -> Result<Vec<StorePath>, CacheError> {
        let pairs: Vec<(NarInfo, &BinaryCache)> = plan
            .fetch
            .iter()
            .map(|(i, c)| (i.clone(), &self.caches[*c]))
            .collect();
        for (i, _) in &pairs {
            store.add_temp_root(&i.path)?;
        }
        import(store, &pairs, |p, c| on_fetch(p, &c.url.base))
    }
}

/// The narinfo of the fixed-output path `p` in a cache of the store directory `theirs`:
/// looked up under the path `fixed` gives there, and returned as ours (no deriver: it
/// names a file of the other store). A path with references (a fixed output has none)
/// cannot move between store directories this way.
fn query_foreign(
    c: &BinaryCache,
    theirs: &StoreDir,
    fixed: &FixedOutputHash,
    p: &StorePath,
) -> Result<Option<NarInfo>, CacheError> {
    // `p`'s name is a valid store path name, so this cannot fail; if it did, the cache
    // simply has no such path.
    let Ok(their_path) = theirs.make_fixed_output_path(fixed, p.name()) else {
        return Ok(None);
    };
    let Some(mut info) = c.query(theirs, &their_path)? else {
        return Ok(None);
    };
    if !info.references.is_empty() {
        return Ok(None);
    }
    info.path = p.clone();
    info.deriver = None;
    Ok(Some(info))
}

//! Garbage-collector roots, found as Nix 2.8's `findRoots` finds them: every symlink
//! below `ROOT/nix/var/nix/gcroots` and `ROOT/nix/var/nix/profiles` that points into the
//! store (or into a store object) is a root; a symlink pointing outside the store is an
//! indirect root, whose target must itself be a symlink into the store (stale indirect
//! links under `gcroots/auto` are removed, as Nix does); a regular file named like a
//! store path's base name is a root for that path. Runtime roots (`/proc` scanning) and
//! temporary roots are not looked for yet.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use firn_derivation::StorePath;

use crate::store::{Store, StoreError};

/// Roots: each valid target with the links that keep it alive.
pub type Roots = BTreeMap<StorePath, BTreeSet<PathBuf>>;

impl Store {
    /// The store path a link target names, if it is inside the store.
    fn store_path_of_target(&self, target: &Path) -> Option<StorePath> {
        let logical = target.strip_prefix(self.store_dir().as_str()).ok()?;
        let first = logical.components().next()?;
        let full = format!(
            "{}/{}",
            self.store_dir().as_str(),
            first.as_os_str().to_string_lossy()
        );
        self.store_dir().parse(&full).ok()
    }

    fn found_root(&self, link: &Path, target: &Path, roots: &mut Roots) -> Result<(), StoreError> {
        if let Some(p) = self.store_path_of_target(target) {
            if self.db().is_valid_path(&p)? {
                roots.entry(p).or_default().insert(link.to_path_buf());
            }
        }
        Ok(())
    }

    fn scan_roots(
        &self,
        path: &Path,
        auto_dir: &Path,
        roots: &mut Roots,
    ) -> Result<(), StoreError> {
        let Ok(meta) = fs::symlink_metadata(path) else {
            return Ok(());
        };
        if meta.is_dir() {
            let Ok(entries) = fs::read_dir(path) else {
                return Ok(());
            };
            let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            names.sort();
            for p in names {
                self.scan_roots(&p, auto_dir, roots)?;
            }
        } else if meta.file_type().is_symlink() {
            let Ok(target) = fs::read_link(path) else {
                return Ok(());
            };
            if target.starts_with(self.store_dir().as_str()) {
                self.found_root(path, &target, roots)?;
            } else {
                // Indirect root: the target is a symlink somewhere else.
                let target = path.parent().unwrap_or(Path::new("/")).join(&target);
                match fs::symlink_metadata(&target) {
                    Err(_) => {
                        if path.starts_with(auto_dir) {
                            eprintln!(
                                "removing stale link from '{}' to '{}'",
                                path.display(),
                                target.display()
                            );
                            let _ = fs::remove_file(path);
                        }
                    }
                    Ok(m) if m.file_type().is_symlink() => {
                        if let Ok(t2) = fs::read_link(&target) {
                            if t2.starts_with(self.store_dir().as_str()) {
                                self.found_root(&target, &t2, roots)?;
                            }
                        }
                    }
                    Ok(_) => {}
                }
            }
        } else if meta.is_file() {
            let base = path.file_name().map(|b| b.to_string_lossy().into_owned());
            if let Some(p) = base.and_then(|b| {
                self.store_dir()
                    .parse(&format!("{}/{b}", self.store_dir().as_str()))
                    .ok()
            }) {
                if self.db().is_valid_path(&p)? {
                    roots.entry(p).or_default().insert(path.to_path_buf());
                }
            }
        }
        Ok(())
    }

    /// All roots under `gcroots/` and `profiles/`.
    pub fn find_roots(&self) -> Result<Roots, StoreError> {
        let state = self.root().join("nix/var/nix");
        let auto_dir = state.join("gcroots/auto");
        let mut roots = Roots::new();
        self.scan_roots(&state.join("gcroots"), &auto_dir, &mut roots)?;
        self.scan_roots(&state.join("profiles"), &auto_dir, &mut roots)?;
        Ok(roots)
    }

    /// What keeps `paths` alive: their referrers' closure, plus the outputs of any `.drv`
    /// in it (Nix's default `gc-keep-derivations = true`).
    pub fn liveness_closure(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut seen: BTreeSet<StorePath> = BTreeSet::new();
        let mut work: Vec<StorePath> = paths.to_vec();
        while let Some(p) = work.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            work.extend(self.db().query_referrers(&p)?);
            if p.is_derivation() {
                for out in self.db().query_derivation_outputs(&p)?.into_values() {
                    if self.db().is_valid_path(&out)? {
                        work.push(out);
                    }
                }
            }
        }
        Ok(seen)
    }
}

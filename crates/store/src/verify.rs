//! `nix-store --verify [--check-contents] [--repair]`: check the database against the
//! disk, as Nix 2.8's `verifyStore` does.
//!
//! 1. every valid path must exist; one that disappeared is removed from the database,
//!    unless a valid path that is still there refers to it (then it is an error left);
//! 2. with `check_contents`, every valid path is hashed again: a missing hash (zero size
//!    or all-zero hash, as an old Nix wrote) is filled in, a different one is an error
//!    (it cannot be repaired: there are no substituters).
//!
//! It holds `gc.lock` shared throughout, so no collection (firn's or Nix's) runs
//! meanwhile and makes paths disappear under it. Each step is told to the caller as a
//! [`VerifyEvent`], whose `Display` is Nix's line.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;

use firn_derivation::{Hash, StorePath};

use crate::gc::is_absent;
use crate::store::{Store, StoreError};

/// What to check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Also hash every path's contents (`--check-contents`).
    pub check_contents: bool,
    /// Try to repair what is wrong (`--repair`); modified contents cannot be.
    pub repair: bool,
}

/// One step of a verification, or one finding. Paths as Nix prints them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyEvent {
    /// Reading the valid paths from the database.
    ReadingStore,
    /// Checking that each valid path exists.
    CheckingPathExistence,
    /// A valid path is not on the disk; without referrers it is removed from the
    /// database, with valid referrers it stays (an error left).
    Disappeared { path: String, has_referrers: bool },
    /// Checking the files of `.links`.
    CheckingLinkHashes,
    /// Hashing the contents of every valid path.
    CheckingHashes,
    /// A path registered without a hash gets the one of its contents.
    FixingMissingHash { path: String },
    /// The contents of a path do not hash to the registered hash.
    Modified {
        path: String,
        expected: Hash,
        got: Hash,
    },
    /// A file of `.links` does not hash to its name.
    LinkModified {
        link: std::path::PathBuf,
        expected: String,
        got: String,
    },
    /// `--repair`: a modified link is removed (the paths that share it stay modified).
    RemovedLink { link: std::path::PathBuf },
    /// `--repair` of modified contents: impossible without substituters.
    CannotRepair { path: String },
    /// The verification ends with errors left.
    NotAllFixed,
}

impl fmt::Display for VerifyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ReadingStore => f.write_str("reading the Nix store..."),
            Self::CheckingPathExistence => f.write_str("checking path existence..."),
            Self::Disappeared {
                path,
                has_referrers: false,
            } => write!(f, "path '{path}' disappeared, removing from database..."),
            Self::Disappeared {
                path,
                has_referrers: true,
            } => write!(
                f,
                "path '{path}' disappeared, but it still has valid referrers!"
            ),
            Self::CheckingLinkHashes => f.write_str("checking link hashes..."),
            Self::CheckingHashes => f.write_str("checking store hashes..."),
            Self::FixingMissingHash { path } => write!(f, "fixing missing hash on '{path}'"),
            Self::Modified {
                path,
                expected,
                got,
            } => write!(
                f,
                "path '{path}' was modified! expected hash '{expected}', got '{got}'"
            ),
            Self::LinkModified {
                link,
                expected,
                got,
            } => write!(
                f,
                "link '{}' was modified! expected hash '{expected}', got '{got}'",
                link.display()
            ),
            Self::RemovedLink { link } => write!(f, "removed link '{}'", link.display()),
            Self::CannotRepair { path } => {
                write!(f, "warning: cannot repair '{path}': no substituters")
            }
            Self::NotAllFixed => f.write_str("warning: not all store errors were fixed"),
        }
    }
}

/// What a verification found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Missing paths removed from the database.
    pub removed: BTreeSet<StorePath>,
    /// Missing paths left valid because valid paths still refer to them.
    pub missing_with_referrers: BTreeSet<StorePath>,
    /// Paths whose missing hash was filled in.
    pub fixed_hashes: BTreeSet<StorePath>,
    /// Paths whose contents differ from their registered hash.
    pub modified: BTreeSet<StorePath>,
    /// Files of `.links` that do not hash to their names (and were not removed).
    pub modified_links: BTreeSet<std::path::PathBuf>,
}

impl VerifyReport {
    /// Whether every error found was fixed (`nix-store --verify` exits 0).
    pub fn all_fixed(&self) -> bool {
        self.missing_with_referrers.is_empty()
            && self.modified.is_empty()
            && self.modified_links.is_empty()
    }
}

impl Store {
    /// `nix-store --verify`: see the [module](self) documentation. Every step and
    /// finding goes to `report`; a database or disk error stops it (nothing is taken
    /// for missing or valid on an error).
    pub fn verify(
        &mut self,
        opts: &VerifyOptions,
        report: &mut dyn FnMut(&VerifyEvent),
    ) -> Result<VerifyReport, StoreError> {
        let sd = self.store_dir().clone();
        let mut result = VerifyReport::default();
        // As Nix: no collection runs meanwhile (it would make paths disappear under us).
        let _gc = self.lock_gc(false)?;
        report(&VerifyEvent::ReadingStore);
        let all = self.db().query_all_valid_paths()?;
        report(&VerifyEvent::CheckingPathExistence);
        let mut missing = BTreeSet::new();
        for p in &all {
            let real = self.real_path(p);
            match fs::symlink_metadata(&real) {
                Ok(_) => {}
                Err(e) if is_absent(&e) => {
                    missing.insert(p.clone());
                }
                Err(source) => return Err(StoreError::Io { path: real, source }),
            }
        }
        for p in &missing {
            let has_referrers = self
                .db()
                .query_referrers(p)?
                .iter()
                .any(|r| r != p && !missing.contains(r));
            report(&VerifyEvent::Disappeared {
                path: sd.display(p),
                has_referrers,
            });
            if has_referrers {
                result.missing_with_referrers.insert(p.clone());
            } else {
                result.removed.insert(p.clone());
            }
        }
        // Every missing path without live referrers goes, in one transaction.
        if !result.removed.is_empty() {
            self.db_mut().invalidate_paths(&result.removed)?;
        }
        if opts.check_contents {
            report(&VerifyEvent::CheckingLinkHashes);
            let links = self.real_store_dir().join(".links");
            if let Ok(entries) = fs::read_dir(&links) {
                let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
                names.sort();
                // Hashed on every core, then looked at in order.
                let hashes = crate::nar::hash_paths(&names);
                for (link, hashed) in names.into_iter().zip(hashes) {
                    let name = link
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let got = hashed?.0.to_nixbase32();
                    if got == name {
                        continue;
                    }
                    report(&VerifyEvent::LinkModified {
                        link: link.clone(),
                        expected: name,
                        got,
                    });
                    if opts.repair {
                        fs::remove_file(&link).map_err(|source| StoreError::Io {
                            path: link.clone(),
                            source,
                        })?;
                        report(&VerifyEvent::RemovedLink { link });
                    } else {
                        result.modified_links.insert(link);
                    }
                }
            }
            report(&VerifyEvent::CheckingHashes);
            // Every path hashed on every core (one path per core at a time), then the
            // results looked at in the order of the paths, as one by one.
            let present: Vec<&StorePath> = all.difference(&missing).collect();
            let reals: Vec<_> = present.iter().map(|p| self.real_path(p)).collect();
            let hashes = crate::nar::hash_paths(&reals);
            for (p, hashed) in present.into_iter().zip(hashes) {
                let info = self
                    .db()
                    .query_path_info(p)?
                    .ok_or_else(|| StoreError::NotValid(sd.display(p)))?;
                let (hash, size) = hashed?;
                if info.nar_size == 0 || info.nar_hash.as_bytes().iter().all(|b| *b == 0) {
                    report(&VerifyEvent::FixingMissingHash {
                        path: sd.display(p),
                    });
                    self.db_mut().update_nar_hash(p, &hash, size)?;
                    result.fixed_hashes.insert(p.clone());
                } else if hash != info.nar_hash {
                    report(&VerifyEvent::Modified {
                        path: sd.display(p),
                        expected: info.nar_hash,
                        got: hash,
                    });
                    if opts.repair {
                        report(&VerifyEvent::CannotRepair {
                            path: sd.display(p),
                        });
                    }
                    result.modified.insert(p.clone());
                }
            }
        }
        if !result.all_fixed() {
            report(&VerifyEvent::NotAllFixed);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::StoreLayout;
    use firn_derivation::{FileIngestionMethod, HashAlgo};
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("firn-verify-{name}-{}", std::process::id()));
        let _ = crate::canonical::delete_path(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn events(store: &mut Store, opts: VerifyOptions) -> (Vec<String>, VerifyReport) {
        let mut lines = Vec::new();
        let r = store
            .verify(&opts, &mut |e| lines.push(e.to_string()))
            .unwrap();
        (lines, r)
    }

    #[test]
    fn a_clean_store_verifies_and_a_disappeared_path_is_removed() {
        let dir = tmp("gone");
        let src = dir.join("hello.txt");
        fs::write(&src, "hello\n").unwrap();
        let mut store = Store::open(&StoreLayout::chroot(&dir.join("root"))).unwrap();
        let p = store
            .add_to_store(&src, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap()
            .path;
        let opts = VerifyOptions {
            check_contents: true,
            repair: false,
        };
        let (lines, r) = events(&mut store, opts);
        assert!(r.all_fixed());
        assert_eq!(
            lines,
            [
                "reading the Nix store...",
                "checking path existence...",
                "checking link hashes...",
                "checking store hashes..."
            ]
        );

        crate::canonical::delete_path(&store.real_path(&p)).unwrap();
        let (lines, r) = events(&mut store, VerifyOptions::default());
        let shown = store.store_dir().display(&p);
        assert_eq!(
            lines[2],
            format!("path '{shown}' disappeared, removing from database...")
        );
        assert_eq!(r.removed, BTreeSet::from([p.clone()]));
        assert!(r.all_fixed());
        assert!(!store.db().is_valid_path(&p).unwrap());
        let _ = crate::canonical::delete_path(&dir);
    }

    #[test]
    fn an_optimised_store_verifies_and_a_modified_link_is_found() {
        let dir = tmp("links");
        let src = dir.join("f");
        fs::write(&src, "same").unwrap();
        let mut store = Store::open_with(
            &StoreLayout::chroot(&dir.join("root")),
            &crate::StoreOptions {
                auto_optimise: true,
                ..Default::default()
            },
        )
        .unwrap();
        let p = store
            .add_to_store(&src, FileIngestionMethod::Flat, HashAlgo::Sha256)
            .unwrap()
            .path;
        let opts = VerifyOptions {
            check_contents: true,
            repair: false,
        };
        let (_, r) = events(&mut store, opts);
        assert!(r.all_fixed(), "{r:?}");
        let links: Vec<_> = fs::read_dir(store.real_store_dir().join(".links"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(links.len(), 1, "auto-optimise linked the new file");
        let real = store.real_path(&p);
        fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&real, "diff").unwrap();
        let (lines, r) = events(&mut store, opts);
        assert_eq!(r.modified_links, BTreeSet::from([links[0].clone()]));
        assert!(r.modified.contains(&p));
        assert!(
            lines.iter().any(|l| l.starts_with(&format!(
                "link '{}' was modified! expected hash '",
                links[0].display()
            ))),
            "{lines:?}"
        );
        let (lines, r) = events(
            &mut store,
            VerifyOptions {
                check_contents: true,
                repair: true,
            },
        );
        assert!(r.modified_links.is_empty());
        assert!(!links[0].exists());
        assert!(
            lines.contains(&format!("removed link '{}'", links[0].display())),
            "{lines:?}"
        );
        let _ = crate::canonical::delete_path(&dir);
    }

    #[test]
    fn modified_contents_are_an_error_left_and_repair_says_it_cannot() {
        let dir = tmp("modified");
        let src = dir.join("f");
        fs::write(&src, "one").unwrap();
        let mut store = Store::open(&StoreLayout::chroot(&dir.join("root"))).unwrap();
        let p = store
            .add_to_store(&src, FileIngestionMethod::Flat, HashAlgo::Sha256)
            .unwrap()
            .path;
        let real = store.real_path(&p);
        fs::set_permissions(&real, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&real, "two").unwrap();
        let opts = VerifyOptions {
            check_contents: true,
            repair: true,
        };
        let (lines, r) = events(&mut store, opts);
        assert!(!r.all_fixed());
        assert_eq!(r.modified, BTreeSet::from([p.clone()]));
        let shown = store.store_dir().display(&p);
        assert!(lines[4].starts_with(&format!(
            "path '{shown}' was modified! expected hash 'sha256:"
        )));
        assert_eq!(
            lines[5..],
            [
                format!("warning: cannot repair '{shown}': no substituters"),
                "warning: not all store errors were fixed".to_owned()
            ]
        );
        let _ = crate::canonical::delete_path(&dir);
    }

    #[test]
    fn a_path_that_cannot_be_looked_at_is_an_error_not_missing() {
        let dir = tmp("unreadable");
        let src = dir.join("f");
        fs::write(&src, "x").unwrap();
        let mut store = Store::open(&StoreLayout::chroot(&dir.join("root"))).unwrap();
        let p = store
            .add_to_store(&src, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap()
            .path;
        // The store directory becomes a symlink loop: every lstat below it fails with
        // ELOOP, which says nothing about the path (root is not stopped by modes).
        let real_store = store.real_store_dir().to_path_buf();
        fs::rename(&real_store, dir.join("store-moved")).unwrap();
        std::os::unix::fs::symlink("store", &real_store).unwrap();
        let err = store
            .verify(&VerifyOptions::default(), &mut |_| {})
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Io { path, .. } if *path == store.real_path(&p)),
            "{err}"
        );
        assert!(
            store.db().is_valid_path(&p).unwrap(),
            "an error removed the path"
        );
        let _ = crate::canonical::delete_path(&dir);
    }
}

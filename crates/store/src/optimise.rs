//! Store optimisation: identical files share one inode through `<store>/.links`, as
//! Nix's `optimisePath_` does (`nix-store --optimise`, `auto-optimise-store`).
//!
//! For each regular file and symlink of a tree (directories are walked): hash its NAR
//! serialisation (so the execute bit counts, and a symlink is its target text); the
//! link `.links/<nixbase32 sha256>` is created as a hard link to the file if it does not
//! exist, otherwise the file is atomically replaced by a hard link to it (a link made
//! beside it in the store directory, `.link-N.tmp-PID`, which the collector leaves alone
//! while this process lives, renamed over the file). Files that are writable
//! are skipped (Nix: "skipping suspicious writable file"); a link whose size differs
//! from the file is corrupt and replaced; too many links (`EMLINK`) and a full
//! directory index (`ENOSPC`) only skip the file. The directory holding a replaced
//! file is made writable for the rename and canonical again (0555, mtime 1) after it.
//!
//! Garbage collection deletes links nothing else uses (`gc.rs`).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;

use crate::error::StoreError;
use crate::message::StoreMessage;
use crate::nar;
use crate::store::Store;

/// What an optimisation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OptimiseStats {
    pub files_linked: u64,
    pub bytes_freed: u64,
}

/// Nix's summary line: `0.01 MiB freed by hard-linking 3 files`.
impl std::fmt::Display for OptimiseStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} MiB freed by hard-linking {} files",
            self.bytes_freed as f64 / (1024.0 * 1024.0),
            self.files_linked
        )
    }
}

/// Inodes already in `.links` (`InodeHash`): files with them are linked already.
pub type InodeHash = HashSet<u64>;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    fn links_dir(&self) -> PathBuf {
        self.real_store_dir().join(".links")
    }

    /// The inodes of every file in `.links` (`loadInodeHash`).
    pub fn load_inode_hash(&self) -> Result<InodeHash, StoreError> {
        let dir = self.links_dir();
        let mut inodes = InodeHash::new();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(inodes);
        };
        for e in entries {
            let e = e.map_err(io_at(&dir))?;
            inodes.insert(e.ino());
        }
        Ok(inodes)
    }

    /// Optimise the tree at `real` (a store object's real path, or one about to
    /// become one), adding to `stats`.
    pub fn optimise_path(
        &self,
        real: &Path,
        inodes: &mut InodeHash,
        stats: &mut OptimiseStats,
    ) -> Result<(), StoreError> {
        let links = self.links_dir();
        if !links.is_dir() {
            fs::create_dir_all(&links).map_err(io_at(&links))?;
        }
        self.optimise_inner(real, inodes, stats)
    }

    /// [`Store::optimise_path`] if `auto-optimise-store` is on for this store.
    pub fn auto_optimise_path(&self, real: &Path) -> Result<(), StoreError> {
        if !self.auto_optimise() {
            return Ok(());
        }
        self.optimise_path(real, &mut InodeHash::new(), &mut OptimiseStats::default())
    }

    /// `nix-store --optimise`: every valid path, each a temporary root while it is done.
    pub fn optimise_store(&self) -> Result<OptimiseStats, StoreError> {
        let mut stats = OptimiseStats::default();
        let mut inodes = self.load_inode_hash()?;
        for p in self.db().query_all_valid_paths()? {
            self.add_temp_root(&p)?;
            if !self.db().is_valid_path(&p)? {
                continue; // collected meanwhile
            }
            self.optimise_path(&self.real_path(&p), &mut inodes, &mut stats)?;
        }
        Ok(stats)
    }

    fn optimise_inner(
        &self,
        path: &Path,
        inodes: &mut InodeHash,
        stats: &mut OptimiseStats,
    ) -> Result<(), StoreError> {
        let meta = fs::symlink_metadata(path).map_err(io_at(path))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            let mut names = Vec::new();
            for e in fs::read_dir(path).map_err(io_at(path))? {
                let e = e.map_err(io_at(path))?;
                // `readDirectoryIgnoringInodes`: what is linked already is skipped.
                if !inodes.contains(&e.ino()) {
                    names.push(e.file_name());
                }
            }
            names.sort();
            for n in names {
                self.optimise_inner(&path.join(n), inodes, stats)?;
            }
            return Ok(());
        }
        if !ft.is_file() && !ft.is_symlink() {
            return Ok(());
        }
        if ft.is_file() && meta.mode() & 0o200 != 0 {
            self.report(&StoreMessage::SkippingWritableFile {
                path: path.to_path_buf(),
            });
            return Ok(());
        }
        if meta.nlink() > 1 && inodes.contains(&meta.ino()) {
            return Ok(());
        }
        let (hash, _) = nar::hash_path(path)?;
        let link = self.links_dir().join(hash.to_nixbase32());
        if let Ok(lm) = fs::symlink_metadata(&link) {
            if lm.len() != meta.len() {
                self.report(&StoreMessage::RemovingCorruptedLink { link: link.clone() });
                fs::remove_file(&link).map_err(io_at(&link))?;
            }
        }
        if fs::symlink_metadata(&link).is_err() {
            match fs::hard_link(path, &link) {
                Ok(()) => {
                    inodes.insert(meta.ino());
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(Errno::EEXIST as i32) => {}
                Err(e) if e.raw_os_error() == Some(Errno::ENOSPC as i32) => return Ok(()),
                Err(e) => return Err(io_at(&link)(e)),
            }
        }
        let lm = fs::symlink_metadata(&link).map_err(io_at(&link))?;
        if lm.ino() == meta.ino() {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        let toggle = dir != self.real_store_dir();
        if toggle {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_at(dir))?;
        }
        let result = self.replace_with_link(path, &link, &meta, stats);
        if toggle {
            // Back to canonical (0555, mtime 1) whatever happened.
            let canon = fs::set_permissions(dir, fs::Permissions::from_mode(0o555))
                .and_then(|()| canonicalise_dir_only(dir));
            if result.is_ok() {
                canon.map_err(io_at(dir))?;
            }
        }
        result
    }

    fn replace_with_link(
        &self,
        path: &Path,
        link: &Path,
        meta: &fs::Metadata,
        stats: &mut OptimiseStats,
    ) -> Result<(), StoreError> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .real_store_dir()
            // A name the collector leaves alone while this process lives.
            .join(format!(".link-{n}.tmp-{}", std::process::id()));
        match fs::hard_link(link, &temp) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(Errno::EMLINK as i32) => return Ok(()),
            Err(e) => return Err(io_at(&temp)(e)),
        }
        if let Err(e) = fs::rename(&temp, path) {
            let _ = fs::remove_file(&temp);
            if e.raw_os_error() == Some(Errno::EMLINK as i32) {
                return Ok(());
            }
            return Err(io_at(path)(e));
        }
        stats.files_linked += 1;
        stats.bytes_freed += meta.len();
        Ok(())
    }
}

/// A directory's mtime back to 1 (its mode is set by the caller).
fn canonicalise_dir_only(dir: &Path) -> io::Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let meta = fs::symlink_metadata(dir)?;
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    utimensat(
        None,
        dir,
        &atime,
        &TimeSpec::new(1, 0),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::canonicalise_path_metadata;
    use crate::layout::StoreLayout;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("firn-optimise-{tag}-{}", std::process::id()));
        let _ = crate::canonical::delete_path(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn tree(at: &Path, content: &str, exec: bool) {
        fs::create_dir_all(at.join("sub")).unwrap();
        fs::write(at.join("sub/f"), content).unwrap();
        if exec {
            fs::set_permissions(at.join("sub/f"), fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::symlink("target", at.join("l")).unwrap();
        canonicalise_path_metadata(at).unwrap();
    }

    #[test]
    fn identical_files_share_an_inode_and_directories_stay_canonical() {
        let root = tempdir("same");
        let store = Store::open(&StoreLayout::chroot(&root)).unwrap();
        let sd = store.real_store_dir().to_path_buf();
        let (a, b, c) = (sd.join("a"), sd.join("b"), sd.join("c"));
        tree(&a, "hello\n", false);
        tree(&b, "hello\n", false);
        tree(&c, "hello\n", true);
        let mut inodes = InodeHash::new();
        let mut stats = OptimiseStats::default();
        for p in [&a, &b, &c] {
            store.optimise_path(p, &mut inodes, &mut stats).unwrap();
        }
        let ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
        assert_eq!(ino(&a.join("sub/f")), ino(&b.join("sub/f")));
        // The execute bit is part of the NAR: not the same file.
        assert_ne!(ino(&a.join("sub/f")), ino(&c.join("sub/f")));
        assert_eq!(ino(&a.join("l")), ino(&b.join("l")));
        assert_eq!(fs::symlink_metadata(a.join("sub/f")).unwrap().nlink(), 3);
        assert_eq!(
            stats.files_linked, 3,
            "b's file and the symlinks of b and c"
        );
        assert_eq!(stats.to_string(), "0.00 MiB freed by hard-linking 3 files");
        let dir = fs::symlink_metadata(b.join("sub")).unwrap();
        assert_eq!((dir.mode() & 0o7777, dir.mtime()), (0o555, 1));
        assert_eq!(fs::read_to_string(b.join("sub/f")).unwrap(), "hello\n");
        // No temporary link is left in the store directory.
        let names: Vec<String> = fs::read_dir(&sd)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".tmp-link")),
            "{names:?}"
        );
        let _ = crate::canonical::delete_path(&root);
    }

    #[test]
    fn writable_files_are_skipped() {
        let root = tempdir("writable");
        let store = Store::open(&StoreLayout::chroot(&root)).unwrap();
        let sd = store.real_store_dir().to_path_buf();
        fs::write(sd.join("w1"), "x").unwrap();
        fs::write(sd.join("w2"), "x").unwrap();
        let mut inodes = InodeHash::new();
        let mut stats = OptimiseStats::default();
        for p in ["w1", "w2"] {
            store
                .optimise_path(&sd.join(p), &mut inodes, &mut stats)
                .unwrap();
        }
        assert_eq!(stats, OptimiseStats::default());
        assert_eq!(fs::read_dir(sd.join(".links")).unwrap().count(), 0);
        let _ = crate::canonical::delete_path(&root);
    }
}

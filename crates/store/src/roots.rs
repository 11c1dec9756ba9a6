//! Permanent GC roots made by firn, named as Nix 2.8 names them (`gc.cc`), so that a
//! root made by one is found, listed and cleaned up by the other.
//!
//! - an *indirect root* for LINK (a path anywhere, typically `./result`) is the symlink
//!   `ROOT/nix/var/nix/gcroots/auto/<h>` → LINK, where `<h>` is the nixbase32 of the
//!   SHA-1 of LINK's absolute path (32 characters: `addIndirectRoot`);
//! - a *permanent root* (`addPermRoot`, what `nix-store -r --add-root LINK` and
//!   `nix-build -o LINK` make) is LINK → the store path, plus the indirect root for LINK.
//!
//! Every symlink is made under a temporary name next to its final one and renamed over
//! it (`makeSymlink`), so a root is never missing while it is replaced.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use firn_derivation::{Hash, HashAlgo, StorePath};

use crate::store::{absolute, Store, StoreError};

/// The name of the indirect root of `link` under `gcroots/auto/` (`link` absolute and
/// canonical, as Nix hashes it).
pub fn indirect_root_name(link: &Path) -> String {
    Hash::digest(HashAlgo::Sha1, link.as_os_str().as_encoded_bytes()).to_nixbase32()
}

/// `makeSymlink`: `link` → `target`, creating `link`'s directories, atomically replacing
/// whatever is at `link`.
fn make_symlink(link: &Path, target: &Path) -> Result<(), StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    if let Some(dir) = link.parent() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut tmp = link.as_os_str().to_owned();
    tmp.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err(&tmp))?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(link)(e));
    }
    Ok(())
}

impl Store {
    /// Nix's `addIndirectRoot`: make `link` (made absolute and canonical, without
    /// following symlinks) an indirect root, `gcroots/auto/<name>` → `link`, whatever
    /// `link` is now. Returns the path of the `auto/` symlink.
    pub fn add_indirect_root(&self, link: &Path) -> Result<PathBuf, StoreError> {
        let link = absolute(link);
        let auto = self
            .state_dir()
            .join("gcroots/auto")
            .join(indirect_root_name(&link));
        make_symlink(&auto, &link)?;
        Ok(auto)
    }

    /// Nix's `addPermRoot`: make `link` a symlink to `path` and an indirect root, so
    /// that `path` stays alive for as long as `link` points to it. `path` is made a
    /// temporary root first. Refuses a `link` inside the store directory (logical, or
    /// on disk below the root) and a `link` that exists and is not a symlink into the
    /// store. Returns `link` absolute and canonical.
    pub fn add_perm_root(&self, link: &Path, path: &StorePath) -> Result<PathBuf, StoreError> {
        let link = absolute(link);
        let sd = self.store_dir().as_str();
        if link.starts_with(sd) || link.starts_with(self.real_store_dir()) {
            return Err(StoreError::RootInStore { path: link });
        }
        self.add_temp_root(path)?;
        match fs::symlink_metadata(&link) {
            Ok(meta) => {
                let into_store = meta.file_type().is_symlink()
                    && fs::read_link(&link)
                        .map_err(|source| StoreError::Io {
                            path: link.clone(),
                            source,
                        })?
                        .starts_with(sd);
                if !into_store {
                    return Err(StoreError::RootExists { path: link });
                }
            }
            Err(e) if crate::gc::is_absent(&e) => {}
            Err(source) => return Err(StoreError::Io { path: link, source }),
        }
        make_symlink(&link, Path::new(&self.store_dir().display(path)))?;
        self.add_indirect_root(&link)?;
        Ok(link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::StoreLayout;
    use firn_derivation::FileIngestionMethod;

    #[test]
    fn indirect_roots_are_named_as_nix_2_8_names_them() {
        // Recorded from Nix 2.8.0: `nix-store --store /tmp/fs-nixroot -r PATH --add-root
        // /tmp/fs-links/result --indirect` made `gcroots/auto/045al58…` → the link.
        assert_eq!(
            indirect_root_name(Path::new("/tmp/fs-links/result")),
            "045al58glqwvwc8wj39664csr4k9259a"
        );
        assert_eq!(
            indirect_root_name(Path::new("/tmp/fs-links/r2")),
            "i0pznadj3xhwqa3hqapj035s3h1dhzsl"
        );
    }

    fn setup(name: &str) -> (PathBuf, Store, StorePath) {
        let dir = std::env::temp_dir().join(format!("firn-roots-{name}-{}", std::process::id()));
        let _ = crate::canonical::delete_path(&dir);
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("hello.txt");
        fs::write(&src, "hello\n").unwrap();
        let mut store = Store::open(&StoreLayout::chroot(&dir.join("root"))).unwrap();
        let p = store
            .add_to_store(&src, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap()
            .path;
        (dir, store, p)
    }

    #[test]
    fn a_perm_root_is_a_link_and_an_indirect_root_that_gc_finds() {
        let (dir, store, p) = setup("perm");
        // Relative, with `..`, in a directory that does not exist yet.
        let link = dir.join("sub/../links/result");
        let made = store.add_perm_root(&link, &p).unwrap();
        let canon = dir.join("links/result");
        assert_eq!(made, canon);
        assert_eq!(
            fs::read_link(&canon).unwrap(),
            PathBuf::from(store.store_dir().display(&p))
        );
        let auto = store
            .state_dir()
            .join("gcroots/auto")
            .join(indirect_root_name(&canon));
        assert_eq!(fs::read_link(&auto).unwrap(), canon);
        let roots = store.find_roots_no_temp(false).unwrap();
        assert_eq!(roots.get(&p), Some(&[canon.clone()].into()));
        // Again: a link into the store is replaced; no temporary is left behind.
        store.add_perm_root(&canon, &p).unwrap();
        let names: Vec<_> = fs::read_dir(dir.join("links"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["result"]);
        let _ = crate::canonical::delete_path(&dir);
    }

    #[test]
    fn a_perm_root_does_not_clobber_what_is_not_a_link_into_the_store() {
        let (dir, store, p) = setup("clobber");
        let file = dir.join("plain");
        fs::write(&file, "mine").unwrap();
        let other = dir.join("other");
        std::os::unix::fs::symlink("/etc/passwd", &other).unwrap();
        for l in [&file, &other] {
            let err = store.add_perm_root(l, &p).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("cannot create symlink '{}'; already exists", l.display())
            );
        }
        assert_eq!(fs::read_to_string(&file).unwrap(), "mine");
        assert_eq!(fs::read_link(&other).unwrap(), PathBuf::from("/etc/passwd"));
        let in_store = store.add_perm_root(Path::new("/nix/store/foo"), &p);
        assert_eq!(
            in_store.unwrap_err().to_string(),
            "creating a garbage collector root (/nix/store/foo) in the Nix store is \
             forbidden (are you running nix-build inside the store?)"
        );
        let physical = store.real_store_dir().join("foo");
        assert!(matches!(
            store.add_perm_root(&physical, &p),
            Err(StoreError::RootInStore { .. })
        ));
        assert!(!store.state_dir().join("gcroots/auto").exists());
        let _ = crate::canonical::delete_path(&dir);
    }
}

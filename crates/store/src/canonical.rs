//! Canonical metadata of store objects (`canonicalisePathMetaData`): every file and
//! directory gets mtime 1 and mode 0444, or 0555 if the owner could execute it (so no
//! write, setuid, setgid or sticky bits); symlinks keep their mode but get mtime 1 too;
//! the owner becomes the store's owner (root when root runs firn).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::AtFlags;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};

/// What a store restore ([`crate::nar::restore_buffered_for_store`]) leaves for the
/// caller to do about the tree's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum RestoredMetadata {
    /// Modes, times and owner are the store's canonical ones already.
    Canonical,
    /// Not known to be canonical (the tree's owner is not this process's user and
    /// group, e.g. in a set-group-ID directory): run
    /// [`canonicalise_path_metadata`] over it.
    NeedsCanonicalising,
}

/// Canonicalise the tree a store restore left at `path`, unless it did so itself.
pub fn canonicalise_restored(path: &Path, metadata: RestoredMetadata) -> std::io::Result<()> {
    match metadata {
        RestoredMetadata::Canonical => Ok(()),
        RestoredMetadata::NeedsCanonicalising => canonicalise_path_metadata(path),
    }
}

/// Canonicalise `path` and everything below it. Does not follow symlinks.
pub fn canonicalise_path_metadata(path: &Path) -> std::io::Result<()> {
    // Asked once, not for every file (two syscalls per file of a large tree).
    canonicalise_as(path, Uid::effective(), Gid::effective())
}

fn canonicalise_as(path: &Path, uid: Uid, gid: Gid) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    if !ft.is_symlink() {
        let mode = meta.mode() & 0o7777;
        if mode != 0o444 && mode != 0o555 {
            let new = 0o444 | if mode & 0o100 != 0 { 0o111 } else { 0 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(new))?;
        }
    }
    if meta.mtime() != 1 || meta.mtime_nsec() != 0 {
        let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
        utimensat(
            None,
            path,
            &atime,
            &TimeSpec::new(1, 0),
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(std::io::Error::from)?;
    }
    if meta.uid() != uid.as_raw() || meta.gid() != gid.as_raw() {
        // Only root can give files away; others already own what they created.
        if uid.is_root() {
            fchownat(
                None,
                path,
                Some(uid),
                Some(gid),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(std::io::Error::from)?;
        }
    }
    if ft.is_dir() {
        // The directory is 0555 now: we are its owner (or root), so listing works.
        for entry in std::fs::read_dir(path)? {
            canonicalise_as(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Make a canonical store object writable again so it can be deleted (directories need
/// their write bit for their entries to be removed).
pub fn make_deletable(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        for entry in std::fs::read_dir(path)? {
            make_deletable(&entry?.path())?;
        }
    }
    Ok(())
}

/// Remove a path and everything below, whatever its modes.
pub fn delete_path(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => {
            make_deletable(path)?;
            std::fs::remove_dir_all(path)
        }
        Ok(_) => std::fs::remove_file(path),
    }
}

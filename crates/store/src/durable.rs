//! Putting store content on disk before it becomes valid, with few system calls.
//!
//! "Valid means complete and on disk" (docs/store.md, *Crash safety*): a path is
//! registered only once its files, its directories and its name in the store directory
//! have reached the disk. Until 2026-12 firn got there with an `fsync` of every file and
//! directory of the object (a tree of 3,000 files: 3,000 opens, fsyncs, closes, each
//! fsync waiting for its own journal commit). Now:
//!
//! - every large file (at least [`WRITEBACK_MIN`]) restored into the store is handed to
//!   the disk as soon as it is written ([`start_writeback`]:
//!   `sync_file_range(SYNC_FILE_RANGE_WRITE)`, which starts the write-out and does not
//!   wait for it), so the disk works while the rest is copied; small files are left to
//!   the final sync (a call per small file cost more than it saved);
//! - once the object is at its final name, [`make_durable`] waits for all of it with one
//!   `syncfs(2)` of the store's file system, which writes back every dirty inode of
//!   that file system and commits the journal once: one call whatever the size of the
//!   object, and it covers the rename into place too.
//!
//! `syncfs` also waits for whatever else is dirty on that file system. Measured here
//! (docs/store.md), one `syncfs` per added file through the daemon was still twice as
//! fast as an fsync of the file and one of the store directory, with other builds
//! writing to the same disk; a first version fsynced objects of up to 16 inodes one by
//! one for that reason, and lost.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Files at least this large get their write-out started as soon as they are written.
pub const WRITEBACK_MIN: u64 = 1 << 20;

thread_local! {
    /// How many `syncfs`s [`make_all_durable`] made on this thread.
    static SYNCS: Cell<u64> = const { Cell::new(0) };
}

/// How many `syncfs` calls [`make_durable`] made on this thread so far (for tests: per
/// thread, so that tests running side by side do not see each other's).
pub fn sync_count() -> u64 {
    SYNCS.with(Cell::get)
}

/// Start writing `file`'s dirty pages to the disk without waiting for them (best
/// effort: on a file system without `sync_file_range` nothing happens, and
/// [`make_durable`] still waits for everything).
pub fn start_writeback(file: &File) {
    // SAFETY: sync_file_range takes no pointers; the descriptor is valid for the
    // duration of the call because `file` is borrowed. Its result is ignored on
    // purpose: this is only a hint, durability comes from `make_durable`.
    unsafe {
        nix::libc::sync_file_range(file.as_raw_fd(), 0, 0, nix::libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Make the store object at `path`, already renamed to its final name in `store_dir`,
/// durable: its contents, metadata and its entry in `store_dir` are on disk when this
/// returns `Ok`.
pub fn make_durable(path: &Path, store_dir: &Path) -> io::Result<()> {
    make_all_durable(std::slice::from_ref(&path), store_dir)
}

/// [`make_durable`] for several objects of `store_dir` at once (a closure imported
/// together): one `syncfs` for all of them. Each must exist.
pub fn make_all_durable<P: AsRef<Path>>(paths: &[P], store_dir: &Path) -> io::Result<()> {
    for p in paths {
        std::fs::symlink_metadata(p.as_ref())?;
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC)
        .open(store_dir)?;
    nix::unistd::syncfs(dir.as_raw_fd()).map_err(io::Error::from)?;
    SYNCS.with(|c| c.set(c.get() + 1));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("firn-durable-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn any_object_costs_one_syncfs() {
        let store = tmp("store");
        let small = store.join("small");
        std::fs::create_dir(&small).unwrap();
        for i in 0..3 {
            std::fs::write(small.join(format!("f{i}")), b"x").unwrap();
        }
        std::os::unix::fs::symlink("f0", small.join("link")).unwrap();
        let big = store.join("big");
        std::fs::create_dir(&big).unwrap();
        for i in 0..100 {
            std::fs::write(big.join(format!("f{i}")), b"x").unwrap();
        }
        let file = store.join("file");
        std::fs::write(&file, vec![1; 2 << 20]).unwrap();
        start_writeback(&File::open(&file).unwrap());
        for p in [&small, &big, &file, &small.join("link")] {
            let before = sync_count();
            make_durable(p, &store).unwrap();
            assert_eq!(sync_count() - before, 1, "{p:?}");
        }
        let before = sync_count();
        make_all_durable(&[&small, &big, &file], &store).unwrap();
        assert_eq!(sync_count() - before, 1);
        std::fs::remove_dir_all(&store).unwrap();
    }

    #[test]
    fn a_missing_object_is_an_error() {
        let store = tmp("missing");
        assert!(make_durable(&store.join("nothing"), &store).is_err());
        std::fs::remove_dir_all(&store).unwrap();
    }
}

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
//!   call: a small object (at most [`SMALL_OBJECT`] files and directories) has each of
//!   them fsynced, then the store directory (its entry); a larger one is covered by one
//!   `syncfs(2)` of the store's file system, which writes back every dirty inode of that
//!   file system and commits the journal once. Small objects are not synced with
//!   `syncfs` because it also waits for everything else dirty on the file system
//!   (another process's build tree, say), which would make every small add pay for it.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Files at least this large get their write-out started as soon as they are written.
pub const WRITEBACK_MIN: u64 = 1 << 20;

/// Objects with at most this many files and directories are fsynced one by one.
pub const SMALL_OBJECT: usize = 16;

thread_local! {
    /// How many `fsync`s and `syncfs`s [`make_durable`] made on this thread.
    static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// `(fsync calls, syncfs calls)` made by [`make_durable`] on this thread so far (for
/// tests: per thread, so that tests running side by side do not see each other's).
pub fn sync_counts() -> (u64, u64) {
    COUNTS.with(Cell::get)
}

fn count(fsyncs: u64, syncfss: u64) {
    COUNTS.with(|c| {
        let (a, b) = c.get();
        c.set((a + fsyncs, b + syncfss));
    });
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
/// together): one `syncfs` for all of them unless they are small together.
pub fn make_all_durable<P: AsRef<Path>>(paths: &[P], store_dir: &Path) -> io::Result<()> {
    let mut small = Vec::new();
    let mut is_small = true;
    for p in paths {
        if !collect_small(p.as_ref(), &mut small)? {
            is_small = false;
            break;
        }
    }
    if is_small {
        for (p, dir) in &small {
            fsync_path(p, *dir)?;
        }
        fsync_path(store_dir, true)
    } else {
        let dir = open_dir(store_dir)?;
        nix::unistd::syncfs(dir.as_raw_fd()).map_err(io::Error::from)?;
        count(0, 1);
        Ok(())
    }
}

/// Collect the files and directories of the object at `path` (symlinks have nothing
/// to sync but their directory's entry) into `out`, stopping with `false` as soon as
/// there are more than [`SMALL_OBJECT`].
fn collect_small(path: &Path, out: &mut Vec<(std::path::PathBuf, bool)>) -> io::Result<bool> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(true);
    }
    out.push((path.to_path_buf(), meta.is_dir()));
    if out.len() > SMALL_OBJECT {
        return Ok(false);
    }
    if meta.is_dir() {
        for e in std::fs::read_dir(path)? {
            if !collect_small(&e?.path(), out)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn open_dir(dir: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC)
        .open(dir)
}

fn fsync_path(p: &Path, dir: bool) -> io::Result<()> {
    let f = match dir {
        true => open_dir(p)?,
        false => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(p)?,
    };
    f.sync_all()?;
    count(1, 0);
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
    fn small_objects_are_fsynced_one_by_one_large_ones_by_one_syncfs() {
        let store = tmp("store");
        let small = store.join("small");
        std::fs::create_dir(&small).unwrap();
        for i in 0..3 {
            std::fs::write(small.join(format!("f{i}")), b"x").unwrap();
        }
        std::os::unix::fs::symlink("f0", small.join("link")).unwrap();
        let before = sync_counts();
        make_durable(&small, &store).unwrap();
        let after = sync_counts();
        // 3 files + the directory + the store directory; no syncfs.
        assert_eq!((after.0 - before.0, after.1 - before.1), (5, 0));

        let big = store.join("big");
        std::fs::create_dir(&big).unwrap();
        for i in 0..100 {
            std::fs::write(big.join(format!("f{i}")), b"x").unwrap();
        }
        let before = sync_counts();
        make_durable(&big, &store).unwrap();
        let after = sync_counts();
        assert_eq!((after.0 - before.0, after.1 - before.1), (0, 1));

        let file = store.join("file");
        std::fs::write(&file, b"x").unwrap();
        start_writeback(&File::open(&file).unwrap());
        let before = sync_counts();
        make_durable(&file, &store).unwrap();
        let after = sync_counts();
        assert_eq!((after.0 - before.0, after.1 - before.1), (2, 0));
        std::fs::remove_dir_all(&store).unwrap();
    }

    #[test]
    fn a_missing_object_is_an_error() {
        let store = tmp("missing");
        assert!(make_durable(&store.join("nothing"), &store).is_err());
        std::fs::remove_dir_all(&store).unwrap();
    }
}

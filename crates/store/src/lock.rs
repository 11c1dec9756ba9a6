//! Path locks compatible with Nix's `PathLocks`: for a path `P` the lock is an exclusive
//! `flock` on `P.lock`, taken for several paths in sorted order (so two processes never
//! deadlock). A lock file that its last holder deleted is marked stale by writing a byte
//! into it after unlinking it; a waiter that wins the lock on such a file retries with a
//! fresh one, exactly as Nix does, so firn and Nix exclude each other.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LockError {
    #[error("opening lock file '{path}': {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("locking '{path}': {source}")]
    Lock { path: PathBuf, source: nix::Error },
}

/// Held locks on a set of paths; released on drop.
#[derive(Debug, Default)]
pub struct PathLocks {
    held: Vec<(PathBuf, Flock<File>)>,
    delete_on_release: bool,
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl PathLocks {
    /// Lock `paths` (physical paths; `.lock` is appended), waiting if `wait`. Returns
    /// `None` when `wait` is false and some lock is held by someone else.
    /// `on_wait` is called once before blocking on a busy lock (to say so).
    pub fn lock(
        paths: impl IntoIterator<Item = PathBuf>,
        wait: bool,
        mut on_wait: impl FnMut(&Path),
    ) -> Result<Option<Self>, LockError> {
        let mut sorted: Vec<PathBuf> = paths.into_iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut locks = PathLocks::default();
        for path in sorted {
            let lp = lock_path(&path);
            loop {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_CLOEXEC)
                    .open(&lp)
                    .map_err(|source| LockError::Open {
                        path: lp.clone(),
                        source,
                    })?;
                let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                    Ok(l) => l,
                    Err((file, nix::Error::EWOULDBLOCK)) => {
                        if !wait {
                            return Ok(None);
                        }
                        on_wait(&path);
                        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| {
                            LockError::Lock {
                                path: lp.clone(),
                                source,
                            }
                        })?
                    }
                    Err((_, source)) => {
                        return Err(LockError::Lock {
                            path: lp.clone(),
                            source,
                        })
                    }
                };
                // Stale: the previous holder deleted it and wrote a byte to it.
                let stale = lock.metadata().map(|m| m.len() != 0).unwrap_or(true);
                if stale {
                    continue;
                }
                locks.held.push((lp, lock));
                break;
            }
        }
        Ok(Some(locks))
    }

    /// Delete the lock files when released (after the paths are final).
    pub fn set_deletion(&mut self, delete: bool) {
        self.delete_on_release = delete;
    }
}

impl Drop for PathLocks {
    fn drop(&mut self) {
        for (path, lock) in self.held.drain(..) {
            if self.delete_on_release {
                let _ = std::fs::remove_file(&path);
                // Mark stale for anyone who opened it before the unlink.
                let mut f: &File = &lock;
                let _ = f.write_all(b"d");
            }
            drop(lock);
        }
    }
}

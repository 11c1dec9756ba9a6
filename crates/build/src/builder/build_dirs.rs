//! Build directories: `$TMPDIR/nix-build-<drv name>-<n>`, 0700, owned by the build
//! user, as Nix 2.8 makes them.
//!
//! A sandboxed build's directory that is not kept is emptied when the build is over and
//! kept for the next sandboxed build, which renames it to its own name: that costs no
//! new inode, where a directory made and removed costs two (on a busy ext4, a good part
//! of a trivial build's time in the kernel). While it waits it belongs to root with mode
//! 0700, so no build user can leave anything in it for the next build; it is handed
//! over (owner, mode) only when taken. The builder saw it only as `/build`. The spares
//! go when the pool is dropped; a firn killed meanwhile leaves them as Nix leaves build
//! directories, under their old names.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{renameat2, RenameFlags};
use nix::unistd::{Gid, Uid};

use super::build_user::BuildUser;
use super::error::{io_err, ExecError};

/// How many emptied directories are kept (one per concurrent sandboxed build is enough).
const SPARE_MAX: usize = 8;

/// The spare build directories of one builder.
#[derive(Debug, Default)]
pub struct BuildDirs {
    spare: Vec<PathBuf>,
}

impl BuildDirs {
    /// A fresh build directory for `drv_base` owned by `user`; for a sandboxed build, a
    /// spare one renamed if there is one.
    pub fn take(
        &mut self,
        drv_base: &str,
        user: Option<&BuildUser>,
        sandboxed: bool,
    ) -> Result<PathBuf, ExecError> {
        let mut spare = match sandboxed {
            true => self.spare.pop(),
            false => None,
        };
        let tmp = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let name = drv_base.get(33..).unwrap_or(drv_base);
        for n in 0..100_000 {
            let dir = tmp.join(format!("nix-build-{name}-{n}"));
            if let Some(s) = &spare {
                // Never onto an existing name (`rename` would replace an empty directory).
                match renameat2(None, s, None, &dir, RenameFlags::RENAME_NOREPLACE) {
                    Ok(()) => {
                        hand_over(&dir, user)?;
                        return Ok(dir);
                    }
                    Err(nix::errno::Errno::EEXIST) => continue,
                    // A file system without `renameat2`, say: a new directory after all.
                    Err(_) => {
                        let _ = firn_store::canonical::delete_path(s);
                        spare = None;
                    }
                }
            }
            match fs::create_dir(&dir) {
                Ok(()) => {
                    hand_over(&dir, user)?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            }
        }
        Err(io_err(&tmp)(io::Error::other(
            "no free build directory name",
        )))
    }

    /// The sandboxed build that used `dir` is over and its directory is not kept: take
    /// it back (root's again, emptied), or delete it if that fails or enough are kept.
    pub fn give_back(&mut self, dir: &Path) -> io::Result<()> {
        if self.spare.len() >= SPARE_MAX || take_back(dir).is_err() {
            return firn_store::canonical::delete_path(dir);
        }
        self.spare.push(dir.to_path_buf());
        Ok(())
    }
}

impl Drop for BuildDirs {
    fn drop(&mut self) {
        for d in &self.spare {
            let _ = firn_store::canonical::delete_path(d);
        }
    }
}

/// 0700 and `user`'s (if any).
fn hand_over(dir: &Path, user: Option<&BuildUser>) -> Result<(), ExecError> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    if let Some(u) = user {
        nix::unistd::chown(dir, Some(Uid::from_raw(u.uid)), Some(Gid::from_raw(u.gid)))
            .map_err(|e| io_err(dir)(e.into()))?;
    }
    Ok(())
}

/// Root's and 0700 first (nobody else can add to it from then on), then emptied.
fn take_back(dir: &Path) -> io::Result<()> {
    let (uid, gid) = (Uid::effective(), Gid::effective());
    nix::unistd::chown(dir, Some(uid), Some(gid))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    for e in fs::read_dir(dir)? {
        firn_store::canonical::delete_path(&e?.path())?;
    }
    Ok(())
}

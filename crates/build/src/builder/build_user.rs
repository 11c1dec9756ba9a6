//! Build users: members of `build-users-group`, locked in Nix's user pool
//! (`$NIX_STATE_DIR/userpool/<uid>`, `/nix/var/nix/userpool` by default), so that concurrent builds — firn's or Nix's — never
//! share a uid. Only root builds as build users; otherwise builds run as the caller.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Group, Uid, User};

use crate::builder::error::{io_err, ExecError};

/// A build user taken from the `nixbld` group, locked in the user pool like Nix does
/// (`$NIX_STATE_DIR/userpool/<uid>`), so concurrent builds — firn's or Nix's — never share
/// a uid and cannot signal each other.
#[derive(Debug)]
pub struct BuildUser {
    pub uid: u32,
    pub gid: u32,
    _lock: Flock<File>,
}

/// What asking for a build user gave.
#[derive(Debug)]
pub enum AcquiredUser {
    /// A free member of the group, locked until dropped.
    Got(BuildUser),
    /// Every member is building: wait and ask again (Nix: "waiting for UID to build").
    Busy,
    /// No build users here: firn is not root, or `build-users-group` is empty. Builds
    /// run as the caller.
    NotConfigured,
}

impl BuildUser {
    /// A free member of `group` (`build-users-group`). Only root uses build users (as
    /// Nix); an empty `group` means builds run as the caller. A group that does not
    /// exist or has no members is an error, never a build as root. Users are locked
    /// in `pool` (Nix's `<nixStateDir>/userpool`: [`firn_store::layout::userpool_dir`]).
    pub fn acquire(group: &str, pool: &Path) -> Result<AcquiredUser, ExecError> {
        if !Uid::effective().is_root() || group.is_empty() {
            return Ok(AcquiredUser::NotConfigured);
        }
        let found = Group::from_name(group).map_err(|e| ExecError::GroupLookup {
            group: group.to_owned(),
            source: e.into(),
        })?;
        let Some(group_entry) = found else {
            return Err(ExecError::NoSuchGroup(group.to_owned()));
        };
        let members: Vec<User> = group_entry
            .mem
            .iter()
            .filter_map(|m| User::from_name(m).ok().flatten())
            .filter(|u| !u.uid.is_root())
            .collect();
        if members.is_empty() {
            return Err(ExecError::NoMembers(group.to_owned()));
        }
        fs::create_dir_all(pool).map_err(io_err(pool))?;
        for user in members {
            let path = pool.join(user.uid.to_string());
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io_err(&path))?;
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(AcquiredUser::Got(Self {
                    uid: user.uid.as_raw(),
                    gid: group_entry.gid.as_raw(),
                    _lock: lock,
                }));
            }
        }
        Ok(AcquiredUser::Busy)
    }
}

/// Kill every process of `uid` (Nix's `killUser`): a child becomes that user and kills
/// everything it may signal. Needed because a builder's children can leave its process
/// group.
pub fn kill_user(uid: u32) {
    if uid == 0 {
        return;
    }
    crate::builder::sys::kill_every_process_of(Uid::from_raw(uid));
}

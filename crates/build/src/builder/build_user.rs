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

/// The members of `build-users-group` that can build (not root), and the group's gid:
/// looked up once per builder, not per build (a lookup reads `/etc/group` and
/// `/etc/passwd` once per member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildUsers {
    gid: u32,
    uids: Vec<u32>,
}

impl BuildUsers {
    /// The members of `group`. A group that does not exist or has no members is an
    /// error, never a build as root.
    pub fn lookup(group: &str) -> Result<Self, ExecError> {
        let found = Group::from_name(group).map_err(|e| ExecError::GroupLookup {
            group: group.to_owned(),
            source: e.into(),
        })?;
        let Some(group_entry) = found else {
            return Err(ExecError::NoSuchGroup(group.to_owned()));
        };
        let uids: Vec<u32> = group_entry
            .mem
            .iter()
            .filter_map(|m| User::from_name(m).ok().flatten())
            .filter(|u| !u.uid.is_root())
            .map(|u| u.uid.as_raw())
            .collect();
        if uids.is_empty() {
            return Err(ExecError::NoMembers(group.to_owned()));
        }
        Ok(Self {
            gid: group_entry.gid.as_raw(),
            uids,
        })
    }

    /// The first member not locked in `pool` (Nix's `<nixStateDir>/userpool`:
    /// [`firn_store::layout::userpool_dir`]), locked until the user is dropped.
    pub fn acquire(&self, pool: &Path) -> Result<AcquiredUser, ExecError> {
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
        };
        for &uid in &self.uids {
            let path = pool.join(uid.to_string());
            // The pool directory is made when it is missing, not looked at every build.
            let file = match open(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    fs::create_dir_all(pool).map_err(io_err(pool))?;
                    open(&path)
                }
                other => other,
            }
            .map_err(io_err(&path))?;
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(AcquiredUser::Got(BuildUser {
                    uid,
                    gid: self.gid,
                    _lock: lock,
                }));
            }
        }
        Ok(AcquiredUser::Busy)
    }
}

/// Whether builds use build users: only root does (as Nix), and an empty
/// `build-users-group` means builds run as the caller.
pub fn uses_build_users(group: &str) -> bool {
    Uid::effective().is_root() && !group.is_empty()
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

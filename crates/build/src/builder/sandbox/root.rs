//! The sandbox's root on the host: laid out as `plan::plan_sandbox` planned, reusing the
//! spare roots of earlier builds of the same [`RootPool`], hard-linking file inputs, and
//! putting the mount points of many directory inputs on a tmpfs under an overlay. The
//! mounts themselves happen in the child's own mount namespace (`child.rs`).
//!
//! A [`SandboxRoot`] belongs to one build; dropped without going back to the pool, it is
//! deleted, so no path of an error or an interrupt leaves a root behind.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

use super::child::{MaskKind, SandboxSetup};
use super::plan::{Bind, ProcMask, SandboxPlan, SANDBOX_GID, SANDBOX_UID};
use super::seccomp::seccomp_filter;
use crate::builder::build_user::BuildUser;
use crate::builder::error::{cstring, io_err, ExecError};

/// From how many directory inputs on their mount points go on a tmpfs under an overlay.
const OVERLAY_MIN_INPUTS: usize = 16;

/// The tmpfs directory holding a root's mount points for directory inputs (the host's
/// `/dev/shm`, so that making them costs no disk inodes).
fn lower_dir(root: &Path) -> PathBuf {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from(format!(
        "/dev/shm/.firn-lower-{}-{name}",
        std::process::id()
    ))
}

/// Remove the mount-point trees that firn processes killed before they could clean up
/// left in `/dev/shm`.
fn clean_stale_lowers() {
    let Ok(entries) = fs::read_dir("/dev/shm") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(".firn-lower-")
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = firn_store::canonical::delete_path(&e.path());
        }
    }
}

/// A root a build is using. Deleted on drop unless [`RootPool::recycle`] took it back.
#[derive(Debug)]
pub struct SandboxRoot {
    /// Empty once recycled (nothing left to delete).
    path: PathBuf,
    layout: String,
    /// The store dir inside it (where the inputs' links and mount points are, and where
    /// the builder leaves its outputs).
    store_inside: PathBuf,
    /// The names in `store_inside` that are hard links to store inputs, made (or kept)
    /// for this build: a spare root keeps them for the next build that needs them.
    linked: HashSet<OsString>,
}

impl SandboxRoot {
    /// The root on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the builder's store directory is on the host.
    pub fn store_inside(&self) -> &Path {
        &self.store_inside
    }
}

impl Drop for SandboxRoot {
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let _ = firn_store::canonical::delete_path(&lower_dir(&self.path));
        let _ = firn_store::canonical::delete_path(&self.path);
    }
}

/// A sandbox root whose build is over, emptied, kept for the next build of the same
/// layout: making a root's skeleton (`/dev`, `/etc`, links, mount points) takes some 30
/// new inodes, which is most of a trivial build's cost on a slow disk.
#[derive(Debug)]
struct SpareRoot {
    layout: String,
    path: PathBuf,
    /// Input links left in its store dir (see [`SandboxRoot::linked`]).
    linked: HashSet<OsString>,
}

impl Drop for SpareRoot {
    fn drop(&mut self) {
        let _ = firn_store::canonical::delete_path(&self.path);
    }
}

/// The spare roots of one builder; they are deleted when it is dropped.
#[derive(Debug, Default)]
pub struct RootPool {
    spare: Vec<SpareRoot>,
    /// Numbers the spare roots' names (unique within the pool's process: the name also
    /// carries the pid, and two pools in one process number apart by their address).
    seq: usize,
    /// Stale `/dev/shm` trees of dead firn processes were removed.
    cleaned_lowers: bool,
}

/// What makes two roots interchangeable: everything but the store inputs.
fn layout_key(plan: &SandboxPlan, user: Option<&BuildUser>) -> String {
    let host_binds: Vec<_> = plan
        .binds
        .iter()
        .filter(|b| !b.store_input)
        .map(|b| &b.target)
        .collect();
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        plan.dirs,
        plan.files,
        plan.symlinks,
        host_binds,
        user.map(|u| u.gid)
    )
}

impl RootPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// The build that used `root` is over (its outputs moved out): empty its store dir
    /// and `/tmp` and keep it for the next build of the same layout; if that fails, it is
    /// deleted.
    pub fn recycle(&mut self, mut root: SandboxRoot) {
        let _ = firn_store::canonical::delete_path(&lower_dir(&root.path));
        // Everything in `dir` goes but the way down to `keep` (a store dir under `/tmp`,
        // `NIX_STORE_DIR=/tmp/…`, which is emptied first).
        fn empty(dir: &Path, keep: &Path) -> io::Result<()> {
            for e in fs::read_dir(dir)? {
                let p = e?.path();
                if p == keep {
                    continue;
                }
                match keep.starts_with(&p) {
                    true => empty(&p, keep)?,
                    false => firn_store::canonical::delete_path(&p)?,
                }
            }
            Ok(())
        }
        // Named like a firn temporary (`.<name>.tmp-<pid>`) so that `firn gc` leaves it
        // alone while this process lives and removes it once it is gone.
        let spare = root.path.with_file_name(format!(
            ".firn-spare-root-{}-{:x}.tmp-{}",
            self.seq,
            self as *const Self as usize,
            std::process::id()
        ));
        self.seq += 1;
        // The inputs' links stay: the next build (in a chain, say) needs most of them
        // again, and a link kept costs a `statx` where a link made and removed costs two
        // journaled directory changes. Only names firn linked are kept; the builder
        // cannot have removed or replaced them (the store dir is sticky and not its
        // own), and `finish_root` checks each against its input before using it.
        let kept = empty_but(&root.store_inside, &root.linked)
            .and_then(|()| empty(&root.path.join("tmp"), &root.store_inside))
            .and_then(|()| fs::rename(&root.path, &spare));
        if kept.is_ok() {
            root.path = PathBuf::new();
            self.spare.push(SpareRoot {
                layout: std::mem::take(&mut root.layout),
                path: spare,
                linked: std::mem::take(&mut root.linked),
            });
        }
        // Otherwise `root` is deleted as it drops.
    }

    /// Create the sandbox's root on the host (directories, files, mount points) as the
    /// plan says, or take a spare one of the same layout. `ids` are the host uid and gid
    /// the builder runs as.
    pub(crate) fn prepare(
        &mut self,
        plan: &SandboxPlan,
        user: Option<&BuildUser>,
        ids: (u32, u32),
    ) -> Result<(SandboxRoot, SandboxSetup), ExecError> {
        let root = &plan.root;
        let layout = layout_key(plan, user);
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        firn_store::canonical::delete_path(root).map_err(io_err(root))?;
        let reused = match self.spare.iter().position(|s| s.layout == layout) {
            Some(i) => {
                let mut s = self.spare.swap_remove(i);
                match fs::rename(&s.path, root) {
                    Ok(()) => {
                        s.path = PathBuf::new();
                        Some(std::mem::take(&mut s.linked))
                    }
                    Err(_) => None,
                }
            }
            None => None,
        };
        let mut owned = SandboxRoot {
            path: root.clone(),
            layout,
            store_inside: inside(&plan.store_dir),
            linked: HashSet::new(),
        };
        if reused.is_none() {
            make_skeleton(plan, user)?;
        }
        if !self.cleaned_lowers {
            clean_stale_lowers();
            self.cleaned_lowers = true;
        }
        let setup = finish_root(plan, ids, reused, &mut owned.linked)?;
        Ok((owned, setup))
    }
}

/// A new root's skeleton: directories, files, symlinks.
fn make_skeleton(plan: &SandboxPlan, user: Option<&BuildUser>) -> Result<(), ExecError> {
    let root = &plan.root;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    fs::create_dir_all(root).map_err(io_err(root))?;
    // As Nix: 0750 and group-owned by the build group, so the builder can enter it
    // and nobody else on the host can.
    fs::set_permissions(root, fs::Permissions::from_mode(0o750)).map_err(io_err(root))?;
    let chgrp = |p: &Path| -> Result<(), ExecError> {
        if let Some(u) = user {
            nix::unistd::chown(p, None, Some(Gid::from_raw(u.gid)))
                .map_err(|e| io_err(p)(e.into()))?;
        }
        Ok(())
    };
    chgrp(root)?;
    for (d, mode) in &plan.dirs {
        let p = inside(d);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(io_err(&p))?;
        if *mode == 0o1775 {
            chgrp(&p)?;
        }
    }
    for (f, contents) in &plan.files {
        let p = inside(f);
        fs::write(&p, contents).map_err(io_err(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).map_err(io_err(&p))?;
    }
    for (link, target) in &plan.symlinks {
        let p = inside(link);
        std::os::unix::fs::symlink(target, &p).map_err(io_err(&p))?;
    }
    Ok(())
}

/// Delete everything in `dir` but the entries named in `keep`.
fn empty_but(dir: &Path, keep: &HashSet<OsString>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if !keep.contains(&e.file_name()) {
            firn_store::canonical::delete_path(&e.path())?;
        }
    }
    Ok(())
}

/// The per-build part of a root: inputs linked or given mount points (host mount
/// points too if it is not `reused`), and the C strings the child needs. A reused root
/// comes with the input links the last build left in its store dir: those this build
/// needs too are kept if they still are its inputs' files, the others removed. The
/// names linked for this build go to `linked`.
fn finish_root(
    plan: &SandboxPlan,
    ids: (u32, u32),
    reused: Option<HashSet<OsString>>,
    linked: &mut HashSet<OsString>,
) -> Result<SandboxSetup, ExecError> {
    let root = &plan.root;
    let reused_root = reused.is_some();
    let mut left = reused.unwrap_or_default();
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let c = |p: &Path| cstring(p.as_os_str().as_bytes());
    let mut binds = Vec::new();
    let mut dir_inputs: Vec<&Bind> = Vec::new();
    for b in &plan.binds {
        let target = inside(&b.target);
        if b.store_input {
            let meta = fs::symlink_metadata(&b.source).map_err(io_err(&b.source))?;
            // A file or symlink of the store is linked, not mounted (Nix's linkOrCopy):
            // a link is ~40x cheaper than creating a mount point here. It stays
            // read-only for the builder: store files are 0444 and owned by someone the
            // builder is not, and it has no capabilities. If the builder's host uid
            // owns it (a per-user store), it could chmod it: mount it read-only instead.
            let link = !meta.is_dir() && meta.uid() != ids.0;
            let name = target.file_name().map(OsString::from).unwrap_or_default();
            if left.remove(&name) {
                let same = fs::symlink_metadata(&target)
                    .is_ok_and(|t| (t.dev(), t.ino()) == (meta.dev(), meta.ino()));
                if link && same {
                    linked.insert(name);
                    continue;
                }
                firn_store::canonical::delete_path(&target).map_err(io_err(&target))?;
            }
            if link {
                fs::hard_link(&b.source, &target).map_err(io_err(&target))?;
                linked.insert(name);
                continue;
            }
            if meta.is_dir() {
                dir_inputs.push(b);
                continue;
            }
        }
        let meta = match fs::metadata(&b.source) {
            Ok(m) => m,
            Err(_) if b.optional => continue,
            Err(e) => return Err(io_err(&b.source)(e)),
        };
        if reused_root && !b.store_input && fs::symlink_metadata(&target).is_ok() {
            binds.push((c(&b.source)?, c(&target)?, b.read_only));
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        if meta.is_dir() {
            fs::create_dir_all(&target).map_err(io_err(&target))?;
        } else if fs::symlink_metadata(&target).is_err() {
            File::create(&target).map_err(io_err(&target))?;
        }
        binds.push((c(&b.source)?, c(&target)?, b.read_only));
    }
    // The last build's links this one does not need go before its builder starts.
    let store_inside = inside(Path::new(&plan.store_dir));
    for name in left {
        let p = store_inside.join(name);
        firn_store::canonical::delete_path(&p).map_err(io_err(&p))?;
    }
    // Directory inputs need mount points in the store dir. Many of them: on a tmpfs
    // (an overlay's lower layer, the root's store dir its upper layer, where the
    // outputs land as before), since a directory on the store's disk costs far more
    // than the mount itself; a few: on the disk directly.
    let lower = lower_dir(root);
    let mut overlay = None;
    if dir_inputs.len() >= OVERLAY_MIN_INPUTS {
        let made = (|| -> io::Result<()> {
            firn_store::canonical::delete_path(&lower)?;
            fs::create_dir(&lower)?;
            for b in &dir_inputs {
                if let Some(name) = b.target.file_name() {
                    fs::create_dir(lower.join(name))?;
                }
            }
            Ok(())
        })();
        let work = root.join("proc/.overlay-work");
        let paths = [&lower, &store_inside, &work].map(|p| p.display().to_string());
        // Overlay options cannot carry these characters in paths.
        let plain = paths.iter().all(|p| !p.contains([',', ':', '\\']));
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            paths[0], paths[1], paths[2]
        );
        let work_ready = fs::create_dir_all(&work).is_ok()
            && nix::unistd::chown(
                &work,
                Some(Uid::from_raw(ids.0)),
                Some(Gid::from_raw(ids.1)),
            )
            .is_ok();
        if made.is_ok() && plain && work_ready {
            overlay = Some((c(&store_inside)?, cstring(opts.as_bytes())?));
        } else {
            let _ = firn_store::canonical::delete_path(&lower);
        }
    }
    let mut input_binds = Vec::new();
    for b in dir_inputs {
        let target = inside(&b.target);
        if overlay.is_none() {
            fs::create_dir(&target).map_err(io_err(&target))?;
        }
        input_binds.push((c(&b.source)?, c(&target)?, b.read_only));
    }
    let mut proc_masks = Vec::new();
    for m in &plan.proc_masks {
        let (p, kind) = match m {
            ProcMask::File(p) => (p, MaskKind::File),
            ProcMask::Dir(p) => (p, MaskKind::Dir),
            ProcMask::ReadOnly(p) => (p, MaskKind::ReadOnly),
        };
        // The kernel that serves the sandbox's /proc is this one: skip what it lacks.
        if fs::symlink_metadata(p).is_ok() {
            proc_masks.push((c(&inside(p))?, kind));
        }
    }
    // The old root is parked on the root's own /tmp and detached from there, which
    // uncovers the empty /tmp again: no extra directory to make and remove per build.
    let put_old = root.join("tmp");
    Ok(SandboxSetup {
        seccomp: seccomp_filter(),
        root: c(root)?,
        binds,
        overlay,
        input_binds,
        proc_dir: c(&inside(Path::new("/proc")))?,
        proc_masks,
        shm_dir: c(&inside(Path::new("/dev/shm")))?,
        pts_dir: c(&inside(Path::new("/dev/pts")))?,
        private_network: plan.private_network,
        put_old: c(&put_old)?,
        put_old_inside: c(Path::new("/tmp"))?,
        build_dir: c(&plan.build_dir)?,
        uid_map: format!("{} {} 1\n", SANDBOX_UID, ids.0).into_bytes(),
        gid_map: format!("{} {} 1\n", SANDBOX_GID, ids.1).into_bytes(),
        step_fd: -1,
    })
}

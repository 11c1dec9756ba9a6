//! Garbage collection, as Nix 2.8's `collectGarbage` does it by default.
//!
//! **Roots** are found as `findRoots` finds them: every symlink below
//! `ROOT/nix/var/nix/gcroots` and `ROOT/nix/var/nix/profiles` that points into the store
//! (or into a store object) is a root; a symlink pointing outside the store is an
//! indirect root, whose target must itself be a symlink into the store (stale indirect
//! links under `gcroots/auto` are removed); a regular file named like a store path's
//! base name is a root for that path. Runtime roots are the store paths that running
//! processes use (`/proc/<pid>/{exe,cwd,fd/*,maps,environ}`), temporary roots those in
//! the live processes' `temproots/<pid>` files (see [`crate::temproots`]).
//!
//! **Live** is the closure of the roots under references, plus the deriver of every live
//! path (`keep-derivations = true`) and, with `keep-outputs`, the outputs of every live
//! derivation. An entry of the store directory whose hash part is a temporary root is
//! live too, valid or not (a path being built, its `.lock`, its `.check`, the
//! `<drv>.chroot` of a build).
//!
//! **Dead** is every other valid path, every other entry whose name is a store path
//! (interrupted adds and builds, `.lock`, `.chroot`, `.check` leftovers), and every
//! entry that is not a store path at all; what is still in use is left alone even so: a
//! `.lock` somebody holds, the `.chroot`/`.check` of a build whose output lock is held,
//! an invalid path whose `.lock` is held, a temporary directory of a live process.
//!
//! **Deletion** runs with `gc.lock` held exclusively, so no temporary root can be added
//! meanwhile. Dead valid paths go first, referrers before references, each invalidated
//! in the database and then deleted from the disk: at every moment the valid paths are
//! closed under references and complete on disk. A crash in between leaves an invalid
//! (perhaps half-deleted) directory, which is garbage to the next collection and
//! nothing to `verify`. Then the other dead entries, then unused `.links` files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use firn_derivation::StorePath;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::db::{DbError, PathGraph};
use crate::message::StoreMessage;
use crate::store::{Store, StoreError};
use crate::temproots::{self, RootsServer, TempRoots};

/// Roots: each valid target with the links that keep it alive (`{temp:PID}` for a
/// temporary root, `/proc/…` for a runtime root, `{censored}` when censored).
pub type Roots = BTreeMap<StorePath, BTreeSet<PathBuf>>;

const CENSORED: &str = "{censored}";

/// What a collection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcAction {
    /// Delete the dead paths (`nix-store --gc`).
    DeleteDead,
    /// Only list the live paths (`--print-live`).
    ReturnLive,
    /// Only list the dead paths (`--print-dead`).
    ReturnDead,
}

/// Options of a collection, with Nix's defaults.
#[derive(Debug, Clone)]
pub struct GcOptions {
    pub action: GcAction,
    /// Stop once more than this many bytes were freed (`--max-freed`); 0 deletes
    /// nothing, as in Nix.
    pub max_freed: u64,
    /// `keep-outputs`: the outputs of live derivations are live (default false).
    pub keep_outputs: bool,
    /// `keep-derivations`: the derivers of live paths are live (default true).
    pub keep_derivations: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            action: GcAction::DeleteDead,
            max_freed: u64::MAX,
            keep_outputs: false,
            keep_derivations: true,
        }
    }
}

/// What a collection found or did.
#[derive(Debug, Default, Clone)]
pub struct GcResults {
    /// Deleted paths (or, for the `Return*` actions, the live or dead ones), printed.
    pub paths: BTreeSet<String>,
    /// Bytes freed: the sizes of deleted files (not directories) with at most two
    /// links, as Nix counts them.
    pub bytes_freed: u64,
}

pub use crate::alive::{AliveReason, Needer};

/// Whether an I/O error means the file is not there (Nix's `pathExists` is false on
/// these and throws on any other).
pub(crate) fn is_absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ENOTDIR)
}

/// Why a dead-looking entry is left alone.
fn lock_busy(lock: &Path) -> bool {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(lock)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        // Cannot tell: assume somebody uses it.
        Err(_) => return true,
    };
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Delete `path` and everything below it whatever the modes, counting freed bytes as
/// Nix does (regular files and symlinks with one or two links; directories not).
pub fn delete_counting(path: &Path) -> io::Result<u64> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        if meta.mode() & 0o700 != 0o700 {
            fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() | 0o700))?;
        }
        let mut freed = 0;
        for entry in fs::read_dir(path)? {
            freed += delete_counting(&entry?.path())?;
        }
        match fs::remove_dir(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(freed)
    } else {
        let freed = if meta.nlink() <= 2 { meta.len() } else { 0 };
        match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
            Ok(()) => Ok(freed),
        }
    }
}

/// The hash part an entry of the store directory is named after, if any: a store
/// path (`<hash>-<name>`, also `.lock`, `.chroot`, `.check`) or a firn temporary
/// (`.<hash>-<name>.tmp-<pid>`).
fn entry_hash(name: &str) -> Option<&str> {
    let rest = name.strip_prefix('.').unwrap_or(name);
    let hash = rest.get(..32)?;
    let ok = rest.as_bytes().get(32) == Some(&b'-')
        && hash
            .bytes()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase());
    ok.then_some(hash)
}

/// Nix's `isInStore`-and-`toStorePath` on raw text: the store path `target` names.
fn runtime_target(sd: &str, target: &str) -> Option<String> {
    let rest = target.strip_prefix(sd)?.strip_prefix('/')?;
    let first = rest.split('/').next()?;
    Some(format!("{sd}/{first}"))
}

/// The store paths mentioned in `text` (`<store>/[0-9a-z]+[0-9a-zA-Z+-._?=]*`).
fn store_paths_in(text: &[u8], sd: &str, out: &mut Vec<String>) {
    let prefix = format!("{sd}/");
    let pre = prefix.as_bytes();
    let mut i = 0;
    while let Some(at) = memchr::memmem::find(&text[i..], pre) {
        let start = i + at;
        let mut end = start + pre.len();
        let first_ok = text
            .get(end)
            .is_some_and(|c| c.is_ascii_digit() || c.is_ascii_lowercase());
        if first_ok {
            while text.get(end).is_some_and(|&c| {
                c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
            }) {
                end += 1;
            }
            out.push(String::from_utf8_lossy(&text[start..end]).into_owned());
        }
        i = end.max(start + 1);
    }
}

impl Store {
    /// The store path a link target names, if it is inside the store.
    fn store_path_of_target(&self, target: &Path) -> Option<StorePath> {
        let logical = target.strip_prefix(self.store_dir().as_str()).ok()?;
        let first = logical.components().next()?;
        let full = format!(
            "{}/{}",
            self.store_dir().as_str(),
            first.as_os_str().to_string_lossy()
        );
        self.store_dir().parse(&full).ok()
    }

    fn found_root(&self, link: &Path, target: &Path, roots: &mut Roots) -> Result<(), StoreError> {
        if let Some(p) = self.store_path_of_target(target) {
            if self.db().is_valid_path(&p)? {
                roots.entry(p).or_default().insert(link.to_path_buf());
            }
        }
        Ok(())
    }

    /// `findRoots` on `path`: a root that cannot be read for a permanent reason
    /// (permission, gone, not a directory) is skipped, saying so, as Nix does; any
    /// other failure is an error (a root must not be taken for garbage).
    fn scan_roots(
        &self,
        path: &Path,
        auto_dir: &Path,
        roots: &mut Roots,
    ) -> Result<(), StoreError> {
        match self.scan_root(path, auto_dir, roots) {
            Err(StoreError::Io { source, .. })
                if is_absent(&source) || source.kind() == io::ErrorKind::PermissionDenied =>
            {
                self.report(&StoreMessage::CannotReadRoot {
                    path: path.to_path_buf(),
                });
                Ok(())
            }
            r => r,
        }
    }

    fn scan_root(&self, path: &Path, auto_dir: &Path, roots: &mut Roots) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::symlink_metadata(path).map_err(io_err)?;
        if meta.is_dir() {
            let mut names = Vec::new();
            for e in fs::read_dir(path).map_err(io_err)? {
                names.push(e.map_err(io_err)?.path());
            }
            names.sort();
            for p in names {
                self.scan_roots(&p, auto_dir, roots)?;
            }
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(path).map_err(io_err)?;
            if target.starts_with(self.store_dir().as_str()) {
                self.found_root(path, &target, roots)?;
            } else {
                // Indirect root: the target is a symlink somewhere else.
                let target =
                    crate::store::absolute(&path.parent().unwrap_or(Path::new("/")).join(&target));
                match fs::symlink_metadata(&target) {
                    Err(e) if is_absent(&e) => {
                        if path.starts_with(auto_dir) {
                            self.report(&StoreMessage::RemovingStaleLink {
                                link: path.to_path_buf(),
                                target: target.clone(),
                            });
                            // As Nix: a link that cannot be removed stays, harmless.
                            let _ = fs::remove_file(path);
                        }
                    }
                    Err(e) => return Err(io_err(e)),
                    Ok(m) if m.file_type().is_symlink() => {
                        let t2 = fs::read_link(&target).map_err(io_err)?;
                        if t2.starts_with(self.store_dir().as_str()) {
                            self.found_root(&target, &t2, roots)?;
                        }
                    }
                    Ok(_) => {}
                }
            }
        } else if meta.is_file() {
            let base = path.file_name().map(|b| b.to_string_lossy().into_owned());
            if let Some(p) = base.and_then(|b| {
                self.store_dir()
                    .parse(&format!("{}/{b}", self.store_dir().as_str()))
                    .ok()
            }) {
                if self.db().is_valid_path(&p)? {
                    roots.entry(p).or_default().insert(path.to_path_buf());
                }
            }
        }
        Ok(())
    }

    /// Runtime roots (`findRuntimeRoots`): store paths that running processes have as
    /// executable, working directory, open file, mapping or in their environment.
    fn find_runtime_roots(&self, roots: &mut Roots, censor: bool) -> Result<(), StoreError> {
        let sd = self.store_dir().as_str().to_owned();
        let mut unchecked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let link = |file: String, unchecked: &mut BTreeMap<String, BTreeSet<String>>| {
            if let Ok(t) = fs::read_link(&file) {
                let t = t.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    unchecked.entry(t).or_default().insert(file);
                }
            }
        };
        if let Ok(procs) = fs::read_dir("/proc") {
            for p in procs.flatten() {
                let pid = p.file_name().to_string_lossy().into_owned();
                if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let base = format!("/proc/{pid}");
                link(format!("{base}/exe"), &mut unchecked);
                link(format!("{base}/cwd"), &mut unchecked);
                if let Ok(fds) = fs::read_dir(format!("{base}/fd")) {
                    for fd in fds.flatten() {
                        let name = fd.file_name().to_string_lossy().into_owned();
                        if !name.starts_with('.') {
                            link(format!("{base}/fd/{name}"), &mut unchecked);
                        }
                    }
                }
                let maps = format!("{base}/maps");
                if let Ok(text) = fs::read(&maps) {
                    for line in text.split(|&b| b == b'\n') {
                        let fields: Vec<&[u8]> = line
                            .split(|b| b.is_ascii_whitespace())
                            .filter(|f| !f.is_empty())
                            .collect();
                        if fields.len() == 6 && fields[5].starts_with(b"/") {
                            let t = String::from_utf8_lossy(fields[5]).into_owned();
                            unchecked.entry(t).or_default().insert(maps.clone());
                        }
                    }
                }
                let environ = format!("{base}/environ");
                if let Ok(text) = fs::read(&environ) {
                    let mut found = Vec::new();
                    store_paths_in(&text, &sd, &mut found);
                    for t in found {
                        unchecked.entry(t).or_default().insert(environ.clone());
                    }
                }
            }
        }
        for f in [
            "/proc/sys/kernel/modprobe",
            "/proc/sys/kernel/fbsplash",
            "/proc/sys/kernel/poweroff_cmd",
        ] {
            if let Ok(t) = fs::read_to_string(f) {
                unchecked.entry(t).or_default().insert(f.to_owned());
            }
        }
        for (target, links) in unchecked {
            let Some(full) = runtime_target(&sd, &target) else {
                continue;
            };
            let Ok(p) = self.store_dir().parse(&full) else {
                continue;
            };
            if !self.db().is_valid_path(&p)? {
                continue;
            }
            let entry = roots.entry(p).or_default();
            if censor {
                entry.insert(PathBuf::from(CENSORED));
            } else {
                entry.extend(links.into_iter().map(PathBuf::from));
            }
        }
        Ok(())
    }

    /// The permanent and runtime roots (`findRootsNoTemp`): everything under
    /// `gcroots/` and `profiles/`, and what running processes use.
    pub fn find_roots_no_temp(&self, censor: bool) -> Result<Roots, StoreError> {
        let state = self.state_dir();
        let auto_dir = state.join("gcroots/auto");
        let mut roots = Roots::new();
        self.scan_roots(&state.join("gcroots"), &auto_dir, &mut roots)?;
        self.scan_roots(&state.join("profiles"), &auto_dir, &mut roots)?;
        self.find_runtime_roots(&mut roots, censor)?;
        Ok(roots)
    }

    /// The temporary roots of the live processes (the files of dead ones are removed,
    /// saying so through `log`).
    pub fn find_temp_roots(
        &self,
        log: &mut dyn FnMut(&StoreMessage),
    ) -> Result<TempRoots, StoreError> {
        temproots::read_temp_roots(&self.state_dir(), self.store_dir(), log)
    }

    /// All roots, as `nix-store --gc --print-roots` and `-q --roots` see them:
    /// permanent, runtime, and temporary (linked from `{temp:PID}`, valid or not).
    pub fn find_roots(&self) -> Result<Roots, StoreError> {
        let mut roots = self.find_roots_no_temp(false)?;
        let reporter = self.reporter().clone();
        let mut log = |m: &StoreMessage| reporter.report(m);
        for (p, pids) in self.find_temp_roots(&mut log)? {
            let entry = roots.entry(p).or_default();
            for pid in pids {
                entry.insert(PathBuf::from(format!("{{temp:{pid}}}")));
            }
        }
        Ok(roots)
    }

    /// What keeps `paths` alive: their referrers' closure, plus the outputs of any `.drv`
    /// in it that it derived (Nix's default `keep-derivations = true`).
    pub fn liveness_closure(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut seen: BTreeSet<StorePath> = BTreeSet::new();
        let mut work: Vec<StorePath> = paths.to_vec();
        while let Some(p) = work.pop() {
            if !seen.insert(p.clone()) {
                continue;
            }
            work.extend(self.db().query_referrers(&p)?);
            if p.is_derivation() {
                for out in self.db().query_derivation_outputs(&p)?.into_values() {
                    if self.derived_by(&out, &p)? {
                        work.push(out);
                    }
                }
            }
        }
        Ok(seen)
    }

    /// Whether `out` is valid and records `drv` as its deriver.
    fn derived_by(&self, out: &StorePath, drv: &StorePath) -> Result<bool, StoreError> {
        Ok(self
            .db()
            .query_path_info(out)?
            .is_some_and(|i| i.deriver.as_ref() == Some(drv)))
    }

    /// The closure of `starts` that a collection keeps: references, derivers
    /// (`keep-derivations`), outputs of derivations (`keep-outputs`). Valid paths only.
    fn gc_closure(
        &self,
        starts: impl IntoIterator<Item = StorePath>,
        opts: &GcOptions,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut seen = BTreeSet::new();
        let mut work: Vec<StorePath> = starts.into_iter().collect();
        while let Some(p) = work.pop() {
            if seen.contains(&p) {
                continue;
            }
            let Some(info) = self.db().query_path_info(&p)? else {
                continue;
            };
            if opts.keep_outputs && p.is_derivation() {
                work.extend(self.db().query_derivation_outputs(&p)?.into_values());
            }
            if opts.keep_derivations {
                work.extend(info.deriver);
            }
            work.extend(info.references);
            seen.insert(p);
        }
        Ok(seen)
    }

    /// The outputs of the derivation `drv` (from the database, or from the file; none
    /// when the file is gone or unreadable). A database error is an error: it must not
    /// make a build's sandbox look unused.
    fn outputs_of(&self, drv: &StorePath) -> Result<Vec<StorePath>, StoreError> {
        let outs = self.db().query_derivation_outputs(drv)?;
        if !outs.is_empty() {
            return Ok(outs.into_values().collect());
        }
        let Ok(d) = self.read_derivation(drv) else {
            return Ok(Vec::new());
        };
        Ok(d.output_paths(self.store_dir())
            .map(|o| o.into_values().collect())
            .unwrap_or_default())
    }

    /// Whether a dead-looking entry that names a store path is in use all the same: a
    /// held `.lock`, the `.chroot` of a build whose output lock is held, the `.check`
    /// or the half-built content of a path whose lock is held.
    fn entry_in_use(&self, name: &str) -> Result<bool, StoreError> {
        let real = self.real_store_dir().join(name);
        let sd = self.store_dir();
        let parse = |base: &str| sd.parse(&format!("{}/{base}", sd.as_str())).ok();
        Ok(if name.ends_with(".lock") {
            lock_busy(&real)
        } else if let Some(drv) = name.strip_suffix(".chroot") {
            match parse(drv) {
                Some(drv) => self
                    .outputs_of(&drv)?
                    .iter()
                    .any(|o| lock_busy(&with_suffix(&self.real_path(o), ".lock"))),
                None => false,
            }
        } else if let Some(out) = name.strip_suffix(".check") {
            lock_busy(&with_suffix(&self.real_store_dir().join(out), ".lock"))
        } else {
            lock_busy(&with_suffix(&real, ".lock"))
        })
    }

    /// Whether an entry that is not a store path belongs to a live process: a firn
    /// temporary (`.<base>.tmp-<pid>`) whose path is temp-rooted or whose process
    /// lives, a Nix temporary directory (`tmp-…`) that is locked.
    fn junk_in_use(&self, name: &str, temp_hashes: &HashSet<String>) -> bool {
        let real = self.real_store_dir().join(name);
        if let Some((base, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) {
            let rooted = base.get(..32).is_some_and(|h| temp_hashes.contains(h));
            let alive = !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && Path::new("/proc").join(pid).exists();
            return rooted || alive;
        }
        if name.starts_with("tmp-") {
            return match fs::File::open(&real) {
                Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err(),
                Err(_) => false,
            };
        }
        false
    }

    /// Delete one entry of the store directory (a `.lock` only if it is free, under its
    /// lock, marking it stale for anyone who opened it before), adding to `results`.
    fn delete_entry(
        &self,
        name: &str,
        results: &mut GcResults,
        log: &mut dyn FnMut(&StoreMessage),
    ) -> Result<(), StoreError> {
        let real = self.real_store_dir().join(name);
        let shown = format!("{}/{name}", self.store_dir().as_str());
        let io_err = |source| StoreError::Io {
            path: real.clone(),
            source,
        };
        if name.ends_with(".lock") && !name.starts_with('.') {
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_CLOEXEC)
                .open(&real)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err(e)),
            };
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => l,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(()),
                Err((_, e)) => return Err(io_err(e.into())),
            };
            log(&StoreMessage::Deleting {
                path: shown.clone(),
            });
            let meta = lock.metadata().map_err(io_err)?;
            fs::remove_file(&real).map_err(io_err)?;
            let _ = (&*lock).write_all(b"d");
            results.paths.insert(shown);
            results.bytes_freed += if meta.nlink() <= 1 { meta.len() } else { 0 };
            return Ok(());
        }
        log(&StoreMessage::Deleting {
            path: shown.clone(),
        });
        // Already gone (an invalid path named to `--delete`, or a collector racing
        // this one): deleted all the same, as for Nix's `deletePath`.
        results.bytes_freed += match delete_counting(&real) {
            Ok(freed) => freed,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(e)),
        };
        results.paths.insert(shown);
        Ok(())
    }

    /// Unlink the files of `.links` that nothing else links to any more (a store that
    /// Nix optimised), saying how much hard linking saves, as Nix does.
    fn delete_unused_links(
        &self,
        results: &mut GcResults,
        log: &mut dyn FnMut(&StoreMessage),
    ) -> Result<(), StoreError> {
        let links = self.real_store_dir().join(".links");
        let Ok(entries) = fs::read_dir(&links) else {
            return Ok(());
        };
        log(&StoreMessage::DeletingUnusedLinks);
        let (mut actual, mut unshared) = (0i64, 0i64);
        for e in entries.flatten() {
            let p = e.path();
            let io_err = |source| StoreError::Io {
                path: p.clone(),
                source,
            };
            let meta = fs::symlink_metadata(&p).map_err(io_err)?;
            let size = meta.len() as i64;
            if meta.nlink() != 1 {
                actual += size;
                unshared += (meta.nlink() as i64 - 1) * size;
                continue;
            }
            fs::remove_file(&p).map_err(io_err)?;
            results.bytes_freed += meta.len();
        }
        let overhead = fs::metadata(&links)
            .map(|m| m.blocks() as i64 * 512)
            .unwrap_or(0);
        log(&StoreMessage::HardLinkingSaves {
            bytes: unshared - actual - overhead,
        });
        Ok(())
    }

    /// Collect garbage (`nix-store --gc`), or only find the live or dead paths.
    /// Progress goes to `log` in Nix's words.
    pub fn collect_garbage(
        &mut self,
        opts: &GcOptions,
        log: &mut dyn FnMut(&StoreMessage),
    ) -> Result<GcResults, StoreError> {
        let _gc = self.lock_gc(true)?;
        let deleting = opts.action == GcAction::DeleteDead;
        // Listening before the temporary-roots files are read: a Nix process that finds
        // the lock taken sends its roots here from now on.
        let server = match deleting {
            true => Some(RootsServer::start(
                &self.state_dir(),
                self.store_dir().clone(),
                self.reporter().clone(),
            )?),
            false => None,
        };
        log(&StoreMessage::FindingRoots);
        let roots = self.find_roots_no_temp(true)?;
        let temp = self.find_temp_roots(log)?;
        let temp_hashes: HashSet<String> = temp.keys().map(|p| p.hash_part().to_owned()).collect();
        if let Some(s) = &server {
            s.add_hashes(temp_hashes.iter().map(String::as_str));
        }
        let mut results = GcResults::default();
        if opts.max_freed == 0 {
            // Nix looks at nothing then: `--max-freed 0` deletes (and lists) nothing.
            if opts.action == GcAction::DeleteDead {
                self.delete_unused_links(&mut results, log)?;
            }
            return Ok(results);
        }
        log(if deleting {
            &StoreMessage::DeletingGarbage
        } else {
            &StoreMessage::DeterminingLiveDead
        });
        let valid = self.db().query_all_valid_paths()?;
        let starts: Vec<StorePath> = roots
            .keys()
            .chain(temp.keys())
            .chain(valid.iter().filter(|p| temp_hashes.contains(p.hash_part())))
            .cloned()
            .collect();
        let live = self.gc_closure(starts, opts)?;
        let dead_valid: BTreeSet<StorePath> = valid.difference(&live).cloned().collect();

        // The other entries of the store directory.
        let real_store = self.real_store_dir().to_path_buf();
        let mut names: Vec<String> = fs::read_dir(&real_store)
            .map_err(|source| StoreError::Io {
                path: real_store.clone(),
                source,
            })?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".links")
            .collect();
        names.sort();
        let sd = self.store_dir().clone();
        let mut alive_entries = BTreeSet::new();
        let mut dead_entries: Vec<(String, bool)> = Vec::new();
        for name in names {
            match sd.parse(&format!("{}/{name}", sd.as_str())) {
                Ok(p) if valid.contains(&p) => {}
                Ok(p) if temp_hashes.contains(p.hash_part()) => {
                    alive_entries.insert(p);
                }
                Ok(_) => {
                    if !self.entry_in_use(&name)? {
                        dead_entries.push((name, true));
                    }
                }
                Err(_) => {
                    if !self.junk_in_use(&name, &temp_hashes) {
                        dead_entries.push((name, false));
                    }
                }
            }
        }

        match opts.action {
            GcAction::ReturnLive => {
                results.paths = live
                    .iter()
                    .chain(&alive_entries)
                    .map(|p| sd.display(p))
                    .collect();
                return Ok(results);
            }
            GcAction::ReturnDead => {
                results.paths = dead_valid.iter().map(|p| sd.display(p)).collect();
                results.paths.extend(
                    dead_entries
                        .iter()
                        .filter(|(_, is_path)| *is_path)
                        .map(|(n, _)| format!("{}/{n}", sd.as_str())),
                );
                return Ok(results);
            }
            GcAction::DeleteDead => {}
        }

        let Some(server) = server else {
            return Ok(results);
        };
        let over = |r: &GcResults| r.bytes_freed > opts.max_freed;
        let mut stopped = false;
        // Paths kept alive by roots that arrived over the socket meanwhile.
        let mut late_live: BTreeSet<StorePath> = BTreeSet::new();
        for p in self.referrers_first(&dead_valid)? {
            let new = server.take_new_paths();
            if !new.is_empty() {
                late_live.extend(self.gc_closure(new, opts)?);
            }
            if late_live.contains(&p) {
                continue;
            }
            if !server.claim(p.hash_part()) {
                late_live.extend(self.gc_closure([p.clone()], opts)?);
                continue;
            }
            let done = self.invalidate_and_delete(&p, &mut results, log);
            server.release();
            if !done? {
                late_live.extend(self.gc_closure([p.clone()], opts)?);
                continue;
            }
            if over(&results) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            for (name, is_path) in &dead_entries {
                let hash = entry_hash(name);
                if hash.is_some_and(|h| !server.claim(h)) {
                    continue;
                }
                // Look again: a build may have started since the plan was made.
                let busy = if *is_path {
                    self.entry_in_use(name)
                } else {
                    Ok(self.junk_in_use(name, &temp_hashes))
                };
                let done = match busy {
                    Ok(true) => Ok(()),
                    Ok(false) => self.delete_entry(name, &mut results, log),
                    Err(e) => Err(e),
                };
                if hash.is_some() {
                    server.release();
                }
                done?;
                if over(&results) {
                    stopped = true;
                    break;
                }
            }
        }
        if stopped {
            log(&StoreMessage::MaxFreedReached {
                max_freed: opts.max_freed,
            });
        }
        self.delete_unused_links(&mut results, log)?;
        Ok(results)
    }

    /// `paths` ordered referrers before references (each path's referrers within the
    /// set come before it).
    fn referrers_first(&self, paths: &BTreeSet<StorePath>) -> Result<Vec<StorePath>, StoreError> {
        let mut refs = BTreeMap::new();
        for p in paths {
            refs.insert(p.clone(), self.db().query_references(p)?);
        }
        let graph = PathGraph::from_references(&refs);
        Ok(graph.topo_sorted().into_iter().rev().cloned().collect())
    }

    /// Invalidate one valid path, then delete it from the disk. `false` (and nothing
    /// done) if a valid path refers to it: one registered since the collection looked.
    fn invalidate_and_delete(
        &mut self,
        p: &StorePath,
        results: &mut GcResults,
        log: &mut dyn FnMut(&StoreMessage),
    ) -> Result<bool, StoreError> {
        let shown = self.store_dir().display(p);
        match self.db_mut().invalidate_paths(&BTreeSet::from([p.clone()])) {
            Err(DbError::StillReferenced { .. }) => return Ok(false),
            r => r?,
        }
        log(&StoreMessage::Deleting {
            path: shown.clone(),
        });
        let real = self.real_path(p);
        results.bytes_freed += delete_counting(&real).map_err(|source| StoreError::Io {
            path: real.clone(),
            source,
        })?;
        results.paths.insert(shown);
        Ok(true)
    }

    /// Why `p` cannot be deleted together with `set` (`None`: it can): a root or a
    /// temporary root among the paths that need it, or a path outside `set` that needs
    /// it. "Need" is Nix's: referrers, and with `keep-derivations` a derivation's
    /// valid outputs, with `keep-outputs` an output's derivers.
    fn why_alive(
        &self,
        p: &StorePath,
        set: &BTreeSet<StorePath>,
        roots: &Roots,
        temp: &HashMap<String, BTreeSet<String>>,
        opts: &GcOptions,
    ) -> Result<Option<AliveReason>, StoreError> {
        #[derive(Clone, Copy)]
        enum Edge {
            Referrer,
            Output,
            Deriver,
        }
        let sd = self.store_dir().clone();
        let mut parent: HashMap<StorePath, (StorePath, Edge)> = HashMap::new();
        let mut seen = HashSet::from([p.clone()]);
        let mut queue = VecDeque::from([p.clone()]);
        // `q`, and the path next to `p` on the way to it when that is not `q`.
        let via = |q: &StorePath, parent: &HashMap<StorePath, (StorePath, Edge)>| {
            let mut hop = q.clone();
            while let Some((from, _)) = parent.get(&hop) {
                if from == p {
                    break;
                }
                hop = from.clone();
            }
            Needer {
                path: sd.display(q),
                through: (&hop != q).then(|| sd.display(&hop)),
            }
        };
        while let Some(q) = queue.pop_front() {
            if let Some(link) = roots.get(&q).and_then(|l| l.iter().next()) {
                let link = link.clone();
                return Ok(Some(if &q == p {
                    AliveReason::Root { link }
                } else {
                    AliveReason::NeededByRoot {
                        needer: via(&q, &parent),
                        link,
                    }
                }));
            }
            if let Some(pids) = temp.get(q.hash_part()) {
                let pids: Vec<String> = pids.iter().cloned().collect();
                return Ok(Some(if &q == p {
                    AliveReason::TempRoot { pids }
                } else {
                    AliveReason::NeededByTempRoot {
                        needer: via(&q, &parent),
                        pids,
                    }
                }));
            }
            if &q != p && !set.contains(&q) {
                let Some((from, edge)) = parent.get(&q).cloned() else {
                    continue;
                };
                let shown = sd.display(&q);
                let through = (&from != p).then(|| sd.display(&from));
                return Ok(Some(match edge {
                    Edge::Referrer => AliveReason::Referrer {
                        referrer: shown,
                        through,
                    },
                    Edge::Output => AliveReason::ValidOutput {
                        output: shown,
                        through,
                    },
                    Edge::Deriver => AliveReason::ValidDeriver {
                        deriver: shown,
                        through,
                    },
                }));
            }
            if !self.db().is_valid_path(&q)? {
                continue;
            }
            let mut next: Vec<(StorePath, Edge)> = self
                .db()
                .query_referrers(&q)?
                .into_iter()
                .filter(|r| r != &q)
                .map(|r| (r, Edge::Referrer))
                .collect();
            if opts.keep_derivations && q.is_derivation() {
                for out in self.db().query_derivation_outputs(&q)?.into_values() {
                    if self.derived_by(&out, &q)? {
                        next.push((out, Edge::Output));
                    }
                }
            }
            if opts.keep_outputs {
                for d in self.db().query_valid_derivers(&q)? {
                    next.push((d, Edge::Deriver));
                }
            }
            for (r, edge) in next {
                if seen.insert(r.clone()) {
                    parent.insert(r.clone(), (q.clone(), edge));
                    queue.push_back(r);
                }
            }
        }
        Ok(None)
    }

    /// `nix-store --delete`: delete exactly `paths`, refusing (before deleting anything)
    /// if any is still alive, with the reason. Valid ones go referrers first, each
    /// invalidated then deleted; invalid ones are deleted if present (and counted either
    /// way, as by Nix).
    pub fn delete_specific(
        &mut self,
        paths: &BTreeSet<StorePath>,
        opts: &GcOptions,
        log: &mut dyn FnMut(&StoreMessage),
    ) -> Result<GcResults, StoreError> {
        let _gc = self.lock_gc(true)?;
        let server = RootsServer::start(
            &self.state_dir(),
            self.store_dir().clone(),
            self.reporter().clone(),
        )?;
        // (Nix says "finding garbage collector roots..." here; firn says it once none
        // of `paths` is found alive, so that a refusal is one line and a delete's
        // output is Nix's.)
        let roots = self.find_roots_no_temp(false)?;
        let mut temp: HashMap<String, BTreeSet<String>> = HashMap::new();
        let found = self.find_temp_roots(log)?;
        server.add_hashes(found.keys().map(StorePath::hash_part));
        for (p, pids) in found {
            temp.entry(p.hash_part().to_owned())
                .or_default()
                .extend(pids);
        }
        let sd = self.store_dir().clone();
        // An invalid path is garbage whether or not something is there: Nix deletes
        // what there is, and counts it, even when nothing is.
        let mut valid = BTreeSet::new();
        for p in paths {
            if self.db().is_valid_path(p)? {
                valid.insert(p.clone());
            }
        }
        for p in paths {
            if let Some(reason) = self.why_alive(p, paths, &roots, &temp, opts)? {
                return Err(StoreError::StillAlive {
                    path: sd.display(p),
                    reason,
                });
            }
        }
        log(&StoreMessage::FindingRoots);
        let mut results = GcResults::default();
        let order = self.referrers_first(&valid)?;
        let invalid = paths.difference(&valid).cloned();
        for p in order.into_iter().chain(invalid) {
            if !server.claim(p.hash_part()) {
                return Err(StoreError::StillAlive {
                    path: sd.display(&p),
                    reason: AliveReason::RootedMeanwhile {
                        deleted: results.paths.len(),
                    },
                });
            }
            let done = if valid.contains(&p) {
                self.invalidate_and_delete(&p, &mut results, log)
            } else {
                self.delete_entry(p.base_name(), &mut results, log)
                    .map(|()| true)
            };
            server.release();
            if !done? {
                return Err(StoreError::StillAlive {
                    path: sd.display(&p),
                    reason: AliveReason::ReferencedMeanwhile {
                        deleted: results.paths.len(),
                    },
                });
            }
        }
        // As after a collection (Nix's `gcDeleteSpecific` ends the same way).
        self.delete_unused_links(&mut results, log)?;
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_in_text_as_nixs_regex_finds_them() {
        let mut found = Vec::new();
        let env = b"PATH=/nix/store/abc-foo-1.0/bin:/nix/store/Xno\0A=/nix/store/\0B=x/nix/store/9z+=?._-y\xff";
        store_paths_in(env, "/nix/store", &mut found);
        assert_eq!(found, ["/nix/store/abc-foo-1.0", "/nix/store/9z+=?._-y"]);
    }

    #[test]
    fn entries_are_named_after_their_hash_part() {
        let h = "0123456789abcdfghijklmnpqrsvwxyz";
        assert_eq!(entry_hash(&format!("{h}-x.drv.chroot")), Some(h));
        assert_eq!(entry_hash(&format!(".{h}-x.tmp-12")), Some(h));
        assert_eq!(entry_hash(&format!("{h}x")), None);
        assert_eq!(entry_hash("junk"), None);
        assert_eq!(entry_hash(".links"), None);
    }

    #[test]
    fn runtime_targets_name_the_store_object() {
        assert_eq!(
            runtime_target("/nix/store", "/nix/store/abc-x/bin/sh").as_deref(),
            Some("/nix/store/abc-x")
        );
        assert_eq!(runtime_target("/nix/store", "/nix/storex/abc"), None);
        assert_eq!(runtime_target("/nix/store", "/usr/bin/sh"), None);
    }
}

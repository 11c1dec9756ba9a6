//! A store opened on a [`StoreLayout`] (Nix's chroot store under `--store ROOT`, or the
//! directories `NIX_STORE_DIR`, `NIX_STATE_DIR`, `NIX_LOG_DIR` name):
//!
//! ```text
//! REAL/                  the store objects (REAL is ROOT/nix/store or the store dir; 1775)
//! STATE/db/db.sqlite     schema 10; STATE/db/schema holds "10"
//! STATE/db/big-lock      held shared while the store is open (as Nix does)
//! STATE/{gcroots,temproots,profiles}/
//! LOG/drvs/
//! ```
//!
//! Adding content follows one order so that a path is valid only once it is complete:
//! compute the path, lock it, write the content under a temporary name, canonicalise,
//! rename into place, register in one transaction, unlock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use firn_derivation::{
    name_from_drv_base_name, parse_derivation, Derivation, FileIngestionMethod, FixedOutputHash,
    Hash, HashAlgo, InputDrvHash, ModuloCache, ModuloError, StoreDir, StorePath,
};
use nix::fcntl::{Flock, FlockArg};

use crate::canonical::{canonicalise_restored, delete_path, RestoredMetadata};
use crate::db::{Database, Registration, ValidPathInfo, SCHEMA_VERSION};
use crate::layout::StoreLayout;
use crate::lock::PathLocks;
use crate::message::{Reporter, StoreMessage};
use crate::nar::{self, NarError};
use crate::temproots::{self, GcLock, TempRootsHandle};

use crate::error::io_err;
pub use crate::error::StoreError;
pub use crate::layout::absolute;

/// Content-address assertion strings as Nix writes them in the `ca` column.
pub fn text_ca(hash: &Hash) -> String {
    format!("text:sha256:{}", hash.to_nixbase32())
}

pub fn fixed_ca(fixed: &FixedOutputHash) -> String {
    format!(
        "fixed:{}{}:{}",
        fixed.method.prefix(),
        fixed.hash.algo(),
        fixed.hash.to_nixbase32()
    )
}

/// Make `path` and its missing parents as Nix's `createDirs` does: the error names the
/// first directory that could not be made, or the first thing on the way that is not a
/// directory.
pub fn create_dirs(path: &Path) -> Result<(), StoreError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(StoreError::NotADirectory {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent)?;
    }
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(source) => Err(StoreError::CreateDir {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The state directories Nix's `LocalStore` makes for the users (`profiles/per-user`,
/// `gcroots/per-user`, mode 0755) and, as its `createUser`, this user's own in each
/// (mode 0755, owned by the user and its group), where `nix-env` and `nix-build` put the
/// user's profiles and roots. A user without a name (no passwd entry, no `$USER`) gets
/// none (Nix refuses to open the store then).
fn create_user_dirs(layout: &StoreLayout) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::getgid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .filter(|n| !n.is_empty() && !n.contains('/'));
    for base in [layout.profiles_dir(), layout.gcroots_dir()] {
        let per_user = base.join("per-user");
        let mut dirs = vec![(per_user.clone(), false)];
        if let Some(name) = &name {
            dirs.push((per_user.join(name), true));
        }
        for (dir, own) in dirs {
            create_dirs(&dir)?;
            let meta = fs::metadata(&dir).map_err(io_err(&dir))?;
            if meta.mode() & 0o7777 != 0o755 {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                    .map_err(io_err(&dir))?;
            }
            if own && (meta.uid() != uid.as_raw() || meta.gid() != gid.as_raw()) {
                match nix::unistd::chown(&dir, Some(uid), Some(gid)) {
                    // A user namespace that does not map the group: left as it is.
                    Err(nix::errno::Errno::EINVAL) => {}
                    r => r.map_err(|e| io_err(&dir)(e.into()))?,
                }
            }
        }
    }
    Ok(())
}

/// `e`, or [`StoreError::NotOwner`] when `e` is a permission denied by a store (whose
/// state is in `state_dir`) that belongs to someone else than this non-root user.
fn foreign_store(layout: &StoreLayout, e: StoreError) -> StoreError {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::Uid::effective();
    if me.is_root() || !e.is_permission_denied() {
        return e;
    }
    let owner = [
        layout.db_dir(),
        layout.state_dir.clone(),
        layout.real_store_dir.clone(),
    ]
    .iter()
    .find_map(|p| fs::metadata(p).ok())
    .map(|m| m.uid());
    // The root of a chroot store, to name it: the directory holding `nix/`.
    let root = layout
        .real_store_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(&layout.real_store_dir)
        .to_path_buf();
    match owner {
        Some(owner) if owner != me.as_raw() => StoreError::NotOwner {
            root: absolute(&root),
            owner: crate::error::Account::from_uid(owner),
            user: crate::error::Account::from_uid(me.as_raw()),
            source: Box::new(e),
        },
        _ => e,
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    layout: StoreLayout,
    db: Database,
    /// This process's temporary-roots file, opened on the first root added.
    temp_roots: std::sync::Mutex<Option<TempRootsHandle>>,
    /// Where messages go that are not the progress of one call (lock waits, …).
    reporter: Reporter,
    auto_optimise: bool,
    own_temp_roots: bool,
    /// `ca-derivations` is enabled: the realisation tables are there and asked.
    ca_derivations: bool,
    _big_lock: Flock<File>,
}

/// How a store is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// `build-users-group`: as root, the store directory is handed to this group (1775),
    /// so that its members can create their outputs; empty: left alone.
    pub build_users_group: String,
    /// `auto-optimise-store`: every path added or built is optimised (`optimise.rs`).
    pub auto_optimise: bool,
    /// Temporary roots in a file of this store's own (`temproots/<pid>-<n>`, removed
    /// when the store is dropped) rather than the process's shared one: for a daemon,
    /// whose connections each open a store and end before the process.
    pub own_temp_roots: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            build_users_group: "nixbld".to_owned(),
            auto_optimise: false,
            own_temp_roots: false,
        }
    }
}

impl Store {
    /// Open the store `layout` describes, creating its directories and database if
    /// needed.
    pub fn open(layout: &StoreLayout) -> Result<Self, StoreError> {
        Self::open_with(layout, &StoreOptions::default())
    }

    /// [`Store::open`] with `options`.
    /// A store that this (non-root) user may not write because another user owns it is
    /// [`StoreError::NotOwner`], naming both.
    pub fn open_with(layout: &StoreLayout, options: &StoreOptions) -> Result<Self, StoreError> {
        Self::open_inner(layout, options).map_err(|e| foreign_store(layout, e))
    }

    fn open_inner(layout: &StoreLayout, options: &StoreOptions) -> Result<Self, StoreError> {
        // Absolute, so that roots and messages name the same files from anywhere.
        let layout = StoreLayout {
            store_dir: layout.store_dir.clone(),
            real_store_dir: absolute(&layout.real_store_dir),
            state_dir: absolute(&layout.state_dir),
            log_dir: absolute(&layout.log_dir),
        };
        let store_dir = layout.store_dir.clone();
        let real_store = layout.real_store_dir.clone();
        // The store directory first, as Nix does (so the same directory is named when
        // the root cannot be made).
        if !real_store.is_dir() {
            create_dirs(&real_store)?;
            fs::set_permissions(&real_store, fs::Permissions::from_mode(0o1775))
                .map_err(io_err(&real_store))?;
        }
        // Nix links `gcroots/profiles` to the profiles only when it makes `gcroots`: a
        // store keeps what its owner made of it since.
        let new_gcroots = fs::symlink_metadata(layout.gcroots_dir()).is_err();
        for d in [
            real_store.join(".links"),
            layout.db_dir(),
            layout.gcroots_dir(),
            layout.temproots_dir(),
            layout.profiles_dir(),
            layout.drv_log_dir(),
        ] {
            create_dirs(&d)?;
        }
        if new_gcroots {
            let link = layout.gcroots_dir().join("profiles");
            match std::os::unix::fs::symlink(layout.profiles_dir(), &link) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(io_err(&link)(e));
                }
                _ => {}
            }
        }
        create_user_dirs(&layout)?;
        // As Nix does with `build-users-group`, on every open (so that a process killed
        // between the mkdir and the chown leaves nothing wrong): the build users may
        // create their outputs in the store (1775: only their own entries are theirs to
        // delete). A store owned by someone else (a user's own store) is left alone.
        let group = options.build_users_group.as_str();
        if nix::unistd::Uid::effective().is_root() && !group.is_empty() {
            // A group that does not exist is the build's error to report.
            if let Ok(Some(group)) = nix::unistd::Group::from_name(group) {
                use std::os::unix::fs::MetadataExt;
                let meta = fs::metadata(&real_store).map_err(io_err(&real_store))?;
                let wrong = meta.gid() != group.gid.as_raw() || meta.mode() & 0o7777 != 0o1775;
                if meta.uid() == 0 && wrong {
                    match nix::unistd::chown(&real_store, None, Some(group.gid)) {
                        // In a user namespace that does not map the group there is no
                        // way to hand it the store (nor a build user to use it).
                        Err(nix::errno::Errno::EINVAL) => {}
                        r => r.map_err(|e| io_err(&real_store)(e.into()))?,
                    }
                    fs::set_permissions(&real_store, fs::Permissions::from_mode(0o1775))
                        .map_err(io_err(&real_store))?;
                }
            }
        }
        let db_dir = layout.db_dir();
        let big = db_dir.join("big-lock");
        let big_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&big)
            .map_err(io_err(&big))?;
        let big_lock =
            Flock::lock(big_file, FlockArg::LockShared).map_err(|(_, e)| StoreError::Io {
                path: big.clone(),
                source: e.into(),
            })?;
        let schema = db_dir.join("schema");
        match fs::read_to_string(&schema) {
            Ok(v) if v.trim() == SCHEMA_VERSION.to_string() => {}
            Ok(v) => {
                return Err(StoreError::Schema {
                    path: schema,
                    found: v.trim().to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Database first, then the schema file, as Nix does.
                Database::open(&db_dir.join("db.sqlite"), store_dir.clone())?;
                write_atomically(&schema, SCHEMA_VERSION.to_string().as_bytes())?;
            }
            Err(e) => return Err(io_err(&schema)(e)),
        }
        let db = Database::open(&db_dir.join("db.sqlite"), store_dir.clone())?;
        Ok(Self {
            layout,
            db,
            temp_roots: std::sync::Mutex::new(None),
            reporter: Reporter::discard(),
            auto_optimise: options.auto_optimise,
            own_temp_roots: options.own_temp_roots,
            ca_derivations: false,
            _big_lock: big_lock,
        })
    }

    /// Turn `auto-optimise-store` on or off for what this store adds from now on.
    pub fn set_auto_optimise(&mut self, on: bool) {
        self.auto_optimise = on;
    }

    /// Whether `auto-optimise-store` is on.
    pub fn auto_optimise(&self) -> bool {
        self.auto_optimise
    }

    /// Make the tables of content-addressed derivations (`ca-derivations`) if they are
    /// not there, as Nix does when it opens a store with the feature enabled.
    pub fn enable_ca_derivations(&mut self) -> Result<(), StoreError> {
        let file = self.layout.db_dir().join("ca-schema");
        self.db.init_ca_schema(&file)?;
        self.ca_derivations = true;
        Ok(())
    }

    /// Whether [`Store::enable_ca_derivations`] was called: realisations are known.
    pub fn ca_derivations(&self) -> bool {
        self.ca_derivations
    }

    /// Send the store's messages (waiting for a lock, a stale root removed, …) to
    /// `reporter` from now on; by default they are dropped. The progress of a
    /// collection or a verification goes to the callback given to that call instead.
    pub fn set_reporter(&mut self, reporter: Reporter) {
        self.reporter = reporter;
    }

    /// The store's reporter (to hand the same one to a component of one's own).
    pub fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    /// Tell the store's reporter.
    pub(crate) fn report(&self, m: &StoreMessage) {
        self.reporter.report(m)
    }

    /// The state directory (`ROOT/nix/var/nix`, `NIX_STATE_DIR`).
    pub fn state_dir(&self) -> PathBuf {
        self.layout.state_dir.clone()
    }

    /// Protect `path` from the garbage collector for as long as this process keeps a
    /// [`Store`] on this root open (Nix's `addTempRoot`): the path is appended to
    /// `temproots/<pid>` while `gc.lock` is held shared, so if a collection is running
    /// this waits until it is done, and any later collection sees the root. Call it
    /// *before* checking that a path is valid or creating it; then a concurrent
    /// `firn gc` (or Nix's) either finished before (the path is gone or was never
    /// there, and the check says so) or keeps it. The path need not be valid. Cheap
    /// when repeated: one file per process and root, one `write` per new path, nothing
    /// for a path already added.
    pub fn add_temp_root(&self, path: &StorePath) -> Result<(), StoreError> {
        let handle = {
            let mut slot = self.temp_roots.lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some(h) => h.clone(),
                None => {
                    let h = match self.own_temp_roots {
                        true => temproots::own_temp_roots_handle(&self.state_dir())?,
                        false => temproots::temp_roots_handle(&self.state_dir())?,
                    };
                    *slot = Some(h.clone());
                    h
                }
            }
        };
        let mut file = handle.lock().unwrap_or_else(|p| p.into_inner());
        file.add(path, &self.layout.store_dir.display(path), &self.reporter)
    }

    /// Take the global GC lock: exclusive for a collection (no temporary root can be
    /// added meanwhile), shared to keep collections out (as `verify` does).
    pub fn lock_gc(&self, exclusive: bool) -> Result<GcLock, StoreError> {
        temproots::lock_gc(&self.state_dir(), exclusive, &self.reporter)
    }

    /// Where the store is (all its directories absolute).
    pub fn layout(&self) -> &StoreLayout {
        &self.layout
    }

    /// The logical store directory, which store paths name.
    pub fn store_dir(&self) -> &StoreDir {
        &self.layout.store_dir
    }

    /// The store objects' real directory (`ROOT/nix/store`, or the store dir itself).
    pub fn real_store_dir(&self) -> &Path {
        &self.layout.real_store_dir
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn db_mut(&mut self) -> &mut Database {
        &mut self.db
    }

    /// Where the store object `p` lives on disk.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        self.layout.real_path(p)
    }

    /// Make room to write the invalid path `path` (its lock held): leftovers of an
    /// interrupted write are not valid, so the path and this process's temporary copy
    /// are removed. Returns both locations.
    fn clear_for_write(&self, path: &StorePath) -> Result<(PathBuf, PathBuf), StoreError> {
        let real = self.real_path(path);
        delete_path(&real).map_err(io_err(&real))?;
        let tmp = self.layout.real_store_dir.join(format!(
            ".{}.tmp-{}",
            path.base_name(),
            std::process::id()
        ));
        delete_path(&tmp).map_err(io_err(&tmp))?;
        Ok((real, tmp))
    }

    /// Parse a path given on the command line: a logical store path, a physical path
    /// below the real store dir, anything inside a store object (the object is meant), or
    /// a symlink outside the store that leads into it, such as `./result`
    /// (`followLinksToStorePath`).
    pub fn parse_path_arg(&self, arg: &str) -> Result<StorePath, StoreError> {
        let mut path = absolute(Path::new(arg));
        // Follow symlinks (at most 40, like the kernel) until the path is in the store.
        for _ in 0..40 {
            if let Some(p) = self.store_path_in(&path)? {
                return Ok(p);
            }
            match fs::read_link(&path) {
                Ok(target) => {
                    let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
                    path = absolute(&parent.join(target));
                }
                Err(_) => break,
            }
        }
        Err(StoreError::NotInStore(path.display().to_string()))
    }

    /// The store object `path` (logical or physical) is in, if any.
    fn store_path_in(&self, path: &Path) -> Result<Option<StorePath>, StoreError> {
        let real_store = &self.layout.real_store_dir;
        let logical = if let Ok(rest) = path.strip_prefix(real_store) {
            rest
        } else if let Ok(rest) = path.strip_prefix(self.layout.store_dir.as_str()) {
            rest
        } else {
            return Ok(None);
        };
        let Some(first) = logical.components().next() else {
            return Ok(None);
        };
        let full = format!(
            "{}/{}",
            self.layout.store_dir.as_str(),
            first.as_os_str().to_string_lossy()
        );
        Ok(Some(self.layout.store_dir.parse(&full)?))
    }

    /// Like [`Self::parse_path_arg`] but the path must be valid.
    pub fn valid_path_arg(&self, arg: &str) -> Result<StorePath, StoreError> {
        let p = self.parse_path_arg(arg)?;
        if !self.db.is_valid_path(&p)? {
            return Err(StoreError::NotValid(self.layout.store_dir.display(&p)));
        }
        Ok(p)
    }

    fn lock(&self, p: &StorePath) -> Result<PathLocks, StoreError> {
        let locks = PathLocks::lock([self.real_path(p)], true, |_| {
            self.report(&StoreMessage::WaitingForLock {
                path: self.layout.store_dir.display(p),
            });
        })?;
        Ok(locks.unwrap_or_default())
    }

    /// Rename the complete, canonical object at `tmp` to `real` (its lock held, the
    /// path not valid) and wait until it is on disk there (`durable.rs`: one `syncfs`
    /// of the store's file system), so that it can be registered.
    pub(crate) fn place_durably(&self, tmp: &Path, real: &Path) -> Result<(), StoreError> {
        fs::rename(tmp, real).map_err(io_err(real))?;
        crate::durable::make_durable(real, &self.layout.real_store_dir).map_err(io_err(real))
    }

    /// Put the content produced by `write(tmp)` at `path` and register it, unless the
    /// path is valid already. `write` creates `tmp` (which does not exist).
    fn add_content(
        &mut self,
        path: StorePath,
        references: BTreeSet<StorePath>,
        ca: Option<String>,
        drv_outputs: BTreeMap<String, StorePath>,
        known_nar: Option<(Hash, u64)>,
        write: impl FnOnce(&Path) -> Result<RestoredMetadata, StoreError>,
    ) -> Result<ValidPathInfo, StoreError> {
        // Before the validity check: from here on no collector deletes the path, so
        // "valid" stays true, and a path we create is never collected half-made.
        self.add_temp_root(&path)?;
        for r in &references {
            self.add_temp_root(r)?;
        }
        if let Some(info) = self.db.query_path_info(&path)? {
            return Ok(info);
        }
        let mut locks = self.lock(&path)?;
        // Someone may have added it while we waited.
        if let Some(info) = self.db.query_path_info(&path)? {
            return Ok(info);
        }
        let (real, tmp) = self.clear_for_write(&path)?;
        let mut drv_outputs = drv_outputs;
        let result = (|| {
            let metadata = write(&tmp)?;
            // Like Nix, a `.drv` is checked and its outputs recorded however it arrives.
            if path.is_derivation() && drv_outputs.is_empty() {
                drv_outputs = self.checked_drv_outputs(&path, &tmp)?;
            }
            canonicalise_restored(&tmp, metadata).map_err(io_err(&tmp))?;
            // A tree restored from a NAR whose hash was taken on the way is that NAR
            // (canonicalisation keeps the execute bits): no second read.
            let (nar_hash, nar_size) = match known_nar {
                Some(known) => known,
                None => nar::hash_path(&tmp)?,
            };
            self.auto_optimise_path(&tmp)?;
            self.place_durably(&tmp, &real)?;
            Ok((nar_hash, nar_size))
        })();
        let (nar_hash, nar_size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = delete_path(&tmp);
                let _ = delete_path(&real);
                return Err(e);
            }
        };
        let info = ValidPathInfo {
            path,
            nar_hash,
            nar_size,
            references,
            deriver: None,
            registration_time: now(),
            ultimate: false,
            sigs: Vec::new(),
            ca,
        };
        if let Err(e) = self.db.register_valid_paths(&[Registration {
            info: info.clone(),
            drv_outputs,
        }]) {
            let _ = delete_path(&real);
            return Err(e.into());
        }
        // Valid now: the lock file has done its job (Nix's `setDeletion(true)`).
        locks.set_deletion(true);
        Ok(info)
    }

    /// Add the file or tree at `src` content-addressed, named after its last component.
    pub fn add_to_store(
        &mut self,
        src: &Path,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> Result<ValidPathInfo, StoreError> {
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.add_to_store_named(&name, src, method, algo)
    }

    /// `nix-store --add` / `--add-fixed` (`Store::addToStore`): add the file or tree at
    /// `src` content-addressed as `name`. `--add` is recursive sha256.
    pub fn add_to_store_named(
        &mut self,
        name: &str,
        src: &Path,
        method: FileIngestionMethod,
        algo: HashAlgo,
    ) -> Result<ValidPathInfo, StoreError> {
        if method == FileIngestionMethod::Recursive {
            return self.add_recursive(src, name, algo);
        }
        let meta = fs::symlink_metadata(src).map_err(|source| NarError::Stat {
            path: src.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(StoreError::NotRegularFile {
                path: src.to_path_buf(),
            });
        }
        let mut h = nar::HashSink::with_algo(algo);
        let mut f = File::open(src).map_err(io_err(src))?;
        io::copy(&mut f, &mut h).map_err(io_err(src))?;
        let fixed = FixedOutputHash {
            method,
            hash: h.finish().0,
        };
        let path = self.layout.store_dir.make_fixed_output_path(&fixed, name)?;
        let src = src.to_path_buf();
        self.add_content(
            path,
            BTreeSet::new(),
            Some(fixed_ca(&fixed)),
            BTreeMap::new(),
            None,
            |tmp| copy_via_nar(&src, tmp),
        )
    }

    /// `--add` (recursive): one read of `src`. Its NAR is restored into a staging entry
    /// of the store directory while hashed (sha256 for the NAR hash, `algo` for the
    /// path); the path follows from the hash, and the staging tree is renamed to it
    /// (or dropped, if the path is valid already). The staging name
    /// (`.add-N.tmp-PID`) is one the collector leaves alone while this process lives.
    fn add_recursive(
        &mut self,
        src: &Path,
        name: &str,
        algo: HashAlgo,
    ) -> Result<ValidPathInfo, StoreError> {
        let staging = self.new_staging()?;
        let copied = copy_via_nar_hashing(src, &staging, algo);
        self.add_staged_recursive(&staging, name, copied)
    }

    /// A fresh staging entry of the store directory for a recursive add
    /// (`.add-N.tmp-PID`, which the collector leaves alone while this process lives);
    /// whatever a dead process left under that name is removed first.
    fn new_staging(&self) -> Result<PathBuf, StoreError> {
        let n = ADD_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging = self
            .layout
            .real_store_dir
            .join(format!(".add-{n}.tmp-{}", std::process::id()));
        delete_path(&staging).map_err(io_err(&staging))?;
        Ok(staging)
    }

    /// `addToStoreFromDump` with recursive ingestion (the daemon's AddToStore of a
    /// tree): the NAR read from `nar` is restored into a staging entry of the store
    /// directory while it is hashed, then becomes the path its hash gives, as with
    /// [`Store::add_to_store`] of the tree the NAR holds (same path, same row) but
    /// without a copy of it outside the store first. The NAR is validated as
    /// [`nar::restore_path`] does.
    pub fn add_nar_recursive(
        &mut self,
        name: &str,
        algo: HashAlgo,
        nar: &mut dyn Read,
    ) -> Result<ValidPathInfo, StoreError> {
        let staging = self.new_staging()?;
        let mut hashes = TwoHashes {
            sha256: nar::HashSink::new(),
            other: (algo != HashAlgo::Sha256).then(|| nar::HashSink::with_algo(algo)),
        };
        let mut reader = TeeReader {
            inner: nar,
            sink: &mut hashes,
        };
        let restored = nar::restore_path_for_store(&mut reader, &staging);
        let copied = restored.map_err(StoreError::from).map(|metadata| {
            let (nar_hash, nar_size) = hashes.sha256.finish();
            let hash = hashes.other.map_or(nar_hash, |o| o.finish().0);
            (nar_hash, nar_size, hash, metadata)
        });
        self.add_staged_recursive(&staging, name, copied)
    }

    /// The end of a recursive add: the tree at `staging`, whose NAR `copied` hashed,
    /// becomes its path (or is dropped if that is valid already, or on error).
    fn add_staged_recursive(
        &mut self,
        staging: &Path,
        name: &str,
        copied: Result<(Hash, u64, Hash, RestoredMetadata), StoreError>,
    ) -> Result<ValidPathInfo, StoreError> {
        let result = copied.and_then(|(nar_hash, nar_size, hash, metadata)| {
            let fixed = FixedOutputHash {
                method: FileIngestionMethod::Recursive,
                hash,
            };
            let path = self.layout.store_dir.make_fixed_output_path(&fixed, name)?;
            let staged = staging.to_path_buf();
            self.add_content(
                path,
                BTreeSet::new(),
                Some(fixed_ca(&fixed)),
                BTreeMap::new(),
                Some((nar_hash, nar_size)),
                move |tmp| {
                    // Within the store directory: modes and times stay as they are.
                    fs::rename(&staged, tmp).map_err(io_err(tmp))?;
                    Ok(metadata)
                },
            )
        });
        // Renamed into place, or not needed (valid already, or failed).
        let _ = delete_path(staging);
        result
    }

    /// `addTextToStore`: a text file with references (a `.drv`, `builtins.toFile`).
    pub fn add_text(
        &mut self,
        name: &str,
        contents: &[u8],
        references: BTreeSet<StorePath>,
        drv_outputs: BTreeMap<String, StorePath>,
    ) -> Result<ValidPathInfo, StoreError> {
        let hash = Hash::sha256(contents);
        let path = self
            .layout
            .store_dir
            .make_text_path(name, &hash, &references)?;
        self.add_content(
            path,
            references,
            Some(text_ca(&hash)),
            drv_outputs,
            None,
            |tmp| {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o444)
                    .open(tmp)
                    .map_err(io_err(tmp))?;
                f.write_all(contents).map_err(io_err(tmp))?;
                Ok(RestoredMetadata::NeedsCanonicalising)
            },
        )
    }

    /// Add a path that arrives as a NAR with its metadata (Nix's `addToStore(info,
    /// source)`, behind the daemon's AddToStoreNar and AddMultipleToStore): the NAR is
    /// restored under a temporary name while it is hashed, must have the hash and size
    /// `info` gives ([`StoreError::NarMismatch`] otherwise), and is registered with
    /// `info`'s references, deriver, signatures and content address (`ultimate` false),
    /// following the order of [`Store::add_text`]. If the path is valid already,
    /// nothing is read from `nar` (the caller skips it) and `Ok(None)` is returned.
    pub fn add_nar(
        &mut self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
    ) -> Result<Option<ValidPathInfo>, StoreError> {
        self.add_nar_with(info, nar, true)
    }

    /// [`Store::add_nar`] for a caller that holds the path's lock already: a build
    /// whose outputs come from a remote machine (Nix's `locksHeld`). Taking the lock
    /// again would wait for ourselves (a lock file's `flock` is per open file).
    pub fn add_nar_locked(
        &mut self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
    ) -> Result<Option<ValidPathInfo>, StoreError> {
        self.add_nar_with(info, nar, false)
    }

    fn add_nar_with(
        &mut self,
        info: &ValidPathInfo,
        nar: &mut dyn Read,
        take_lock: bool,
    ) -> Result<Option<ValidPathInfo>, StoreError> {
        let path = info.path.clone();
        self.add_temp_root(&path)?;
        for r in &info.references {
            self.add_temp_root(r)?;
        }
        if self.db.is_valid_path(&path)? {
            return Ok(None);
        }
        let mut locks = match take_lock {
            true => self.lock(&path)?,
            false => PathLocks::default(),
        };
        if self.db.is_valid_path(&path)? {
            return Ok(None);
        }
        let (real, tmp) = self.clear_for_write(&path)?;
        let shown = self.layout.store_dir.display(&path);
        let result = (|| {
            let mut hashing = HashingReader {
                inner: nar,
                sink: nar::HashSink::new(),
            };
            let metadata = nar::restore_path_for_store(&mut hashing, &tmp)?;
            let (got, size) = hashing.sink.finish();
            if got != info.nar_hash || size != info.nar_size {
                return Err(StoreError::NarMismatch {
                    path: shown.clone(),
                    expected: format!("{} ({} bytes)", info.nar_hash, info.nar_size),
                    got: format!("{got} ({size} bytes)"),
                });
            }
            if let Some(ca) = &info.ca {
                crate::content_address::check_content_address(&shown, path.hash_part(), ca, &tmp)?;
            }
            let drv_outputs = match path.is_derivation() {
                true => self.checked_drv_outputs(&path, &tmp)?,
                false => BTreeMap::new(),
            };
            canonicalise_restored(&tmp, metadata).map_err(io_err(&tmp))?;
            self.auto_optimise_path(&tmp)?;
            self.place_durably(&tmp, &real)?;
            Ok(drv_outputs)
        })();
        let drv_outputs = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = delete_path(&tmp);
                let _ = delete_path(&real);
                return Err(e);
            }
        };
        let mut info = info.clone();
        info.ultimate = false;
        if info.registration_time == 0 {
            info.registration_time = now();
        }
        if let Err(e) = self.db.register_valid_paths(&[Registration {
            info: info.clone(),
            drv_outputs,
        }]) {
            let _ = delete_path(&real);
            return Err(e.into());
        }
        locks.set_deletion(true);
        Ok(Some(info))
    }

    /// Parse the `.drv` at `file` (to become `path`), check its output paths as Nix's
    /// `checkDerivationOutputs` does and return them by output name.
    fn checked_drv_outputs(
        &self,
        path: &StorePath,
        file: &Path,
    ) -> Result<BTreeMap<String, StorePath>, StoreError> {
        let sd = &self.layout.store_dir;
        let shown = sd.display(path);
        let text = fs::read(file).map_err(io_err(file))?;
        let name = name_from_drv_base_name(path.base_name());
        let drv =
            parse_derivation(sd, &text, name).map_err(|source| StoreError::DerivationParse {
                path: shown.clone(),
                source,
            })?;
        let mut cache = ModuloCache::new();
        let mut load = |p: &StorePath| self.read_derivation(p);
        let mut lookup = |p: &StorePath| cache.get(sd, p, &mut load);
        drv.check_output_paths(sd, path, &mut lookup).map_err(|e| {
            StoreError::DerivationOutputCheck {
                path: shown.clone(),
                source: Box::new(e),
            }
        })?;
        let outputs = drv
            .output_paths(sd)
            .map_err(|source| StoreError::DerivationInvalid {
                path: shown.clone(),
                source,
            })?;
        Ok(outputs
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    /// Read and parse a `.drv` from the store.
    pub fn read_derivation(&self, drv: &StorePath) -> Result<Derivation<'static>, StoreError> {
        let real = self.real_path(drv);
        let text = fs::read(&real).map_err(io_err(&real))?;
        let name = name_from_drv_base_name(drv.base_name());
        let parsed = parse_derivation(&self.layout.store_dir, &text, name).map_err(|source| {
            StoreError::DerivationParse {
                path: self.layout.store_dir.display(drv),
                source,
            }
        })?;
        Ok(parsed.into_owned())
    }

    /// `firn derivation add`: compute the output paths left empty (input derivations
    /// must be valid), refuse paths given wrong (`DerivationOutputCheck`, before
    /// anything is written), write the `.drv` and register it with its references and
    /// `DerivationOutputs` rows. With `dry_run`, only compute the path.
    pub fn add_derivation(
        &mut self,
        mut drv: Derivation<'static>,
        dry_run: bool,
    ) -> Result<StorePath, StoreError> {
        let sd = self.layout.store_dir.clone();
        for p in drv.references() {
            // Keep the inputs from being collected between this check and the
            // registration that refers to them.
            self.add_temp_root(p)?;
            if !self.db.is_valid_path(p)? {
                return Err(StoreError::NotValid(sd.display(p)));
            }
        }
        let drv_name = drv.name.clone();
        let mut cache = ModuloCache::new();
        let this: &Store = self;
        let mut load = |p: &StorePath| this.read_derivation(p);
        let mut lookup = |p: &StorePath| -> Result<InputDrvHash, ModuloError<StoreError>> {
            cache.get(&sd, p, &mut load)
        };
        // Paths given must be right (Nix refuses such a `.drv` when it is registered);
        // nothing is written before this check.
        drv.fill_output_paths(&sd, &mut lookup)
            .map_err(|e| match e {
                e @ (ModuloError::IncorrectOutput { .. } | ModuloError::IncorrectEnv { .. }) => {
                    StoreError::DerivationOutputCheck {
                        path: format!("{drv_name}.drv (new)"),
                        source: Box::new(e),
                    }
                }
                e => StoreError::DerivationOutputs {
                    path: format!("{drv_name}.drv (new)"),
                    source: Box::new(e),
                },
            })?;
        let invalid = |source| StoreError::DerivationInvalid {
            path: drv_name.clone(),
            source,
        };
        let text = drv.to_aterm(&sd).map_err(invalid)?;
        let drv_path = drv.drv_path_of_text(&sd, &text).map_err(invalid)?;
        if dry_run {
            return Ok(drv_path);
        }
        let outputs = drv
            .output_paths(&sd)
            .map_err(|source| StoreError::DerivationInvalid {
                path: sd.display(&drv_path),
                source,
            })?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect();
        let refs = drv.references().into_iter().cloned().collect();
        let info = self.add_text(&format!("{}.drv", drv.name), &text, refs, outputs)?;
        Ok(info.path)
    }
}

/// Copy a tree by serialising it as a NAR and restoring that, so exactly what the NAR
/// holds (and nothing else: no special files, no modes beyond the exec bit) lands. The
/// NAR streams through a pipe between two threads, so a tree of any size needs no more
/// memory than the pipe.
fn copy_via_nar(src: &Path, dst: &Path) -> Result<RestoredMetadata, StoreError> {
    let (mut reader, mut writer) = io::pipe().map_err(io_err(src))?;
    std::thread::scope(|scope| {
        let dumper = scope.spawn(move || {
            let r = nar::dump_path(src, &mut writer);
            drop(writer);
            r
        });
        let restored = nar::restore_path_for_store(&mut reader, dst);
        drop(reader);
        let dumped = dumper.join().unwrap_or_else(|_| {
            Err(NarError::Format {
                offset: 0,
                msg: "the NAR writer thread panicked".into(),
            })
        });
        match (dumped, restored) {
            (Ok(()), Ok(metadata)) => Ok(metadata),
            // The reader stopped first: the writer only saw a closed pipe.
            (Err(NarError::Write { .. }) | Ok(()), Err(r)) => Err(r.into()),
            // Reading the source failed: that explains the truncated NAR.
            (Err(d), _) => Err(d.into()),
        }
    })
}

/// [`copy_via_nar`], hashing the NAR on the way: its sha256 and size, and its hash with
/// `algo` (the same as the sha256 when `algo` is sha256). Two threads, each with half
/// the work: one reads `src` and hashes its NAR, the other (this one) restores it; the
/// NAR's buffers go from one to the other without a copy
/// ([`nar::dump_path_through`]).
fn copy_via_nar_hashing(
    src: &Path,
    dst: &Path,
    algo: HashAlgo,
) -> Result<(Hash, u64, Hash, RestoredMetadata), StoreError> {
    let mut hashes = TwoHashes {
        sha256: nar::HashSink::new(),
        other: (algo != HashAlgo::Sha256).then(|| nar::HashSink::with_algo(algo)),
    };
    let (dumped, restored) = nar::dump_path_through(src, &mut hashes, |reader| {
        nar::restore_buffered_for_store(reader, dst)
    });
    match (dumped, restored) {
        (Ok(()), Ok(metadata)) => {
            let (nar_hash, nar_size) = hashes.sha256.finish();
            let hash = hashes.other.map_or(nar_hash, |o| o.finish().0);
            Ok((nar_hash, nar_size, hash, metadata))
        }
        // The restorer stopped first: the dumper only saw it gone.
        (Err(NarError::Write { .. }) | Ok(()), Err(r)) => Err(r.into()),
        // Reading the source failed: that explains the truncated NAR.
        (Err(d), _) => Err(d.into()),
    }
}

/// A sha256 sink and, optionally, another.
struct TwoHashes {
    sha256: nar::HashSink,
    other: Option<nar::HashSink>,
}

impl Write for TwoHashes {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sha256.write_all(buf)?;
        if let Some(o) = &mut self.other {
            o.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes a reader's bytes through a writer (hashes).
struct TeeReader<'a, W: Write> {
    inner: &'a mut dyn Read,
    sink: &'a mut W,
}

impl<W: Write> Read for TeeReader<'_, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

static ADD_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Passes a reader's bytes through a hash sink.
struct HashingReader<'a> {
    inner: &'a mut dyn Read,
    sink: nar::HashSink,
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("firn-store-{name}-{}", std::process::id()));
        let _ = delete_path(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Entries of the store directory other than valid paths' (leftovers).
    fn leftovers(store: &Store) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(store.real_store_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n != ".links")
            .collect();
        v.sort();
        v
    }

    /// The store's adds go through `make_durable` before registering: a tree of many
    /// files costs one syncfs and no fsync, and so does a text file.
    #[test]
    fn adds_are_made_durable_with_few_syncs() {
        use crate::durable::sync_count;
        let dir = tmp("adds");
        let tree = dir.join("tree");
        fs::create_dir(&tree).unwrap();
        for i in 0..40 {
            fs::write(tree.join(format!("f{i}")), vec![i as u8; 3000 * i]).unwrap();
        }
        fs::write(tree.join("big"), vec![7u8; 3 << 20]).unwrap();
        let mut store = Store::open(&StoreLayout::chroot(&dir.join("root"))).unwrap();
        let before = sync_count();
        let info = store
            .add_to_store(&tree, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap();
        assert_eq!(sync_count() - before, 1);
        assert_eq!(
            nar::hash_path(&store.real_path(&info.path)).unwrap(),
            (info.nar_hash, info.nar_size)
        );
        // Valid already: nothing written, nothing synced.
        let before = sync_count();
        store
            .add_to_store(&tree, FileIngestionMethod::Recursive, HashAlgo::Sha256)
            .unwrap();
        assert_eq!(sync_count(), before);
        let before = sync_count();
        store
            .add_text("t", b"text", Default::default(), Default::default())
            .unwrap();
        assert_eq!(sync_count() - before, 1);
        fs::remove_dir_all(&dir).ok();
        let _ = delete_path(&dir);
    }

    #[test]
    fn a_nar_added_recursively_is_the_tree_added() {
        let dir = tmp("nar-add");
        let tree = dir.join("tree");
        fs::create_dir_all(tree.join("sub")).unwrap();
        fs::write(tree.join("a"), b"a\n").unwrap();
        fs::write(tree.join("sub/big"), vec![3u8; 2 << 20]).unwrap();
        std::os::unix::fs::symlink("a", tree.join("link")).unwrap();
        let mut nar_bytes = Vec::new();
        nar::dump_path(&tree, &mut nar_bytes).unwrap();
        for algo in [HashAlgo::Sha256, HashAlgo::Sha1] {
            let mut a = Store::open(&StoreLayout::chroot(&dir.join(format!("a-{algo}")))).unwrap();
            let mut b = Store::open(&StoreLayout::chroot(&dir.join(format!("b-{algo}")))).unwrap();
            let want = a
                .add_to_store(&tree, FileIngestionMethod::Recursive, algo)
                .unwrap();
            let got = b
                .add_nar_recursive("tree", algo, &mut nar_bytes.as_slice())
                .unwrap();
            assert_eq!(
                (&got.path, got.nar_hash, got.nar_size, &got.ca),
                (&want.path, want.nar_hash, want.nar_size, &want.ca)
            );
            assert_eq!(
                nar::hash_path(&b.real_path(&got.path)).unwrap(),
                (want.nar_hash, want.nar_size)
            );
            // Again: valid already, the same row.
            let again = b
                .add_nar_recursive("tree", algo, &mut nar_bytes.as_slice())
                .unwrap();
            assert_eq!(again.path, got.path);
            assert!(leftovers(&b).is_empty(), "{:?}", leftovers(&b));
        }
        // A truncated or corrupt NAR: an error, nothing valid, nothing left behind.
        let mut s = Store::open(&StoreLayout::chroot(&dir.join("bad"))).unwrap();
        for bad in [&nar_bytes[..nar_bytes.len() - 8], &nar_bytes[..100]] {
            assert!(matches!(
                s.add_nar_recursive("tree", HashAlgo::Sha256, &mut &bad[..]),
                Err(StoreError::Nar(_))
            ));
        }
        let mut trailing = nar_bytes.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert!(s
            .add_nar_recursive("tree", HashAlgo::Sha256, &mut trailing.as_slice())
            .is_err());
        assert!(leftovers(&s).is_empty(), "{:?}", leftovers(&s));
        assert!(s.db().query_all_valid_paths().unwrap().is_empty());
        let _ = delete_path(&dir);
    }
}

//! Recursive Nix (experimental feature `recursive-nix`): a derivation with
//! `requiredSystemFeatures = ["recursive-nix"]` gets a private daemon socket in its
//! build directory (`.nix-socket`, `NIX_REMOTE=unix://<build dir as seen>/.nix-socket`)
//! whose store is restricted to the build's input closure and to the paths the build
//! added or built through it. Those added paths may then be referenced by its outputs.
//!
//! This crate does not serve the socket (that is the worker protocol, in the daemon
//! crate above it): it defines what a build needs from the server —
//! [`RecursiveNix`], a factory the worker is given ([`crate::Worker::with_recursive_nix`]),
//! and [`RecursiveServer`], the running server, stopped when the build ends — and the
//! shared set of what the build may see, [`AllowedPaths`] (Nix's `inputPaths` and
//! `addedPaths`, and `addedDrvOutputs`).

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use firn_derivation::StorePath;

use crate::settings::Settings;

/// The experimental feature, and the system feature a derivation asks it with.
pub const FEATURE: &str = "recursive-nix";

/// The socket's name in the build directory (Nix's `.nix-socket`).
pub const SOCKET_NAME: &str = ".nix-socket";

/// `NIX_REMOTE` for the builder: the socket where the builder sees its build directory.
pub fn nix_remote(build_dir_seen: &Path) -> String {
    format!("unix://{}/{SOCKET_NAME}", build_dir_seen.display())
}

/// Makes a path added by the build appear where the builder can see it (in its
/// sandbox); not set for a build outside the sandbox, which sees the store.
pub type Materialise = Box<dyn Fn(&StorePath) -> io::Result<()> + Send>;

#[derive(Default)]
struct Inner {
    inputs: BTreeSet<StorePath>,
    added: BTreeSet<StorePath>,
    /// `DrvOutput`s (`sha256:…!out`) of what the build built through the socket.
    drv_outputs: BTreeSet<String>,
    materialise: Option<Materialise>,
}

/// What a recursive-Nix build may see and use: its input closure and what it added
/// (shared by the build's goal and every connection of its socket).
#[derive(Clone, Default)]
pub struct AllowedPaths(Arc<Mutex<Inner>>);

impl fmt::Debug for AllowedPaths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("AllowedPaths")
            .field("inputs", &g.inputs.len())
            .field("added", &g.added)
            .finish_non_exhaustive()
    }
}

impl AllowedPaths {
    /// Allowed: `inputs` (the build's input closure).
    pub fn new(inputs: BTreeSet<StorePath>) -> Self {
        Self(Arc::new(Mutex::new(Inner {
            inputs,
            ..Inner::default()
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the sets half updated: use them as they are.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nix's `isAllowed`: in the input closure or added.
    pub fn is_allowed(&self, p: &StorePath) -> bool {
        let g = self.lock();
        g.inputs.contains(p) || g.added.contains(p)
    }

    /// Nix's `addDependency`: allow `p` from now on (and make it appear in the
    /// sandbox). Returns whether it was new; an error if it could not be materialised
    /// (then it is not allowed either).
    pub fn add(&self, p: &StorePath) -> io::Result<bool> {
        let mut g = self.lock();
        if g.inputs.contains(p) || g.added.contains(p) {
            return Ok(false);
        }
        if let Some(m) = &g.materialise {
            m(p)?;
        }
        g.added.insert(p.clone());
        Ok(true)
    }

    /// Record a `DrvOutput` the build realised through the socket.
    pub fn add_drv_output(&self, id: &str) {
        self.lock().drv_outputs.insert(id.to_owned());
    }

    /// Whether the build realised `id` through the socket.
    pub fn is_allowed_drv_output(&self, id: &str) -> bool {
        self.lock().drv_outputs.contains(id)
    }

    /// Everything allowed (Nix's `queryAllValidPaths` of the restricted store).
    pub fn all(&self) -> BTreeSet<StorePath> {
        let g = self.lock();
        g.inputs.union(&g.added).cloned().collect()
    }

    /// The paths the build added (extra reference candidates of its outputs).
    pub fn added(&self) -> BTreeSet<StorePath> {
        self.lock().added.clone()
    }

    /// How added paths are made visible to the builder (set once its sandbox exists).
    pub fn set_materialise(&self, m: Materialise) {
        self.lock().materialise = Some(m);
    }
}

/// What a build's socket is started with.
#[derive(Debug)]
pub struct RecursiveRequest<'a> {
    /// The derivation being built.
    pub drv_path: &'a StorePath,
    /// Where to listen, on the host (`<build dir>/.nix-socket`).
    pub socket: PathBuf,
    /// The build user, who must own the socket (mode 0600), if any.
    pub owner: Option<(u32, u32)>,
    /// What the build may see; connections extend it.
    pub allowed: AllowedPaths,
    /// The settings of the build (inner builds use them, as Nix's recursive daemon does
    /// not apply a client's options).
    pub settings: &'a Settings,
}

/// Starts the private daemon of a recursive-Nix build (implemented above this crate,
/// by the worker protocol server).
pub trait RecursiveNix: Send + Sync {
    /// Listen on `req.socket` and serve the restricted store until stopped.
    fn start(&self, req: RecursiveRequest<'_>) -> io::Result<Box<dyn RecursiveServer>>;
}

/// A running private daemon.
pub trait RecursiveServer: Send {
    /// Stop listening, end the connections (interrupting their builds), wait for them,
    /// and remove the socket.
    fn stop(self: Box<Self>);
}

/// A build's running private daemon and its allowed paths, held by the goal while the
/// builder runs. Dropping it stops the server too.
pub struct RunningRecursive {
    server: Option<Box<dyn RecursiveServer>>,
    allowed: AllowedPaths,
}

impl fmt::Debug for RunningRecursive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningRecursive")
            .field("running", &self.server.is_some())
            .field("allowed", &self.allowed)
            .finish()
    }
}

impl RunningRecursive {
    pub fn new(server: Box<dyn RecursiveServer>, allowed: AllowedPaths) -> Self {
        Self {
            server: Some(server),
            allowed,
        }
    }

    pub fn allowed(&self) -> &AllowedPaths {
        &self.allowed
    }

    /// Stop the server (once the builder has exited, Nix's `stopDaemon`) and give the
    /// paths the build added.
    pub fn stop(&mut self) -> BTreeSet<StorePath> {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        self.allowed.added()
    }
}

impl Drop for RunningRecursive {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

/// Copy the store path at `source` (the real store) to `target` (in a sandbox's store
/// dir), as the builder's view of an added path: files are hard-linked where the builder
/// does not own them (they stay read-only for it), copied otherwise; directories are
/// made anew. A copy, not a bind mount: the sandbox's mount namespace is the builder's.
pub fn materialise_copy(source: &Path, target: &Path, build_uid: Option<u32>) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(source)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(source)?, target)
    } else if ft.is_dir() {
        std::fs::create_dir(target)?;
        for e in std::fs::read_dir(source)? {
            let e = e?;
            materialise_copy(&e.path(), &target.join(e.file_name()), build_uid)?;
        }
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o555))
    } else {
        if Some(meta.uid()) != build_uid && std::fs::hard_link(source, target).is_ok() {
            return Ok(());
        }
        std::fs::copy(source, target)?;
        let mode = if meta.mode() & 0o111 != 0 {
            0o555
        } else {
            0o444
        };
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s.as_bytes()).expect("a store path")
    }

    const A: &str = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a";
    const B: &str = "ffffffffffffffffffffffffffffffff-b";

    #[test]
    fn inputs_are_allowed_added_paths_become_allowed() {
        let a = AllowedPaths::new([sp(A)].into());
        assert!(a.is_allowed(&sp(A)));
        assert!(!a.is_allowed(&sp(B)));
        let shared = a.clone();
        assert!(shared.add(&sp(B)).expect("added"));
        assert!(a.is_allowed(&sp(B)));
        assert!(
            !a.add(&sp(A)).expect("input"),
            "an input is not added again"
        );
        assert_eq!(a.added(), [sp(B)].into());
        assert_eq!(a.all(), [sp(A), sp(B)].into());
    }

    #[test]
    fn a_path_that_cannot_be_materialised_is_not_allowed() {
        let a = AllowedPaths::new(BTreeSet::new());
        a.set_materialise(Box::new(|_| Err(io::Error::other("no"))));
        assert!(a.add(&sp(B)).is_err());
        assert!(!a.is_allowed(&sp(B)));
        assert!(a.added().is_empty());
    }

    #[test]
    fn drv_outputs() {
        let a = AllowedPaths::new(BTreeSet::new());
        assert!(!a.is_allowed_drv_output("sha256:00!out"));
        a.add_drv_output("sha256:00!out");
        assert!(a.is_allowed_drv_output("sha256:00!out"));
    }

    #[test]
    fn nix_remote_names_the_socket_where_the_builder_sees_it() {
        assert_eq!(nix_remote(Path::new("/build")), "unix:///build/.nix-socket");
    }

    #[test]
    fn materialised_copy_is_read_only() {
        let t = std::env::temp_dir().join(format!("firn-mat-{}", std::process::id()));
        let _ = firn_store::canonical::delete_path(&t);
        let src = t.join("src");
        std::fs::create_dir_all(src.join("d")).expect("mkdir");
        std::fs::write(src.join("d/f"), b"x").expect("write");
        std::os::unix::fs::symlink("d/f", src.join("l")).expect("symlink");
        let dst = t.join("dst");
        materialise_copy(&src, &dst, None).expect("copy");
        assert_eq!(std::fs::read(dst.join("d/f")).expect("read"), b"x");
        assert_eq!(
            std::fs::read_link(dst.join("l")).expect("link"),
            Path::new("d/f")
        );
        let mode = std::fs::metadata(dst.join("d")).expect("meta").mode() & 0o777;
        assert_eq!(mode, 0o555);
        let _ = firn_store::canonical::delete_path(&t);
    }
}

//! [`StoreLayout`]: where a store is — its logical store directory (the one store paths
//! name) and the real directories on disk, as Nix 2.8's `LocalFSStoreConfig` has them.
//!
//! Two ways to get one, as Nix does:
//!
//! - [`StoreLayout::chroot`] for `--store ROOT` (Nix's `root` store setting): the
//!   logical store dir stays `/nix/store`, everything else is under `ROOT`
//!   ([`StoreLayout::chroot_in`] with another logical store dir: Nix's `--store ROOT`
//!   keeps the one `NIX_STORE_DIR` names, [`nix_store_dir`]):
//!
//!   ```text
//!   real store dir   ROOT/nix/store
//!   state dir        ROOT/nix/var/nix      (db/, gcroots/, temproots/, profiles/, gc.lock)
//!   log dir          ROOT/nix/var/log/nix  (drvs/xx/rest.bz2)
//!   ```
//!
//! - [`StoreLayout::from_env`] for no `--store` (Nix's `settings.nixStore`,
//!   `nixStateDir`, `nixLogDir` in `globals.cc`): `NIX_STORE_DIR`, else `NIX_STORE`,
//!   else `/nix/store`; `NIX_STATE_DIR`, else `/nix/var/nix`; `NIX_LOG_DIR`, else
//!   `/nix/var/log/nix`. Each value is canonicalised lexically as Nix's `canonPath`
//!   does (`//`, `.`, `..` and a trailing `/` go; symlinks are not followed), and must
//!   be absolute. The real store dir is the logical one.
//!
//! The build users' pool is not the store's: Nix locks it in `settings.nixStateDir +
//! "/userpool"` whatever `--store` says, so it is [`userpool_dir`], from the
//! environment only.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use firn_derivation::{StoreDir, StorePath};
use thiserror::Error;

/// Nix's default store directory (`NIX_STORE_DIR` at Nix's build time).
pub const DEFAULT_STORE_DIR: &str = "/nix/store";
/// Nix's default state directory.
pub const DEFAULT_STATE_DIR: &str = "/nix/var/nix";
/// Nix's default log directory.
pub const DEFAULT_LOG_DIR: &str = "/nix/var/log/nix";

/// The environment variables that say where the store is, in the order Nix reads them.
pub const LOCATION_VARS: [&str; 4] = ["NIX_STORE_DIR", "NIX_STORE", "NIX_STATE_DIR", "NIX_LOG_DIR"];

/// A location variable with a value Nix 2.8 refuses (it aborts at start-up).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// Not an absolute path (empty included), as Nix's `canonPath` says.
    #[error("{var}: not an absolute path: '{value}'")]
    NotAbsolute { var: &'static str, value: String },
    /// The store directory is kept as text, as in the database.
    #[error("{var}: the store directory '{value}' is not valid UTF-8")]
    NotUtf8 { var: &'static str, value: String },
}

/// Where a store is: the logical store directory store paths are printed and hashed
/// with, and the real directories on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLayout {
    /// The logical store directory (`/nix/store`, or `NIX_STORE_DIR`).
    pub store_dir: StoreDir,
    /// Where the store objects are on disk (Nix's `real`).
    pub real_store_dir: PathBuf,
    /// Nix's `state`: `db/`, `gcroots/`, `temproots/`, `profiles/`, `gc.lock`,
    /// `gc-socket/`.
    pub state_dir: PathBuf,
    /// Nix's `log`: build logs in `drvs/`.
    pub log_dir: PathBuf,
}

impl StoreLayout {
    /// Nix's chroot store at `root` (`--store ROOT`): logical `/nix/store`, the rest
    /// under `root` (made absolute, as Nix's `absPath`).
    pub fn chroot(root: &Path) -> Self {
        Self::chroot_in(root, StoreDir::default())
    }

    /// Nix's chroot store at `root` whose store paths are named in `store_dir`: the
    /// objects in `ROOT/nix/store` whatever `store_dir` is, state and logs under `root`
    /// (what Nix 2.8 makes of `--store ROOT` with `NIX_STORE_DIR` set).
    pub fn chroot_in(root: &Path, store_dir: StoreDir) -> Self {
        let root = absolute(root);
        Self {
            store_dir,
            real_store_dir: root.join("nix/store"),
            state_dir: root.join("nix/var/nix"),
            log_dir: root.join("nix/var/log/nix"),
        }
    }

    /// The store Nix opens without `--store`, from `NIX_STORE_DIR` (else `NIX_STORE`),
    /// `NIX_STATE_DIR` and `NIX_LOG_DIR` as `lookup` gives them (`std::env::var_os`
    /// for the process's environment). A variable that is set counts, even empty.
    pub fn from_env(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, LayoutError> {
        let store_dir = nix_store_dir(&lookup)?;
        Ok(Self {
            real_store_dir: PathBuf::from(store_dir.as_str()),
            store_dir,
            state_dir: nix_state_dir(&lookup)?,
            log_dir: var_or(&lookup, "NIX_LOG_DIR", DEFAULT_LOG_DIR)?,
        })
    }

    /// Whether the store objects are somewhere else than the paths that name them
    /// (a chroot store not at `/`): a builder outside the sandbox then needs the real
    /// store dir mounted at the logical one.
    pub fn is_relocated(&self) -> bool {
        self.real_store_dir != Path::new(self.store_dir.as_str())
    }

    /// Where the store object `p` lives on disk.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        self.real_store_dir.join(p.base_name())
    }

    /// Where a path below the logical store dir (`<store dir>/…`) is on disk; other
    /// paths are themselves.
    pub fn real_path_of(&self, logical: &Path) -> PathBuf {
        match logical.strip_prefix(self.store_dir.as_str()) {
            Ok(rest) if self.is_relocated() => {
                let mut real = self.real_store_dir.join(rest);
                // `link/` means what `link` points to, as for the kernel.
                if logical.as_os_str().as_bytes().ends_with(b"/") {
                    real.push("");
                }
                real
            }
            _ => logical.to_path_buf(),
        }
    }

    /// `<state>/db`: `db.sqlite`, `schema`, `big-lock`.
    pub fn db_dir(&self) -> PathBuf {
        self.state_dir.join("db")
    }

    /// `<state>/gcroots`.
    pub fn gcroots_dir(&self) -> PathBuf {
        self.state_dir.join("gcroots")
    }

    /// `<state>/profiles`.
    pub fn profiles_dir(&self) -> PathBuf {
        self.state_dir.join("profiles")
    }

    /// `<state>/temproots`.
    pub fn temproots_dir(&self) -> PathBuf {
        self.state_dir.join("temproots")
    }

    /// `<log>/drvs`: the build logs (`xx/rest.bz2`).
    pub fn drv_log_dir(&self) -> PathBuf {
        self.log_dir.join("drvs")
    }
}

/// Nix's `settings.nixStore`, the logical store dir of every local store (a chroot one
/// too): `NIX_STORE_DIR`, else `NIX_STORE`, else `/nix/store`.
pub fn nix_store_dir(lookup: impl Fn(&str) -> Option<OsString>) -> Result<StoreDir, LayoutError> {
    let (var, dir) = match (lookup("NIX_STORE_DIR"), lookup("NIX_STORE")) {
        (Some(v), _) => ("NIX_STORE_DIR", v),
        (None, Some(v)) => ("NIX_STORE", v),
        (None, None) => ("NIX_STORE_DIR", OsString::from(DEFAULT_STORE_DIR)),
    };
    let dir = canon_var(var, &dir)?;
    let text = dir.to_str().ok_or_else(|| LayoutError::NotUtf8 {
        var,
        value: dir.to_string_lossy().into_owned(),
    })?;
    StoreDir::new(text).map_err(|_| LayoutError::NotAbsolute {
        var,
        value: text.to_owned(),
    })
}

/// Nix's `settings.nixStateDir`: `NIX_STATE_DIR`, else `/nix/var/nix` — the machine's,
/// whatever store is opened.
pub fn nix_state_dir(lookup: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, LayoutError> {
    var_or(&lookup, "NIX_STATE_DIR", DEFAULT_STATE_DIR)
}

/// Where build users are locked (`<nixStateDir>/userpool/<uid>`), as Nix 2.8's
/// `UserLock`: under the state dir of the environment, also for `--store ROOT`.
pub fn userpool_dir(lookup: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, LayoutError> {
    Ok(nix_state_dir(lookup)?.join("userpool"))
}

/// Whether any of [`LOCATION_VARS`] is set.
pub fn location_vars_set(lookup: impl Fn(&str) -> Option<OsString>) -> bool {
    LOCATION_VARS.iter().any(|v| lookup(v).is_some())
}

fn var_or(
    lookup: &impl Fn(&str) -> Option<OsString>,
    var: &'static str,
    default: &str,
) -> Result<PathBuf, LayoutError> {
    let value = lookup(var).unwrap_or_else(|| OsString::from(default));
    canon_var(var, &value)
}

fn canon_var(var: &'static str, value: &OsStr) -> Result<PathBuf, LayoutError> {
    canon_path(value).ok_or_else(|| LayoutError::NotAbsolute {
        var,
        value: value.to_string_lossy().into_owned(),
    })
}

/// Nix's `canonPath` without following symlinks: absolute, no `.`, `..`, `//` or
/// trailing `/`; `None` for a relative (or empty) path.
pub fn canon_path(path: &OsStr) -> Option<PathBuf> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return None;
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in bytes.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let mut out = Vec::with_capacity(bytes.len());
    for p in &parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Some(PathBuf::from(OsString::from_vec(out)))
}

/// Make `p` absolute and resolve `.` and `..` lexically (no symlinks followed).
pub fn absolute(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn defaults_are_nix_2_8s() {
        let l = StoreLayout::from_env(env(&[])).unwrap();
        assert_eq!(l.store_dir.as_str(), "/nix/store");
        assert_eq!(l.real_store_dir, Path::new("/nix/store"));
        assert_eq!(l.state_dir, Path::new("/nix/var/nix"));
        assert_eq!(l.log_dir, Path::new("/nix/var/log/nix"));
        assert!(!l.is_relocated());
        // The same as a chroot store at `/`.
        assert_eq!(l, StoreLayout::chroot(Path::new("/")));
        assert_eq!(
            userpool_dir(env(&[])).unwrap(),
            Path::new("/nix/var/nix/userpool")
        );
    }

    #[test]
    fn variables_canonicalised_store_dir_before_nix_store() {
        let vars = [
            ("NIX_STORE", "/ignored"),
            ("NIX_STORE_DIR", "/tmp/x//store/"),
            ("NIX_STATE_DIR", "/tmp/x/a/../var"),
            ("NIX_LOG_DIR", "/tmp/x/./log"),
        ];
        let l = StoreLayout::from_env(env(&vars)).unwrap();
        assert_eq!(l.store_dir.as_str(), "/tmp/x/store");
        assert_eq!(l.real_store_dir, Path::new("/tmp/x/store"));
        assert_eq!(l.state_dir, Path::new("/tmp/x/var"));
        assert_eq!(l.log_dir, Path::new("/tmp/x/log"));
        assert_eq!(l.db_dir(), Path::new("/tmp/x/var/db"));
        assert_eq!(l.drv_log_dir(), Path::new("/tmp/x/log/drvs"));
        assert_eq!(
            userpool_dir(env(&vars)).unwrap(),
            Path::new("/tmp/x/var/userpool")
        );
        let l = StoreLayout::from_env(env(&[("NIX_STORE", "/s2")])).unwrap();
        assert_eq!(l.store_dir.as_str(), "/s2");
    }

    #[test]
    fn relative_or_empty_is_refused_naming_the_variable() {
        for (var, value) in [
            ("NIX_STORE_DIR", ""),
            ("NIX_STATE_DIR", "rel"),
            ("NIX_LOG_DIR", "a/b"),
        ] {
            let e = StoreLayout::from_env(env(&[(var, value)])).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{var}: not an absolute path: '{value}'")
            );
        }
        // An empty NIX_STORE_DIR is not skipped for NIX_STORE (Nix takes it, and aborts).
        let e = StoreLayout::from_env(env(&[("NIX_STORE_DIR", ""), ("NIX_STORE", "/s")]));
        assert!(e.is_err());
    }

    #[test]
    fn chroot_is_todays_layout() {
        let l = StoreLayout::chroot(Path::new("/r"));
        assert_eq!(l.store_dir.as_str(), "/nix/store");
        assert_eq!(l.real_store_dir, Path::new("/r/nix/store"));
        assert_eq!(l.state_dir, Path::new("/r/nix/var/nix"));
        assert_eq!(l.log_dir, Path::new("/r/nix/var/log/nix"));
        assert!(l.is_relocated());
        assert_eq!(
            l.real_path_of(Path::new("/nix/store/abc-x/bin")),
            Path::new("/r/nix/store/abc-x/bin")
        );
        assert_eq!(l.real_path_of(Path::new("/etc/x")), Path::new("/etc/x"));
        assert_eq!(
            l.real_path_of(Path::new("/nix/store/abc-x/"))
                .as_os_str()
                .as_bytes(),
            b"/r/nix/store/abc-x/"
        );
    }
}

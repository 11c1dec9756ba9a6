//! Settings: the store root and Nix-named options (`--option NAME VALUE`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use firn_derivation::StoreDir;

use crate::error::CliError;

/// Settings firn knows, by their Nix names.
const KNOWN: &[&str] = &[
    "sandbox",
    "sandbox-paths",
    "build-users-group",
    "max-jobs",
    "cores",
    "timeout",
    "max-silent-time",
    "max-build-log-size",
    "keep-going",
    "keep-failed",
    "substituters",
    "keep-outputs",
    "keep-derivations",
    "gc-keep-outputs",
    "gc-keep-derivations",
];

#[derive(Debug)]
pub struct Settings {
    /// Physical root of the store (`--store`, `FIRN_STORE`); `None` means `/`.
    pub root: Option<PathBuf>,
    /// The logical store directory.
    pub store_dir: StoreDir,
    pub options: BTreeMap<String, String>,
    pub warnings: Vec<String>,
    pub quiet: bool,
}

impl Settings {
    pub fn from_cli(
        root: Option<PathBuf>,
        options: &[String],
        quiet: bool,
    ) -> Result<Self, CliError> {
        let mut map = BTreeMap::new();
        let mut warnings = Vec::new();
        for pair in options.chunks(2) {
            let [name, value] = pair else {
                return Err(CliError::usage("--option needs a NAME and a VALUE"));
            };
            if !KNOWN.contains(&name.as_str()) {
                warnings.push(format!("unknown setting '{name}'"));
            }
            map.insert(name.clone(), value.clone());
        }
        Ok(Self {
            root,
            options: map,
            quiet,
            store_dir: StoreDir::default(),
            warnings,
        })
    }

    /// The store root: `--store`/`FIRN_STORE`, else `/` for root (like Nix), else
    /// `$XDG_DATA_HOME/firn/root` (`~/.local/share/firn/root`).
    pub fn store_root(&self) -> PathBuf {
        if let Some(r) = &self.root {
            return r.clone();
        }
        if nix_is_root() {
            return PathBuf::from("/");
        }
        let data = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        data.join("firn/root")
    }

    /// The value of `--option NAME VALUE`, if given.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options.get(name).map(String::as_str)
    }

    /// Where a logical store path lives on disk.
    pub fn physical(&self, logical: &str) -> PathBuf {
        match &self.root {
            Some(root) if root.as_os_str() != "/" => root.join(logical.trim_start_matches('/')),
            _ => PathBuf::from(logical),
        }
    }
}

fn nix_is_root() -> bool {
    // SAFETY-free: reading the effective uid through std's metadata of /proc/self.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

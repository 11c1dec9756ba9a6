//! Settings: the store root and Nix-named options (`--option NAME VALUE`).

use std::path::PathBuf;

use firn_derivation::StoreDir;

use crate::error::CliError;

/// Settings firn knows, by their Nix names.
const KNOWN: &[&str] = &[
    "sandbox",
    "sandbox-paths",
    "max-jobs",
    "cores",
    "timeout",
    "max-silent-time",
    "max-build-log-size",
    "keep-going",
    "keep-failed",
    "substituters",
];

#[derive(Debug)]
pub struct Settings {
    /// Physical root of the store (`--store`, `FIRN_STORE`); `None` means `/`.
    pub root: Option<PathBuf>,
    /// The logical store directory.
    pub store_dir: StoreDir,
    pub warnings: Vec<String>,
}

impl Settings {
    pub fn from_cli(root: Option<PathBuf>, options: &[String]) -> Result<Self, CliError> {
        let mut warnings = Vec::new();
        for pair in options.chunks(2) {
            let [name, value] = pair else {
                return Err(CliError::usage("--option needs a NAME and a VALUE"));
            };
            if !KNOWN.contains(&name.as_str()) {
                warnings.push(format!("unknown setting '{name}'"));
            }
            // The commands so far take no settings; the names are checked already so
            // that scripts written now keep working when the build commands land.
            let _ = value;
        }
        Ok(Self {
            root: root.filter(|r| r.as_os_str() != "/"),
            store_dir: StoreDir::default(),
            warnings,
        })
    }

    /// Where a logical store path lives on disk.
    pub fn physical(&self, logical: &str) -> PathBuf {
        match &self.root {
            Some(root) => root.join(logical.trim_start_matches('/')),
            None => PathBuf::from(logical),
        }
    }
}

//! The CLI's settings: the store root, `--quiet`, and the build settings parsed from
//! `--option NAME VALUE` into firn-build's typed [`firn_build::Settings`] (the only
//! place setting text is parsed).

use std::path::PathBuf;

use firn_derivation::StoreDir;

use crate::error::CliError;

#[derive(Debug)]
pub struct Settings {
    /// Physical root of the store (`--store`, `FIRN_STORE`); `None` means `/`.
    pub root: Option<PathBuf>,
    /// The logical store directory.
    pub store_dir: StoreDir,
    /// Every Nix setting, typed.
    pub build: firn_build::Settings,
    /// Settings given that firn does not know (Nix warns about them).
    pub warnings: Vec<String>,
    pub quiet: bool,
}

impl Settings {
    pub fn from_cli(
        root: Option<PathBuf>,
        options: &[String],
        quiet: bool,
    ) -> Result<Self, CliError> {
        let mut build = firn_build::Settings::default();
        let mut warnings = Vec::new();
        for pair in options.chunks(2) {
            let [name, value] = pair else {
                return Err(CliError::usage("--option needs a NAME and a VALUE"));
            };
            match build.set(name, value) {
                Ok(()) => {}
                Err(e @ firn_build::SettingError::Unknown(_)) => warnings.push(e.to_string()),
                Err(e) => return Err(CliError::Setting(e)),
            }
        }
        Ok(Self {
            root,
            build,
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
        if nix::unistd::Uid::effective().is_root() {
            return PathBuf::from("/");
        }
        let data = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        data.join("firn/root")
    }

    /// Where a logical store path lives on disk.
    pub fn physical(&self, logical: &str) -> PathBuf {
        match &self.root {
            Some(root) if root.as_os_str() != "/" => root.join(logical.trim_start_matches('/')),
            _ => PathBuf::from(logical),
        }
    }
}

//! The CLI's settings: the store root, `--quiet`, and the build settings: firn-build's
//! typed [`firn_build::Settings`], from the settings files in `nix.conf` syntax
//! ([`firn_build::config`] has where they are and their precedence) and then
//! `--option NAME VALUE` on top.

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
    /// Settings given that neither firn nor Nix knows (Nix warns about them, once).
    pub warnings: Vec<String>,
    /// The file that turned the sandbox off, if one did (and `--option` did not turn it
    /// back on or off itself): every unsandboxed build says so.
    pub sandbox_off_from: Option<String>,
    pub quiet: bool,
}

/// What `--store SPEC` (or `FIRN_STORE`) names, read as Nix 2.8's `openStore` reads a
/// store that is not a URI: `auto`, `local` and the empty string are the default store
/// (`None`); anything with a `/` (and no `://`) is a local store rooted there, made
/// absolute lexically (`./x` is `$PWD/x`, as Nix's `absPath`); any other word, or a URI
/// (firn opens local stores only), is Nix's `don't know how to open Nix store 'SPEC'`.
pub fn store_root_from(spec: &std::path::Path) -> Result<Option<PathBuf>, CliError> {
    let text = spec.to_string_lossy();
    if matches!(text.as_ref(), "" | "auto" | "local") {
        return Ok(None);
    }
    if text.contains("://") || !text.contains('/') {
        return Err(CliError::UnknownStore(text.into_owned()));
    }
    Ok(Some(firn_store::store::absolute(spec)))
}

impl Settings {
    pub fn from_cli(
        root: Option<PathBuf>,
        options: &[String],
        quiet: bool,
    ) -> Result<Self, CliError> {
        let mut build = firn_build::Settings::default();
        let mut warnings: Vec<String> = Vec::new();
        let mut sandbox_from: Option<String> = None;
        let files = firn_build::config::ConfigSources::from_env(|k| std::env::var_os(k))
            .load()
            .map_err(CliError::Config)?;
        let given = files.iter().map(|a| (&a.name, &a.value, Some(&a.origin)));
        let mut pairs = Vec::new();
        for pair in options.chunks(2) {
            let [name, value] = pair else {
                return Err(CliError::usage("--option needs a NAME and a VALUE"));
            };
            pairs.push((name, value, None));
        }
        for (name, value, origin) in given.chain(pairs) {
            match build.apply(name, value) {
                Ok(_) => {}
                Err(e @ firn_build::SettingError::Unknown(_)) => {
                    let w = e.to_string();
                    if !warnings.contains(&w) {
                        warnings.push(w);
                    }
                }
                Err(source) => {
                    return Err(match origin {
                        Some(origin) => CliError::SettingIn {
                            source,
                            origin: origin.clone(),
                        },
                        None => CliError::Setting(source),
                    })
                }
            }
            if firn_build::Settings::canonical_name(name) == Some("sandbox") {
                sandbox_from = origin.cloned();
            }
        }
        let sandbox_off_from =
            sandbox_from.filter(|_| build.sandbox == firn_build::SandboxMode::Off);
        Ok(Self {
            root: root.map(|r| store_root_from(&r)).transpose()?.flatten(),
            build,
            quiet,
            store_dir: StoreDir::default(),
            warnings,
            sandbox_off_from,
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
        Self::user_store_root()
    }

    /// An ordinary user's own store: `$XDG_DATA_HOME/firn/root`
    /// (`~/.local/share/firn/root`).
    pub fn user_store_root() -> PathBuf {
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

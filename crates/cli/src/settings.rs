//! The CLI's settings: where the store is, `--quiet`, and the build settings: firn-build's
//! typed [`firn_build::Settings`], from the settings files in `nix.conf` syntax
//! ([`firn_build::config`] has where they are and their precedence) and then
//! `--option NAME VALUE` on top.

use std::ffi::OsString;
use std::path::PathBuf;

use firn_derivation::StoreDir;
use firn_store::layout::{location_vars_set, nix_store_dir, userpool_dir};
use firn_store::StoreLayout;

use crate::error::CliError;

#[derive(Debug)]
pub struct Settings {
    /// Where the store is ([`store_layout`]).
    pub layout: StoreLayout,
    /// The logical store directory (`layout`'s).
    pub store_dir: StoreDir,
    /// Where build users are locked: `$NIX_STATE_DIR/userpool`, whatever `--store`.
    pub userpool: PathBuf,
    /// Every Nix setting, typed.
    pub build: firn_build::Settings,
    /// Settings given that neither firn nor Nix knows (Nix warns about them, once).
    pub warnings: Vec<String>,
    /// The file that turned the sandbox off, if one did (and `--option` did not turn it
    /// back on or off itself): every unsandboxed build says so.
    pub sandbox_off_from: Option<String>,
    pub quiet: bool,
    /// Warn that realised paths without `--add-root` may be collected (as nix-store
    /// does; `--no-gc-warning` says not to).
    pub gc_warning: bool,
    /// `--log-format`.
    pub log_format: crate::progress::LogFormat,
    /// `-v` given this many times.
    pub verbosity: u8,
    /// A store was named (`--store` or `FIRN_STORE`).
    pub store_given: bool,
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

/// An ordinary user's own store: `$XDG_DATA_HOME/firn/root`
/// (`~/.local/share/firn/root`).
pub fn user_store_root(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let data = env("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    data.join("firn/root")
}

impl Settings {
    /// The root whose `nix/` holds the store, for a store in Nix's chroot layout with
    /// the logical store dir `/nix/store` (`/` for the real one); `None` for a store
    /// relocated with `NIX_STORE_DIR`.
    pub fn chroot_root(&self) -> Option<PathBuf> {
        if self.layout.store_dir.as_str() != "/nix/store" {
            return None;
        }
        let real = &self.layout.real_store_dir;
        if !real.ends_with("nix/store") {
            return None;
        }
        real.parent()?.parent().map(std::path::Path::to_path_buf)
    }

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
        let env = |k: &str| std::env::var_os(k);
        let root = root.map(|r| store_root_from(&r)).transpose()?.flatten();
        let store_given = root.is_some();
        let layout = store_layout(root, env, nix::unistd::Uid::effective().is_root())
            .map_err(|e| CliError::usage(e.to_string()))?;
        let userpool = userpool_dir(env).map_err(|e| CliError::usage(e.to_string()))?;
        Ok(Self {
            store_dir: layout.store_dir.clone(),
            layout,
            userpool,
            build,
            quiet,
            gc_warning: true,
            log_format: crate::progress::LogFormat::Bar,
            verbosity: 0,
            warnings,
            sandbox_off_from,
            store_given,
        })
    }
}

/// Where the store is, by precedence:
///
/// 1. `--store ROOT` (or `FIRN_STORE`): Nix's chroot store at `ROOT`
///    ([`StoreLayout::chroot_in`]): objects in `ROOT/nix/store`, state in
///    `ROOT/nix/var/nix`, logs in `ROOT/nix/var/log/nix` whatever `NIX_STATE_DIR` and
///    `NIX_LOG_DIR` say; the logical store dir is `/nix/store` unless `NIX_STORE_DIR`
///    (or `NIX_STORE`) names another, as with Nix 2.8's `--store ROOT`;
/// 2. else, when one of `NIX_STORE_DIR`, `NIX_STORE`, `NIX_STATE_DIR`, `NIX_LOG_DIR` is
///    set, or when running as root: the store those name, with Nix's defaults for the
///    others ([`StoreLayout::from_env`]; as root and none set, that is `/nix/store`,
///    `/nix/var/nix`, `/nix/var/log/nix`, like Nix);
/// 3. else (an ordinary user, no variable): the chroot store at
///    `$XDG_DATA_HOME/firn/root` (`~/.local/share/firn/root`).
pub fn store_layout(
    root: Option<PathBuf>,
    env: impl Fn(&str) -> Option<OsString>,
    is_root: bool,
) -> Result<StoreLayout, firn_store::LayoutError> {
    if let Some(root) = root {
        return Ok(StoreLayout::chroot_in(&root, nix_store_dir(&env)?));
    }
    if is_root || location_vars_set(&env) {
        return StoreLayout::from_env(env);
    }
    Ok(StoreLayout::chroot(&user_store_root(env)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn store_wins_then_variables_then_the_users_chroot() {
        let vars = [
            ("NIX_STORE_DIR", "/tmp/t/store"),
            ("NIX_STATE_DIR", "/tmp/t/var"),
            ("HOME", "/home/u"),
        ];
        // `--store` keeps state and logs under ROOT, and the logical store dir of the
        // variables (Nix 2.8's `--store ROOT` with NIX_STORE_DIR set).
        let l = store_layout(Some("/r".into()), env(&vars), false).unwrap();
        assert_eq!(l.store_dir.as_str(), "/tmp/t/store");
        assert_eq!(l.real_store_dir, Path::new("/r/nix/store"));
        assert_eq!(l.state_dir, Path::new("/r/nix/var/nix"));
        assert_eq!(l.log_dir, Path::new("/r/nix/var/log/nix"));
        let l = store_layout(Some("/r".into()), env(&vars[1..]), false).unwrap();
        assert_eq!(l, StoreLayout::chroot(Path::new("/r")));
        for is_root in [false, true] {
            let l = store_layout(None, env(&vars), is_root).unwrap();
            assert_eq!(l.store_dir.as_str(), "/tmp/t/store");
            assert_eq!(l.state_dir, Path::new("/tmp/t/var"));
            assert_eq!(l.log_dir, Path::new("/nix/var/log/nix"));
        }
        let l = store_layout(None, env(&[("NIX_LOG_DIR", "/l"), ("HOME", "/h")]), false);
        assert_eq!(l.unwrap().log_dir, Path::new("/l"));
        let l = store_layout(None, env(&[("HOME", "/h")]), false).unwrap();
        assert_eq!(
            l,
            StoreLayout::chroot(Path::new("/h/.local/share/firn/root"))
        );
        let l = store_layout(None, env(&[("HOME", "/h")]), true).unwrap();
        assert_eq!(l, StoreLayout::chroot(Path::new("/")));
        let e = store_layout(None, env(&[("NIX_STATE_DIR", "var")]), true).unwrap_err();
        assert_eq!(e.to_string(), "NIX_STATE_DIR: not an absolute path: 'var'");
    }
}

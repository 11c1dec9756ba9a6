//! Settings files in `nix.conf` syntax, and where they are.
//!
//! The grammar, as Nix 2.8's `Config::applyConfig` reads it: the text is split into
//! lines; everything from a `#` on is a comment; a line is split into tokens at spaces,
//! tabs and carriage returns; an empty line is skipped. Then
//!
//! ```text
//! line    = include | setting
//! include = ("include" | "!include") PATH     ; relative to the including file
//! setting = NAME "=" VALUE-TOKEN*             ; the value is the tokens joined by " "
//! ```
//!
//! `include` of a missing file is an error, `!include` of one is not. A line that is
//! neither is an error naming the line and the file (`illegal configuration line`).
//! A name `extra-NAME` appends to the list setting `NAME` instead of replacing it.
//!
//! The files, lowest precedence first (a later one overrides an earlier one; firn's
//! own files over Nix's, so a machine set up for Nix works unchanged and firn can still
//! be told otherwise):
//!
//! 1. Nix's global file `$NIX_CONF_DIR/nix.conf` (default `/etc/nix/nix.conf`);
//! 2. firn's global file `$FIRN_CONF_DIR/firn.conf` (default `/etc/firn/firn.conf`);
//! 3. Nix's user files: `$NIX_USER_CONF_FILES` (colon-separated, the first one
//!    winning), else `$XDG_CONFIG_HOME/nix/nix.conf` (default `~/.config`) and
//!    `nix/nix.conf` under each of `$XDG_CONFIG_DIRS` (default `/etc/xdg`);
//! 4. firn's user file `$XDG_CONFIG_HOME/firn/firn.conf`;
//! 5. the text of `$NIX_CONFIG`;
//!
//! then `--option NAME VALUE` on the command line. A top-level file that does not exist
//! is skipped, as Nix does.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// One `NAME = VALUE` from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub name: String,
    pub value: String,
    /// The file (or `NIX_CONFIG`) it came from.
    pub origin: String,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("illegal configuration line '{line}' in '{origin}'")]
    IllegalLine { line: String, origin: String },
    #[error("file '{path}' included from '{origin}' not found")]
    MissingInclude { path: PathBuf, origin: String },
    #[error("reading '{path}': {}", firn_store::error::strerror(source))]
    Read { path: PathBuf, source: io::Error },
    #[error("'{path}' includes itself")]
    IncludeLoop { path: PathBuf },
}

/// Parse `text` (from `origin`, whose directory relative includes are resolved in),
/// reading included files with `read` (`Ok(None)`: no such file).
pub fn parse(
    text: &str,
    origin: &str,
    dir: &Path,
    read: &mut dyn FnMut(&Path) -> io::Result<Option<String>>,
) -> Result<Vec<Assignment>, ConfigError> {
    let mut out = Vec::new();
    parse_into(text, origin, dir, read, &mut out, 0)?;
    Ok(out)
}

fn parse_into(
    text: &str,
    origin: &str,
    dir: &Path,
    read: &mut dyn FnMut(&Path) -> io::Result<Option<String>>,
    out: &mut Vec<Assignment>,
    depth: usize,
) -> Result<(), ConfigError> {
    for raw in text.split('\n') {
        let line = raw.split('#').next().unwrap_or("");
        let tokens: Vec<&str> = line
            .split([' ', '\t', '\r'])
            .filter(|t| !t.is_empty())
            .collect();
        let illegal = || ConfigError::IllegalLine {
            line: line.to_owned(),
            origin: origin.to_owned(),
        };
        match tokens.as_slice() {
            [] => {}
            [kw @ ("include" | "!include"), rest @ ..] => {
                let [path] = rest else {
                    return Err(illegal());
                };
                let path = dir.join(path);
                if depth > 32 {
                    return Err(ConfigError::IncludeLoop { path });
                }
                match read(&path) {
                    Ok(Some(text)) => {
                        let sub_dir = path.parent().unwrap_or(dir).to_path_buf();
                        let shown = path.display().to_string();
                        parse_into(&text, &shown, &sub_dir, read, out, depth + 1)?;
                    }
                    Ok(None) if *kw == "!include" => {}
                    Ok(None) => {
                        return Err(ConfigError::MissingInclude {
                            path,
                            origin: origin.to_owned(),
                        })
                    }
                    Err(source) => return Err(ConfigError::Read { path, source }),
                }
            }
            [name, "=", value @ ..] => out.push(Assignment {
                name: (*name).to_owned(),
                value: value.join(" "),
                origin: origin.to_owned(),
            }),
            _ => return Err(illegal()),
        }
    }
    Ok(())
}

/// Where the settings files are, from the environment (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSources {
    /// Files in order of precedence, lowest first.
    pub files: Vec<PathBuf>,
    /// The text of `NIX_CONFIG`.
    pub nix_config: Option<String>,
}

impl ConfigSources {
    /// The sources `env` (a variable lookup, e.g. `std::env::var_os`) points at.
    pub fn from_env(env: impl Fn(&str) -> Option<OsString>) -> Self {
        let var = |k: &str| env(k).filter(|v| !v.is_empty());
        let path_var = |k: &str, default: &str| {
            var(k)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        let mut files = vec![
            path_var("NIX_CONF_DIR", "/etc/nix").join("nix.conf"),
            path_var("FIRN_CONF_DIR", "/etc/firn").join("firn.conf"),
        ];
        let config_home = var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")));
        // Nix applies its user files last to first: the first one wins.
        let mut user: Vec<PathBuf> = match env("NIX_USER_CONF_FILES") {
            Some(list) => std::env::split_paths(&list)
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
            None => {
                let dirs = var("XDG_CONFIG_DIRS").unwrap_or_else(|| "/etc/xdg".into());
                config_home
                    .iter()
                    .cloned()
                    .chain(std::env::split_paths(&dirs))
                    .map(|d| d.join("nix/nix.conf"))
                    .collect()
            }
        };
        user.reverse();
        files.extend(user);
        if let Some(home) = &config_home {
            files.push(home.join("firn/firn.conf"));
        }
        Self {
            files,
            nix_config: env("NIX_CONFIG").map(|v| v.to_string_lossy().into_owned()),
        }
    }

    /// Every assignment of every source, lowest precedence first.
    pub fn load(&self) -> Result<Vec<Assignment>, ConfigError> {
        let mut read = |p: &Path| match std::fs::read_to_string(p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        let mut out = Vec::new();
        for file in &self.files {
            let text = match read(file) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: file.clone(),
                        source,
                    })
                }
            };
            let dir = file.parent().unwrap_or(Path::new("/"));
            out.extend(parse(&text, &file.display().to_string(), dir, &mut read)?);
        }
        if let Some(text) = &self.nix_config {
            let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
            out.extend(parse(text, "NIX_CONFIG", &dir, &mut read)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn files(map: &[(&str, &str)]) -> impl FnMut(&Path) -> io::Result<Option<String>> {
        let m: BTreeMap<PathBuf, String> = map
            .iter()
            .map(|(k, v)| (PathBuf::from(k), (*v).to_owned()))
            .collect();
        move |p: &Path| Ok(m.get(p).cloned())
    }

    #[test]
    fn grammar() {
        let text = "# comment\n  sandbox   =  false # trailing\nsandbox-paths = /bin/sh=/bin/busybox\t/x?\r\n\nempty =\ninclude sub.conf\n!include missing.conf\n";
        let mut read = files(&[("/etc/nix/sub.conf", "cores = 3\n!include ../deep.conf")]);
        let got = parse(text, "/etc/nix/nix.conf", Path::new("/etc/nix"), &mut read).unwrap();
        let pairs: Vec<(&str, &str, &str)> = got
            .iter()
            .map(|a| (a.name.as_str(), a.value.as_str(), a.origin.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("sandbox", "false", "/etc/nix/nix.conf"),
                (
                    "sandbox-paths",
                    "/bin/sh=/bin/busybox /x?",
                    "/etc/nix/nix.conf"
                ),
                ("empty", "", "/etc/nix/nix.conf"),
                ("cores", "3", "/etc/nix/sub.conf"),
            ]
        );
    }

    #[test]
    fn errors_name_the_line_and_file() {
        let mut read = files(&[]);
        let e = parse("sandbox false", "/f", Path::new("/"), &mut read).unwrap_err();
        assert_eq!(
            e.to_string(),
            "illegal configuration line 'sandbox false' in '/f'"
        );
        let e = parse("include a b", "/f", Path::new("/"), &mut read).unwrap_err();
        assert!(matches!(e, ConfigError::IllegalLine { .. }));
        let e = parse("include nope.conf", "/etc/f", Path::new("/etc"), &mut read).unwrap_err();
        assert_eq!(
            e.to_string(),
            "file '/etc/nope.conf' included from '/etc/f' not found"
        );
        let mut looping = files(&[("/a", "include /a")]);
        let e = parse("include /a", "/a", Path::new("/"), &mut looping).unwrap_err();
        assert!(matches!(e, ConfigError::IncludeLoop { .. }));
    }

    #[test]
    fn sources_in_order() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let s = ConfigSources::from_env(env(&[("HOME", "/home/u")]));
        assert_eq!(
            s.files,
            [
                "/etc/nix/nix.conf",
                "/etc/firn/firn.conf",
                "/etc/xdg/nix/nix.conf",
                "/home/u/.config/nix/nix.conf",
                "/home/u/.config/firn/firn.conf",
            ]
            .map(PathBuf::from)
        );
        let s = ConfigSources::from_env(env(&[
            ("NIX_CONF_DIR", "/c"),
            ("FIRN_CONF_DIR", "/fc"),
            ("NIX_USER_CONF_FILES", "/u1:/u2"),
            ("XDG_CONFIG_HOME", "/x"),
            ("NIX_CONFIG", "cores = 1"),
        ]));
        assert_eq!(
            s.files,
            [
                "/c/nix.conf",
                "/fc/firn.conf",
                "/u2",
                "/u1",
                "/x/firn/firn.conf"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(s.nix_config.as_deref(), Some("cores = 1"));
    }
}

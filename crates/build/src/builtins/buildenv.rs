//! `builtin:buildenv`: the user environment `nix-env` and `nix profile` make — a tree
//! of symlinks to the files of the packages in attribute `derivations`, with
//! collisions settled by priority, directories merged, the packages each one names in
//! `nix-support/propagated-user-env-packages` added after them, and a `manifest.nix`
//! link to attribute `manifest` (Nix 2.8 `builtins/buildenv.cc`, step for step, so the
//! same inputs give the same tree and the same errors).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::error::quoted;
use super::{Attrs, BuiltinError, Context};

/// One output of a package of `derivations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub path: PathBuf,
    pub active: bool,
    pub priority: i32,
}

/// The files that never go into an environment (useless there, or every package has
/// one: Nix's list, matched against the end of the source path).
const SKIPPED_SUFFIXES: [&[u8]; 7] = [
    b"/propagated-build-inputs",
    b"/nix-support",
    b"/perllocal.pod",
    b"/info/dir",
    b"/log",
    b"/manifest.nix",
    b"/manifest.json",
];

/// The priority of the first package propagated by another; each next one gets one
/// more (so they lose against what was asked for).
const FIRST_PROPAGATED_PRIORITY: i32 = 1000;

/// Run the builder with `attrs` (`out`, `derivations`, `manifest`).
pub fn buildenv(attrs: &Attrs, cx: &mut Context<'_>) -> Result<(), BuiltinError> {
    let out = PathBuf::from(attrs.get("out")?);
    fs::create_dir_all(&out).map_err(BuiltinError::sys(quoted("creating directory", &out)))?;
    let pkgs = parse_derivations(attrs.get("derivations")?.as_bytes())?;
    build_profile(&out, pkgs, cx.warn)?;
    let manifest = attrs.get("manifest")?;
    create_symlink(Path::new(manifest), &out.join("manifest.nix"))
}

/// `derivations`: groups of `ACTIVE PRIORITY N PATH₁ … PATHₙ`, separated by white
/// space. A package is active unless ACTIVE is `false`; the numbers are read as
/// `std::stoi` reads them.
pub fn parse_derivations(s: &[u8]) -> Result<Vec<Package>, BuiltinError> {
    let mut tokens = s
        .split(|c| b" \t\n\r".contains(c))
        .filter(|t| !t.is_empty());
    let mut pkgs = Vec::new();
    while let Some(active) = tokens.next() {
        let priority = stoi(tokens.next().ok_or(BuiltinError::TruncatedDerivations)?)?;
        let outputs = stoi(tokens.next().ok_or(BuiltinError::TruncatedDerivations)?)?;
        for _ in 0..outputs.max(0) {
            let path = tokens.next().ok_or(BuiltinError::TruncatedDerivations)?;
            pkgs.push(Package {
                path: PathBuf::from(OsStr::from_bytes(path)),
                active: active != b"false",
                priority,
            });
        }
    }
    Ok(pkgs)
}

/// C++'s `std::stoi`: optional white space and sign, then decimal digits (at least
/// one; what follows them is ignored), in the range of an `int`.
fn stoi(s: &[u8]) -> Result<i32, BuiltinError> {
    let s = s
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .map_or(&[][..], |i| &s[i..]);
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 {
        return Err(BuiltinError::Stoi);
    }
    let mut v: i64 = 0;
    for &c in &digits[..n] {
        v = v * 10 + i64::from(c - b'0');
        if v > i64::from(i32::MAX) + 1 {
            return Err(BuiltinError::Stoi);
        }
    }
    let v = if neg { -v } else { v };
    i32::try_from(v).map_err(|_| BuiltinError::Stoi)
}

/// What the links made so far carry.
#[derive(Debug, Default)]
struct State {
    /// The priority of the package each link of the environment came from.
    priorities: BTreeMap<PathBuf, i32>,
    symlinks: u64,
}

/// Link the packages into `out`: the active ones by priority (then path), then, round
/// by round, the packages they propagate that are not in yet.
pub fn build_profile(
    out: &Path,
    mut pkgs: Vec<Package>,
    warn: &mut dyn FnMut(&str),
) -> Result<(), BuiltinError> {
    let mut state = State::default();
    let mut done: BTreeSet<PathBuf> = BTreeSet::new();
    let mut postponed: BTreeSet<PathBuf> = BTreeSet::new();

    let mut add_pkg = |pkg_dir: &Path,
                       priority: i32,
                       done: &mut BTreeSet<PathBuf>,
                       postponed: &mut BTreeSet<PathBuf>|
     -> Result<(), BuiltinError> {
        if !done.insert(pkg_dir.to_path_buf()) {
            return Ok(());
        }
        create_links(&mut state, pkg_dir, out, priority, warn)?;
        let file = pkg_dir.join("nix-support/propagated-user-env-packages");
        match fs::read(&file) {
            Ok(text) => {
                for p in text.split(|c| b" \n".contains(c)).filter(|t| !t.is_empty()) {
                    let p = PathBuf::from(OsString::from_vec(p.to_vec()));
                    if !done.contains(&p) {
                        postponed.insert(p);
                    }
                }
            }
            Err(e) if is_enoent_or_enotdir(&e) => {}
            Err(e) => return Err(BuiltinError::sys(quoted("opening file", &file))(e)),
        }
        Ok(())
    };

    pkgs.sort_by(|a, b| {
        (a.priority, a.path.as_os_str().as_bytes())
            .cmp(&(b.priority, b.path.as_os_str().as_bytes()))
    });
    for pkg in pkgs.iter().filter(|p| p.active) {
        add_pkg(&pkg.path, pkg.priority, &mut done, &mut postponed)?;
    }

    // Propagated packages come later, with lower priorities, so that they lose the
    // collisions. The counter moves on for every one, already added or not (Nix's).
    let mut priority_counter = FIRST_PROPAGATED_PRIORITY;
    while !postponed.is_empty() {
        let pkg_dirs = std::mem::take(&mut postponed);
        for pkg_dir in &pkg_dirs {
            let priority = priority_counter;
            priority_counter = priority_counter.saturating_add(1);
            add_pkg(pkg_dir, priority, &mut done, &mut postponed)?;
        }
    }
    Ok(())
}

fn is_enoent_or_enotdir(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::ENOENT || code == nix::libc::ENOTDIR
    )
}

/// The entries of `dir` in the order the directory gives them (Nix's
/// `readDirectory`).
fn read_directory(dir: &Path) -> Result<Vec<OsString>, io::Error> {
    fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect()
}

/// Link what `src_dir` holds into `dst_dir`, at `priority`.
fn create_links(
    state: &mut State,
    src_dir: &Path,
    dst_dir: &Path,
    priority: i32,
    warn: &mut dyn FnMut(&str),
) -> Result<(), BuiltinError> {
    let entries = match read_directory(src_dir) {
        Ok(entries) => entries,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
            warn(&format!(
                "not including '{}' in the user environment because it's not a directory",
                src_dir.display()
            ));
            return Ok(());
        }
        Err(e) => return Err(BuiltinError::sys(quoted("opening directory", src_dir))(e)),
    };
    for name in entries {
        if name.as_bytes().first() == Some(&b'.') {
            // Not matched by a glob.
            continue;
        }
        let src_file = src_dir.join(&name);
        let dst_file = dst_dir.join(&name);
        let src_st = match fs::metadata(&src_file) {
            Ok(st) => st,
            Err(e) if is_enoent_or_enotdir(&e) => {
                warn(&format!(
                    "skipping dangling symlink '{}'",
                    dst_file.display()
                ));
                continue;
            }
            Err(e) => return Err(BuiltinError::sys(quoted("getting status of", &src_file))(e)),
        };
        let src_bytes = src_file.as_os_str().as_bytes();
        if SKIPPED_SUFFIXES.iter().any(|s| src_bytes.ends_with(s)) {
            continue;
        }
        let dst_st = match fs::symlink_metadata(&dst_file) {
            Ok(st) => Some(st),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(BuiltinError::sys(quoted("getting status of", &dst_file))(e)),
        };
        if src_st.is_dir() {
            match &dst_st {
                Some(d) if d.is_dir() => {
                    create_links(state, &src_file, &dst_file, priority, warn)?;
                    continue;
                }
                Some(d) if d.file_type().is_symlink() => {
                    // A link to another package's directory becomes a directory of
                    // links to both.
                    let target = canon_path(&dst_file)?;
                    let target_st = fs::symlink_metadata(&target)
                        .map_err(BuiltinError::sys(quoted("getting status of", &target)))?;
                    if !target_st.is_dir() {
                        return Err(BuiltinError::DirOverFile {
                            src: src_file,
                            target,
                        });
                    }
                    fs::remove_file(&dst_file)
                        .map_err(BuiltinError::sys(quoted("unlinking", &dst_file)))?;
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&dst_file)
                        .map_err(BuiltinError::sys(quoted("creating directory", &dst_file)))?;
                    let old = state.priorities.get(&dst_file).copied().unwrap_or(0);
                    create_links(state, &target, &dst_file, old, warn)?;
                    create_links(state, &src_file, &dst_file, priority, warn)?;
                    continue;
                }
                _ => {}
            }
        } else if let Some(d) = &dst_st {
            if d.file_type().is_symlink() {
                let prev = state.priorities.get(&dst_file).copied().unwrap_or(0);
                if prev == priority {
                    let old = fs::read_link(&dst_file).map_err(BuiltinError::sys(quoted(
                        "reading symbolic link",
                        &dst_file,
                    )))?;
                    return Err(BuiltinError::SamePriority {
                        new: src_file,
                        old,
                        priority,
                    });
                }
                if prev < priority {
                    continue;
                }
                fs::remove_file(&dst_file)
                    .map_err(BuiltinError::sys(quoted("unlinking", &dst_file)))?;
            } else if d.is_dir() {
                return Err(BuiltinError::FileOverDir {
                    src: src_file,
                    dst: dst_file,
                });
            }
        }
        create_symlink(&src_file, &dst_file)?;
        state.priorities.insert(dst_file, priority);
        state.symlinks += 1;
    }
    Ok(())
}

/// `path` with every symlink resolved (Nix's `canonPath(path, true)`).
fn canon_path(path: &Path) -> Result<PathBuf, BuiltinError> {
    match fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) => {
            // Nix goes on with the unresolved rest and fails on its status.
            let target = fs::read_link(path).unwrap_or_else(|_| path.to_path_buf());
            Err(BuiltinError::sys(quoted("getting status of", &target))(e))
        }
    }
}

/// A symlink at `link` to `target` (Nix's `createSymlink` and its message).
fn create_symlink(target: &Path, link: &Path) -> Result<(), BuiltinError> {
    std::os::unix::fs::symlink(target, link).map_err(BuiltinError::sys(format!(
        "creating symlink from '{}' to '{}'",
        link.display(),
        target.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("firn-buildenv-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
        d
    }

    fn file(p: &Path, text: &str) {
        fs::create_dir_all(p.parent().unwrap_or(Path::new("/"))).unwrap_or_else(|e| panic!("{e}"));
        fs::write(p, text).unwrap_or_else(|e| panic!("{e}"));
    }

    fn link(p: &Path) -> PathBuf {
        fs::read_link(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn derivations_are_read_as_nix_reads_them() {
        let pkgs = parse_derivations(b"true 5 1 /a\n false -3 2 /b /c  1 7x 0").unwrap_or_default();
        assert_eq!(
            pkgs,
            [
                Package {
                    path: "/a".into(),
                    active: true,
                    priority: 5
                },
                Package {
                    path: "/b".into(),
                    active: false,
                    priority: -3
                },
                Package {
                    path: "/c".into(),
                    active: false,
                    priority: -3
                },
            ]
        );
        assert!(matches!(
            parse_derivations(b"true x 1 /a"),
            Err(BuiltinError::Stoi)
        ));
        assert!(matches!(
            parse_derivations(b"true 99999999999 1 /a"),
            Err(BuiltinError::Stoi)
        ));
        assert!(matches!(
            parse_derivations(b"true 5 2 /a"),
            Err(BuiltinError::TruncatedDerivations)
        ));
        assert_eq!(stoi(b"+12abc").ok(), Some(12));
        assert_eq!(stoi(b"-2147483648").ok(), Some(i32::MIN));
    }

    #[test]
    fn priorities_directories_and_propagation() {
        let d = tmp("tree");
        let (a, b, c, x) = (d.join("a"), d.join("b"), d.join("c"), d.join("x"));
        file(&a.join("bin/tool"), "a");
        file(&a.join("share/a/doc"), "a");
        file(&a.join(".hidden"), "");
        file(
            &a.join("nix-support/propagated-user-env-packages"),
            &format!("{}\n", c.display()),
        );
        file(&b.join("bin/tool"), "b");
        file(&b.join("bin/b"), "b");
        file(&b.join("log"), "skipped");
        file(&c.join("bin/tool"), "c");
        file(&c.join("bin/c"), "c");
        file(&x.join("lib/x/one"), "x");
        file(&c.join("lib/y/two"), "c");
        std::os::unix::fs::symlink(x.join("lib/x"), c.join("lib/x"))
            .unwrap_or_else(|e| panic!("{e}"));
        file(&b.join("lib/x/three"), "b");
        let out = d.join("out");
        fs::create_dir(&out).unwrap_or_else(|e| panic!("{e}"));
        let mut warnings = Vec::new();
        let pkgs = vec![
            Package {
                path: b.clone(),
                active: true,
                priority: 5,
            },
            Package {
                path: a.clone(),
                active: true,
                priority: 3,
            },
        ];
        build_profile(&out, pkgs, &mut |w| warnings.push(w.to_owned()))
            .unwrap_or_else(|e| panic!("{e}"));
        // a (3) beats b (5); c comes later at 1000 and loses to both.
        assert_eq!(link(&out.join("bin/tool")), a.join("bin/tool"));
        assert_eq!(link(&out.join("bin/b")), b.join("bin/b"));
        assert_eq!(link(&out.join("bin/c")), c.join("bin/c"));
        // A directory only one package has is one link.
        assert_eq!(link(&out.join("share")), a.join("share"));
        // b's lib/x and c's link to x's lib/x are merged into a directory; the links
        // go through the source's own path (only the existing link is resolved).
        assert_eq!(link(&out.join("lib/x/three")), b.join("lib/x/three"));
        assert_eq!(link(&out.join("lib/x/one")), c.join("lib/x/one"));
        assert_eq!(link(&out.join("lib/y")), c.join("lib/y"));
        assert!(!out.join(".hidden").exists() && !out.join("log").exists());
        assert!(!out.join("nix-support").exists());
        assert!(warnings.is_empty(), "{warnings:?}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn collisions_fail_as_in_nix() {
        let d = tmp("collide");
        let (a, b) = (d.join("a"), d.join("b"));
        file(&a.join("bin/tool"), "a");
        file(&b.join("bin/tool"), "b");
        file(&d.join("f"), "not a directory");
        let out = d.join("out");
        fs::create_dir(&out).unwrap_or_else(|e| panic!("{e}"));
        let mut warnings = Vec::new();
        let pkgs = vec![
            Package {
                path: a.clone(),
                active: true,
                priority: 5,
            },
            Package {
                path: b.clone(),
                active: true,
                priority: 5,
            },
            Package {
                path: d.join("f"),
                active: true,
                priority: 1,
            },
        ];
        let e = build_profile(&out, pkgs, &mut |w| warnings.push(w.to_owned()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            e,
            format!(
                "packages '{}' and '{}' have the same priority 5; use 'nix-env --set-flag priority NUMBER INSTALLED_PKGNAME' to change the priority of one of the conflicting packages (0 being the highest priority)",
                b.join("bin/tool").display(),
                a.join("bin/tool").display()
            )
        );
        assert_eq!(
            warnings,
            [format!(
                "not including '{}' in the user environment because it's not a directory",
                d.join("f").display()
            )]
        );
        let _ = fs::remove_dir_all(&d);
    }
}

//! The `builders` setting and machines files, in Nix 2.8's format (machines.cc).
//!
//! ```text
//! builders  = entry (("\n" | ";") entry)*
//! entry     = "@" FILE                      the entries of FILE (missing: none)
//!           | uri [systems [ssh-key [max-jobs [speed-factor [supported [mandatory
//!                 [host-key]]]]]]]          whitespace-separated; "-" or "" = default
//! "#" ends an entry (a comment); blank entries are skipped.
//! systems, supported, mandatory: comma lists (default: this system; none; none)
//! max-jobs, speed-factor: unsigned (default 1; a speed factor below 1 is 1)
//! host-key: base64 of the machine's public host key line
//! ```
//!
//! A URI without `://` or `/` that is not `auto`, `daemon`, `local` (or one of those
//! with `?…`, or `?…` alone) gets `ssh://` in front, as in Nix.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// How deep `@FILE` may include: Nix recurses without a bound (a file including itself
/// overflows its stack); firn stops and says so.
const MAX_INCLUDE_DEPTH: usize = 16;

/// One remote machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// The store URI, with `ssh://` added where Nix adds it.
    pub store_uri: String,
    pub systems: Vec<String>,
    /// Field 3: the private key ssh uses (`-i`).
    pub ssh_key: Option<String>,
    pub max_jobs: u32,
    pub speed_factor: u32,
    pub supported_features: BTreeSet<String>,
    pub mandatory_features: BTreeSet<String>,
    /// Field 8: base64 of the public host key (`ssh-ed25519 AAAA…`).
    pub public_host_key: Option<String>,
}

#[derive(Debug, Error)]
pub enum MachinesError {
    #[error(
        "bad machine specification: store URL was not found at the first column of a row: '{line}'"
    )]
    NoUri { line: String },
    #[error("bad machine specification: failed to convert column #{column} in a row: '{line}' to 'unsigned int'")]
    BadNumber { column: usize, line: String },
    #[error("bad machine specification: a column #{column} in a row: '{line}' is not valid base64 string")]
    BadBase64 { column: usize, line: String },
    #[error("cannot read machines file '{}': {}", path.display(), firn_store::error::strerror(source))]
    Read { path: PathBuf, source: io::Error },
    #[error("machines file '{}' is included more than {MAX_INCLUDE_DEPTH} levels deep (does it include itself?)", path.display())]
    TooDeep { path: PathBuf },
}

impl Machine {
    /// Every required feature is supported or mandatory here (`allSupported`).
    pub fn all_supported(&self, required: &BTreeSet<String>) -> bool {
        required
            .iter()
            .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
    }

    /// Every mandatory feature is required (`mandatoryMet`): a machine with mandatory
    /// features takes only the builds that ask for them.
    pub fn mandatory_met(&self, required: &BTreeSet<String>) -> bool {
        self.mandatory_features.iter().all(|f| required.contains(f))
    }

    /// Whether this machine can take a build for `system` requiring `required`
    /// (build-remote's "right type"; `builtin` builders run anywhere).
    pub fn fits(&self, system: &str, required: &BTreeSet<String>) -> bool {
        (system == "builtin" || self.systems.iter().any(|s| s == system))
            && self.all_supported(required)
            && self.mandatory_met(required)
    }
}

/// Parse `builders`; `read` reads an `@FILE` (a missing file is no machines, as in Nix).
pub fn parse_builders(
    spec: &str,
    this_system: &str,
    read: &mut dyn FnMut(&Path) -> io::Result<String>,
) -> Result<Vec<Machine>, MachinesError> {
    let mut lines = Vec::new();
    expand_lines(spec, read, 0, None, &mut lines)?;
    lines.iter().map(|l| parse_line(l, this_system)).collect()
}

/// [`parse_builders`] reading files from the file system.
pub fn read_builders(spec: &str, this_system: &str) -> Result<Vec<Machine>, MachinesError> {
    parse_builders(spec, this_system, &mut |p| std::fs::read_to_string(p))
}

fn expand_lines(
    text: &str,
    read: &mut dyn FnMut(&Path) -> io::Result<String>,
    depth: usize,
    from: Option<&Path>,
    out: &mut Vec<String>,
) -> Result<(), MachinesError> {
    if depth > MAX_INCLUDE_DEPTH {
        return Err(MachinesError::TooDeep {
            path: from.map(Path::to_path_buf).unwrap_or_default(),
        });
    }
    for line in text.split(['\n', ';']) {
        let line = line.trim();
        let line = match line.find('#') {
            Some(i) => &line[..i],
            None => line,
        };
        if line.is_empty() {
            continue;
        }
        if let Some(file) = line.strip_prefix('@') {
            let path = PathBuf::from(file.trim());
            let text = match read(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(MachinesError::Read { path, source }),
            };
            expand_lines(&text, read, depth + 1, Some(&path), out)?;
            continue;
        }
        out.push(line.to_owned());
    }
    Ok(())
}

fn parse_line(line: &str, this_system: &str) -> Result<Machine, MachinesError> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let set = |i: usize| {
        tokens
            .get(i)
            .copied()
            .filter(|t| !t.is_empty() && *t != "-")
    };
    let number = |i: usize| -> Result<u32, MachinesError> {
        match set(i) {
            None => Ok(1),
            Some(t) => t.parse::<u32>().map_err(|_| MachinesError::BadNumber {
                column: i,
                line: line.to_owned(),
            }),
        }
    };
    let list = |i: usize| -> BTreeSet<String> {
        set(i)
            .map(|t| {
                t.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let uri = set(0).ok_or_else(|| MachinesError::NoUri {
        line: line.to_owned(),
    })?;
    let public_host_key = match set(7) {
        None => None,
        Some(k) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .map_err(|_| MachinesError::BadBase64 {
                    column: 7,
                    line: line.to_owned(),
                })?;
            Some(k.to_owned())
        }
    };
    Ok(Machine {
        store_uri: with_scheme(uri),
        systems: match set(1) {
            Some(t) => t
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            None => vec![this_system.to_owned()],
        },
        ssh_key: set(2).map(str::to_owned),
        max_jobs: number(3)?,
        speed_factor: number(4)?.max(1),
        supported_features: list(5),
        mandatory_features: list(6),
        public_host_key,
    })
}

fn with_scheme(uri: &str) -> String {
    let special = ["auto", "daemon", "local"];
    let keep = uri.contains("://")
        || uri.contains('/')
        || special.contains(&uri)
        || special.iter().any(|s| uri.starts_with(&format!("{s}?")))
        || uri.starts_with('?');
    match keep {
        true => uri.to_owned(),
        false => format!("ssh://{uri}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(spec: &str) -> Result<Vec<Machine>, MachinesError> {
        parse_builders(spec, "x86_64-linux", &mut |p| {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                p.display().to_string(),
            ))
        })
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// The rows of Nix 2.8's tests/machines.valid and its unit tests, read as Nix reads
    /// them.
    #[test]
    fn every_field_is_read_as_nix_reads_it() {
        let m = parse(
            "nix@scratchy.labs.cs.uu.nl  i686-linux  /home/nix/.ssh/id_scratchy_auto  8 3 kvm,big-parallel benchmark SSH+PUBLIC+KEY",
        );
        // Not base64 padding-correct: refused, naming the column.
        assert!(matches!(m, Err(MachinesError::BadBase64 { column: 7, .. })));
        let m = parse(
            "nix@scratchy.labs.cs.uu.nl  i686-linux,x86_64-linux  /home/nix/.ssh/id_scratchy_auto  8 3 kvm,big-parallel benchmark c3NoLWVkMjU1MTkgQUFBQQ==",
        )
        .unwrap();
        assert_eq!(
            m,
            vec![Machine {
                store_uri: "ssh://nix@scratchy.labs.cs.uu.nl".into(),
                systems: vec!["i686-linux".into(), "x86_64-linux".into()],
                ssh_key: Some("/home/nix/.ssh/id_scratchy_auto".into()),
                max_jobs: 8,
                speed_factor: 3,
                supported_features: set(&["kvm", "big-parallel"]),
                mandatory_features: set(&["benchmark"]),
                public_host_key: Some("c3NoLWVkMjU1MTkgQUFBQQ==".into()),
            }]
        );
        // Defaults: this system, one job, speed 1, no features; "-" is a default too.
        let m = parse("ssh://a - - - 0 ; b # a comment\n\n  # only a comment\nlocal").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].store_uri, "ssh://a");
        assert_eq!(m[0].systems, vec!["x86_64-linux".to_owned()]);
        assert_eq!((m[0].max_jobs, m[0].speed_factor), (1, 1));
        assert_eq!(m[1].store_uri, "ssh://b");
        assert_eq!(m[2].store_uri, "local");
        for uri in ["/tmp/store", "daemon?x=1", "?root=/r", "unix:///s", "auto"] {
            assert_eq!(parse(uri).unwrap()[0].store_uri, uri);
        }
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_rows_are_refused_with_nix_s_words() {
        let e = parse("a x86_64-linux - many").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad machine specification: failed to convert column #3 in a row: 'a x86_64-linux - many' to 'unsigned int'"
        );
        assert!(matches!(
            parse("a x86_64-linux - 1 -2"),
            Err(MachinesError::BadNumber { column: 4, .. })
        ));
        assert!(matches!(
            parse("- x86_64-linux"),
            Err(MachinesError::NoUri { .. })
        ));
    }

    #[test]
    fn machines_files_are_included_and_a_missing_one_is_none() {
        let mut read = |p: &Path| -> io::Result<String> {
            match p.to_str().unwrap() {
                "/etc/m" => Ok("a\n@/etc/more\n@/missing".into()),
                "/etc/more" => Ok("b 4 ; c".into()),
                "/etc/loop" => Ok("@/etc/loop".into()),
                "/etc/bad" => Err(io::Error::from_raw_os_error(libc_eacces())),
                _ => Err(io::ErrorKind::NotFound.into()),
            }
        };
        let m = parse_builders("@/etc/m; d", "x86_64-linux", &mut read).unwrap();
        let uris: Vec<&str> = m.iter().map(|m| m.store_uri.as_str()).collect();
        assert_eq!(uris, ["ssh://a", "ssh://b", "ssh://c", "ssh://d"]);
        assert_eq!(m[1].systems, vec!["4".to_owned()]);
        assert!(matches!(
            parse_builders("@/etc/loop", "x86_64-linux", &mut read),
            Err(MachinesError::TooDeep { .. })
        ));
        assert!(matches!(
            parse_builders("@/etc/bad", "x86_64-linux", &mut read),
            Err(MachinesError::Read { .. })
        ));
    }

    fn libc_eacces() -> i32 {
        13
    }

    #[test]
    fn a_machine_fits_by_system_and_features() {
        let m = parse("a x86_64-linux,aarch64-linux - 1 1 kvm,big benchmark").unwrap();
        let m = &m[0];
        assert!(m.fits("aarch64-linux", &set(&["benchmark"])));
        assert!(m.fits("builtin", &set(&["benchmark", "kvm"])));
        // Its mandatory feature is not asked for.
        assert!(!m.fits("x86_64-linux", &set(&["kvm"])));
        // A feature it lacks.
        assert!(!m.fits("x86_64-linux", &set(&["benchmark", "gpu"])));
        assert!(!m.fits("i686-linux", &set(&["benchmark"])));
    }
}

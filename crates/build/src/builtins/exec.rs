//! How a builtin builder is started: firn's own binary, `firn __builtin NAME`, with the
//! build's environment, working directory and user, like any builder.
//!
//! In the sandbox the binary is not there, nor the shared libraries it was linked
//! with, so the plan binds them read-only into the root, only for builtin builders:
//! the binary at [`SANDBOX_EXE`], and every shared library this process has mapped
//! (`/proc/self/maps`) at `BUILTIN_DIR/lib/<soname>`. The program run is then the
//! dynamic loader itself (the mapping that holds `AT_BASE` of `/proc/self/auxv`),
//! told to look there and nowhere else (`--library-path`): no `ld.so.cache`, no host
//! library directory, no `LD_LIBRARY_PATH` of the derivation's is needed or used. A
//! static binary (no loader) is run directly.
//!
//! [`Runner::detect`] reads `/proc`; [`Runner::plan`] and the parsers are pure.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The hidden command of the `firn` binary that runs a builtin.
pub const SUBCOMMAND: &str = "__builtin";
/// Where the binary and its libraries are inside the sandbox.
pub const BUILTIN_DIR: &str = "/.firn-builtin";
/// The binary inside the sandbox.
pub const SANDBOX_EXE: &str = "/.firn-builtin/firn";
/// The libraries inside the sandbox.
pub const SANDBOX_LIB_DIR: &str = "/.firn-builtin/lib";

/// `AT_BASE`: the address the program interpreter was loaded at.
const AT_BASE: u64 = 7;

/// What runs builtins: a binary and the shared libraries it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    /// The binary (firn's own).
    pub exe: PathBuf,
    /// The shared libraries, (host path, soname), in the order first mapped.
    pub libs: Vec<(PathBuf, String)>,
    /// The soname of the dynamic loader among `libs`, if the binary has one.
    pub interpreter: Option<String>,
}

/// How to start one builtin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinExec {
    /// The program to exec.
    pub program: PathBuf,
    /// Its arguments, `argv[0]` first.
    pub argv: Vec<OsString>,
    /// Read-only binds into the sandbox: (target inside, source on the host); empty
    /// outside it.
    pub binds: Vec<(PathBuf, PathBuf)>,
}

impl Runner {
    /// This process's binary (`exe`, else `/proc/self/exe`'s target) and libraries.
    /// Read once per process.
    pub fn current(exe: Option<&Path>) -> Result<Runner, String> {
        static CURRENT: OnceLock<Result<Runner, String>> = OnceLock::new();
        match exe {
            Some(exe) => Self::detect(exe.to_path_buf()).map_err(|e| e.to_string()),
            None => CURRENT
                .get_or_init(|| {
                    let exe = current_exe().map_err(|e| format!("finding firn's binary: {e}"))?;
                    Self::detect(exe).map_err(|e| format!("finding firn's libraries: {e}"))
                })
                .clone(),
        }
    }

    /// `exe` with the libraries this process has mapped.
    pub fn detect(exe: PathBuf) -> io::Result<Runner> {
        let maps = fs::read_to_string("/proc/self/maps")?;
        let auxv = fs::read("/proc/self/auxv")?;
        let exe_real = fs::canonicalize(&exe).unwrap_or_else(|_| exe.clone());
        let mappings = parse_maps(&maps);
        let interp_path = parse_auxv(&auxv, AT_BASE)
            .filter(|&base| base != 0)
            .and_then(|base| {
                mappings
                    .iter()
                    .find(|m| m.start <= base && base < m.end)
                    .map(|m| m.path.clone())
            });
        let mut libs: Vec<(PathBuf, String)> = Vec::new();
        let mut interpreter = None;
        for m in &mappings {
            if m.path == exe_real || libs.iter().any(|(p, _)| *p == m.path) {
                continue;
            }
            if !looks_like_library(&m.path) {
                continue;
            }
            let soname = fs::read(&m.path)
                .ok()
                .and_then(|bytes| elf_soname(&bytes))
                .unwrap_or_else(|| base_name(&m.path));
            if Some(&m.path) == interp_path.as_ref() {
                interpreter = Some(soname.clone());
            }
            if libs.iter().all(|(_, s)| *s != soname) {
                libs.push((m.path.clone(), soname));
            }
        }
        Ok(Runner {
            exe,
            libs,
            interpreter,
        })
    }

    /// How to start builtin `name`, in the sandbox or not.
    pub fn plan(&self, name: &str, sandboxed: bool) -> BuiltinExec {
        if !sandboxed {
            return BuiltinExec {
                program: self.exe.clone(),
                argv: vec![
                    self.exe.clone().into_os_string(),
                    SUBCOMMAND.into(),
                    name.into(),
                ],
                binds: Vec::new(),
            };
        }
        let lib_dir = Path::new(SANDBOX_LIB_DIR);
        let mut binds = vec![(PathBuf::from(SANDBOX_EXE), self.exe.clone())];
        binds.extend(
            self.libs
                .iter()
                .map(|(path, soname)| (lib_dir.join(soname), path.clone())),
        );
        let (program, argv) = match &self.interpreter {
            Some(interp) => {
                let program = lib_dir.join(interp);
                let argv = vec![
                    program.clone().into_os_string(),
                    "--library-path".into(),
                    SANDBOX_LIB_DIR.into(),
                    SANDBOX_EXE.into(),
                    SUBCOMMAND.into(),
                    name.into(),
                ];
                (program, argv)
            }
            None => (
                PathBuf::from(SANDBOX_EXE),
                vec![SANDBOX_EXE.into(), SUBCOMMAND.into(), name.into()],
            ),
        };
        BuiltinExec {
            program,
            argv,
            binds,
        }
    }
}

/// The running binary: `/proc/self/exe`'s target, or `/proc/self/exe` itself when
/// that file was replaced since firn started (its target then ends in ` (deleted)`).
fn current_exe() -> io::Result<PathBuf> {
    let exe = fs::read_link("/proc/self/exe")?;
    match exe.as_os_str().as_bytes().ends_with(b" (deleted)") {
        true => Ok(PathBuf::from("/proc/self/exe")),
        false => Ok(exe),
    }
}

fn base_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A mapped file that is a shared library (`NAME.so` or `NAME.so.N…`), not data such
/// as locale archives.
fn looks_like_library(p: &Path) -> bool {
    let name = base_name(p);
    name.ends_with(".so") || name.contains(".so.")
}

/// One file mapping of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub path: PathBuf,
}

/// The file mappings of a `/proc/PID/maps` text (`start-end perms offset dev inode
/// path`), in order; anonymous and pseudo mappings (`[heap]`), deleted files and
/// paths that are not absolute are left out.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let _perms = fields.next()?;
            let _offset = fields.next()?;
            let _dev = fields.next()?;
            let _inode = fields.next()?;
            let path = fields.next()?.trim_start();
            if !path.starts_with('/') || path.ends_with(" (deleted)") {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                path: PathBuf::from(path),
            })
        })
        .collect()
}

/// The value of `key` in a 64-bit `/proc/PID/auxv` (pairs of native-endian words up
/// to `AT_NULL`).
pub fn parse_auxv(bytes: &[u8], key: u64) -> Option<u64> {
    bytes
        .chunks_exact(16)
        .map(|pair| {
            let word = |b: &[u8]| b.try_into().ok().map(u64::from_ne_bytes);
            (word(&pair[..8]), word(&pair[8..]))
        })
        .take_while(|(k, _)| *k != Some(0))
        .find(|(k, _)| *k == Some(key))
        .and_then(|(_, v)| v)
}

/// The `DT_SONAME` of a little-endian ELF64 shared object: the `SHT_DYNAMIC` section's
/// entry, read in the string table its `sh_link` names.
pub fn elf_soname(elf: &[u8]) -> Option<String> {
    const SHT_DYNAMIC: u32 = 6;
    const DT_NULL: u64 = 0;
    const DT_SONAME: u64 = 14;
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let u16_at = |off: usize| -> Option<u16> {
        Some(u16::from_le_bytes(elf.get(off..off + 2)?.try_into().ok()?))
    };
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_le_bytes(elf.get(off..off + 4)?.try_into().ok()?))
    };
    let u64_at = |off: usize| -> Option<u64> {
        Some(u64::from_le_bytes(elf.get(off..off + 8)?.try_into().ok()?))
    };
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    if shentsize < 0x40 {
        return None;
    }
    let section = |i: usize| -> Option<(u32, usize, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(base + 4)?,
            usize::try_from(u64_at(base + 0x18)?).ok()?,
            usize::try_from(u64_at(base + 0x20)?).ok()?,
            usize::try_from(u32_at(base + 0x28)?).ok()?,
        ))
    };
    let (dyn_off, dyn_size, link) = (0..shnum).find_map(|i| {
        let (ty, off, size, link) = section(i)?;
        (ty == SHT_DYNAMIC).then_some((off, size, link))
    })?;
    let (_, str_off, str_size, _) = section(link)?;
    let strtab = elf.get(str_off..str_off.checked_add(str_size)?)?;
    let dynamic = elf.get(dyn_off..dyn_off.checked_add(dyn_size)?)?;
    for entry in dynamic.chunks_exact(16) {
        let tag = u64::from_le_bytes(entry[..8].try_into().ok()?);
        let val = usize::try_from(u64::from_le_bytes(entry[8..].try_into().ok()?)).ok()?;
        match tag {
            DT_NULL => return None,
            DT_SONAME => {
                let s = strtab.get(val..)?;
                let end = s.iter().position(|&c| c == 0)?;
                return String::from_utf8(s[..end].to_vec()).ok();
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a50000 r--p 00000000 08:01 1234                       /opt/firn/bin/firn
7f1e2c000000-7f1e2c028000 r--p 00000000 08:01 42                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f1e2c100000-7f1e2c104000 r-xp 00000000 08:01 43                         /usr/lib/x86_64-linux-gnu/liblzma.so.5.4.1
7f1e2c200000-7f1e2c201000 rw-p 00000000 00:00 0                          [heap]
7f1e2c300000-7f1e2c301000 rw-p 00000000 00:00 0 
7f1e2c400000-7f1e2c401000 r--p 00000000 08:01 44                         /tmp/old.so (deleted)
7f1e2c500000-7f1e2c52a000 r--p 00000000 08:01 45                         /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
";

    #[test]
    fn maps_are_parsed() {
        let m = parse_maps(MAPS);
        let paths: Vec<_> = m.iter().map(|m| m.path.to_str().unwrap_or("")).collect();
        assert_eq!(
            paths,
            [
                "/opt/firn/bin/firn",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/usr/lib/x86_64-linux-gnu/liblzma.so.5.4.1",
                "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
            ]
        );
        assert_eq!(m[3].start, 0x7f1e2c500000);
        assert_eq!(m[3].end, 0x7f1e2c52a000);
    }

    #[test]
    fn auxv_is_parsed() {
        let mut v = Vec::new();
        for (k, val) in [(33u64, 0x1000u64), (AT_BASE, 0x7f00), (0, 0), (AT_BASE, 1)] {
            v.extend(k.to_ne_bytes());
            v.extend(val.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&v, AT_BASE), Some(0x7f00));
        assert_eq!(parse_auxv(&v, 99), None);
    }

    #[test]
    fn sonames_of_real_libraries() {
        // This test binary's own libraries: liblzma's file is liblzma.so.5.x.y, its
        // soname (what the loader looks for) liblzma.so.5.
        let r = Runner::detect(PathBuf::from("/proc/self/exe")).unwrap_or_else(|e| panic!("{e}"));
        let libc = r.libs.iter().find(|(_, s)| s == "libc.so.6");
        assert!(libc.is_some(), "{r:?}");
        assert!(
            r.interpreter
                .as_deref()
                .is_some_and(|i| i.starts_with("ld-")),
            "{r:?}"
        );
        assert!(elf_soname(b"not an elf").is_none());
    }

    #[test]
    fn the_sandbox_runs_the_loader_on_the_bound_binary() {
        let r = Runner {
            exe: PathBuf::from("/opt/firn/bin/firn"),
            libs: vec![
                (
                    PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                    "libc.so.6".into(),
                ),
                (
                    PathBuf::from("/usr/lib/x86_64-linux-gnu/liblzma.so.5.4.1"),
                    "liblzma.so.5".into(),
                ),
                (
                    PathBuf::from("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
                    "ld-linux-x86-64.so.2".into(),
                ),
            ],
            interpreter: Some("ld-linux-x86-64.so.2".into()),
        };
        let e = r.plan("buildenv", true);
        assert_eq!(
            e.program,
            Path::new("/.firn-builtin/lib/ld-linux-x86-64.so.2")
        );
        assert_eq!(
            e.argv,
            [
                "/.firn-builtin/lib/ld-linux-x86-64.so.2",
                "--library-path",
                "/.firn-builtin/lib",
                "/.firn-builtin/firn",
                "__builtin",
                "buildenv"
            ]
            .map(OsString::from)
        );
        assert!(e.binds.contains(&(
            PathBuf::from("/.firn-builtin/lib/liblzma.so.5"),
            PathBuf::from("/usr/lib/x86_64-linux-gnu/liblzma.so.5.4.1")
        )));
        assert_eq!(
            e.binds[0],
            (
                PathBuf::from("/.firn-builtin/firn"),
                PathBuf::from("/opt/firn/bin/firn")
            )
        );
        let u = r.plan("fetchurl", false);
        assert_eq!(u.program, Path::new("/opt/firn/bin/firn"));
        assert_eq!(
            u.argv,
            ["/opt/firn/bin/firn", "__builtin", "fetchurl"].map(OsString::from)
        );
        assert!(u.binds.is_empty());
        let s = Runner {
            interpreter: None,
            libs: vec![],
            ..r
        };
        assert_eq!(
            s.plan("x", true).argv,
            ["/.firn-builtin/firn", "__builtin", "x"].map(OsString::from)
        );
    }
}

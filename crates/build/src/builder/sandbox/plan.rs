//! What a sandboxed build's root should look like: a pure plan, computed without I/O,
//! that the executor carries out inside fresh user, mount, PID, IPC, UTS and network
//! namespaces.
//!
//! Inside, the builder is uid [`SANDBOX_UID`] (1000) and gid [`SANDBOX_GID`] (100), as in
//! Nix 2.8; the user namespace maps them to the build user (or, for a non-root caller, to
//! the caller).
//!
//! The root is `ROOT/nix/store/<drv>.chroot` (Nix 2.8's place for it: on the store's
//! file system, so outputs move into the store with a rename). It holds `/tmp` (1777),
//! `/etc/{passwd,group,hosts}`, `/nix/store` (1775, writable by the build user) with the
//! input closure bind-mounted **read-only** (Nix mounts inputs writable, #3633), `/build`
//! (the build directory), `/dev` with the usual device nodes, a fresh `/proc`, a tmpfs
//! on `/dev/shm`, a new devpts, and the `sandbox-paths`. Fixed-output derivations keep
//! the host network and get `/etc/resolv.conf`, `/etc/services` and `/etc/hosts` from
//! the host, as in Nix.

use std::path::{Path, PathBuf};

use firn_derivation::StorePath;

/// One bind mount into the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path.
    pub source: PathBuf,
    /// Path inside the root (absolute, as the builder sees it).
    pub target: PathBuf,
    pub read_only: bool,
    /// Skip silently if the source does not exist (`sandbox-paths` entries ending `?`,
    /// and the host's `/etc` files for fixed-output builds).
    pub optional: bool,
    /// A store input: if it is not a directory it may be hard-linked into the root
    /// instead of mounted, as Nix 2.8 does (`linkOrCopy`); a link costs no new inode
    /// and no mount.
    pub store_input: bool,
}

/// The builder's uid inside the sandbox (Nix's `sandboxUid`).
pub const SANDBOX_UID: u32 = 1000;
/// The builder's gid inside the sandbox (Nix's `sandboxGid`).
pub const SANDBOX_GID: u32 = 100;

/// How a sensitive `/proc` entry is hidden from the builder (as OCI runtimes do; Nix
/// 2.8 shows the whole of `/proc`, #4327). Paths are inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcMask {
    /// A file replaced by `/dev/null` (reads as empty).
    File(PathBuf),
    /// A directory covered by an empty read-only tmpfs.
    Dir(PathBuf),
    /// A directory or file made read-only.
    ReadOnly(PathBuf),
}

/// The `/proc` entries masked: kernel memory, keys, timers and scheduler internals,
/// hardware trees; and the knobs under `/proc/sys`, `/proc/sysrq-trigger`, `/proc/irq`,
/// `/proc/bus`, `/proc/fs` read-only. Entries the kernel lacks are skipped.
pub fn proc_masks() -> Vec<ProcMask> {
    let p = |s: &str| PathBuf::from("/proc").join(s);
    let mut m: Vec<ProcMask> = [
        "kcore",
        "keys",
        "key-users",
        "kallsyms",
        "latency_stats",
        "timer_list",
        "timer_stats",
        "sched_debug",
    ]
    .iter()
    .map(|f| ProcMask::File(p(f)))
    .collect();
    m.extend(
        ["acpi", "asound", "scsi"]
            .iter()
            .map(|d| ProcMask::Dir(p(d))),
    );
    m.extend(
        ["sys", "sysrq-trigger", "irq", "bus", "fs"]
            .iter()
            .map(|d| ProcMask::ReadOnly(p(d))),
    );
    m
}

/// The layout of a sandboxed build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPlan {
    /// The root on the host.
    pub root: PathBuf,
    /// Directories to create inside the root, with modes.
    pub dirs: Vec<(PathBuf, u32)>,
    /// Files to write inside the root.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// Symlinks inside the root: (link, target).
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    pub binds: Vec<Bind>,
    /// A private network namespace with only `lo` (all but fixed-output builds).
    pub private_network: bool,
    /// Where the build directory is inside.
    pub build_dir: PathBuf,
    /// `/proc` entries hidden or made read-only after `/proc` is mounted.
    pub proc_masks: Vec<ProcMask>,
    /// The store directory inside (the logical one: `/nix/store`, `NIX_STORE_DIR`).
    pub store_dir: PathBuf,
}

/// Inputs to [`plan_sandbox`].
#[derive(Debug)]
pub struct SandboxInput<'a> {
    /// The store's real directory (`ROOT/nix/store`, or the logical one).
    pub real_store: &'a Path,
    /// The logical store directory (`/nix/store`, `NIX_STORE_DIR`).
    pub store_dir: &'a str,
    pub drv_path: &'a StorePath,
    /// The closure of the inputs.
    pub inputs: &'a [StorePath],
    /// The real build directory.
    pub build_dir: &'a Path,
    /// `sandbox-paths`: (target, source, optional).
    pub sandbox_paths: &'a [(PathBuf, PathBuf, bool)],
    pub fixed_output: bool,
    /// Whether the host has `/dev/kvm` (Nix binds it when the `kvm` system feature is
    /// on, which it is by default where `/dev/kvm` exists).
    pub kvm: bool,
}

/// The device nodes bound from the host.
pub const DEVICES: [&str; 6] = ["full", "null", "random", "tty", "urandom", "zero"];

/// Plan the root of a sandboxed build.
pub fn plan_sandbox(input: &SandboxInput<'_>) -> SandboxPlan {
    let root = input
        .real_store
        .join(format!("{}.chroot", input.drv_path.base_name()));
    let store = PathBuf::from(input.store_dir);
    let mut dirs = vec![
        (PathBuf::from("/tmp"), 0o1777),
        (PathBuf::from("/etc"), 0o755),
        (PathBuf::from("/build"), 0o700),
        (PathBuf::from("/dev"), 0o755),
        (PathBuf::from("/dev/shm"), 0o1777),
        (PathBuf::from("/dev/pts"), 0o755),
        (PathBuf::from("/proc"), 0o555),
    ];
    // Every ancestor of the store dir not made above (a store dir under `/tmp` keeps
    // its 1777, as Nix's `createDirs` leaves it), then the store dir itself (1775 like
    // Nix).
    let mut anc: Vec<PathBuf> = store
        .ancestors()
        .skip(1)
        .filter(|p| *p != Path::new("/") && !dirs.iter().any(|(d, _)| d == p))
        .map(Path::to_path_buf)
        .collect();
    anc.reverse();
    dirs.extend(anc.into_iter().map(|p| (p, 0o755)));
    dirs.push((store.clone(), 0o1775));

    let mut files = vec![
        (
            PathBuf::from("/etc/passwd"),
            format!(
                "root:x:0:0:Nix build user:/build:/noshell\nnixbld:x:{}:{}:Nix build user:/build:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n",
                SANDBOX_UID, SANDBOX_GID
            )
            .into_bytes(),
        ),
        (
            PathBuf::from("/etc/group"),
            format!("root:x:0:\nnixbld:!:{SANDBOX_GID}:\nnogroup:x:65534:\n").into_bytes(),
        ),
    ];
    let mut binds = Vec::new();
    if input.fixed_output {
        files.push((
            PathBuf::from("/etc/nsswitch.conf"),
            b"hosts: files dns\nservices: files\n".to_vec(),
        ));
        for f in ["/etc/resolv.conf", "/etc/services", "/etc/hosts"] {
            binds.push(Bind {
                source: PathBuf::from(f),
                target: PathBuf::from(f),
                read_only: true,
                optional: true,
                store_input: false,
            });
        }
    } else {
        files.push((
            PathBuf::from("/etc/hosts"),
            b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        ));
    }
    let kvm = input.kvm.then_some("kvm");
    for d in DEVICES.into_iter().chain(kvm) {
        binds.push(Bind {
            source: PathBuf::from("/dev").join(d),
            target: PathBuf::from("/dev").join(d),
            read_only: false,
            optional: d == "tty" || d == "kvm",
            store_input: false,
        });
    }
    for p in input.inputs {
        binds.push(Bind {
            source: input.real_store.join(p.base_name()),
            target: store.join(p.base_name()),
            read_only: true,
            optional: false,
            store_input: true,
        });
    }
    binds.push(Bind {
        source: input.build_dir.to_path_buf(),
        target: PathBuf::from("/build"),
        read_only: false,
        optional: false,
        store_input: false,
    });
    for (target, source, optional) in input.sandbox_paths {
        binds.push(Bind {
            source: source.clone(),
            target: target.clone(),
            read_only: true,
            optional: *optional,
            store_input: false,
        });
    }
    let symlinks = vec![
        (PathBuf::from("/dev/fd"), PathBuf::from("/proc/self/fd")),
        (
            PathBuf::from("/dev/stdin"),
            PathBuf::from("/proc/self/fd/0"),
        ),
        (
            PathBuf::from("/dev/stdout"),
            PathBuf::from("/proc/self/fd/1"),
        ),
        (
            PathBuf::from("/dev/stderr"),
            PathBuf::from("/proc/self/fd/2"),
        ),
        (PathBuf::from("/dev/ptmx"), PathBuf::from("/dev/pts/ptmx")),
    ];
    SandboxPlan {
        root,
        dirs,
        files,
        symlinks,
        binds,
        private_network: !input.fixed_output,
        build_dir: PathBuf::from("/build"),
        proc_masks: proc_masks(),
        store_dir: store,
    }
}

/// Parse `sandbox-paths`: space-separated `target=source` or `path`, `?` at the end
/// making an entry optional.
pub fn parse_sandbox_paths(s: &str) -> Vec<(PathBuf, PathBuf, bool)> {
    s.split_whitespace()
        .map(|e| {
            let (e, optional) = match e.strip_suffix('?') {
                Some(x) => (x, true),
                None => (e, false),
            };
            match e.split_once('=') {
                Some((t, s)) => (PathBuf::from(t), PathBuf::from(s), optional),
                None => (PathBuf::from(e), PathBuf::from(e), optional),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use firn_derivation::StoreDir;

    #[test]
    fn store_dir_elsewhere_from_the_environment() {
        // NIX_STORE_DIR=/tmp/t/store: the real store is the logical one, and the root's
        // `/tmp` keeps 1777 although it is also an ancestor of the store dir.
        let sd = StoreDir::new("/tmp/t/store").unwrap();
        let drv = sd
            .parse("/tmp/t/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-x.drv")
            .unwrap();
        let dep = sd
            .parse("/tmp/t/store/0hk42s8j7kqg82l6ncz33d8xx332vz9f-dep")
            .unwrap();
        let p = plan_sandbox(&SandboxInput {
            real_store: Path::new("/tmp/t/store"),
            store_dir: "/tmp/t/store",
            drv_path: &drv,
            inputs: std::slice::from_ref(&dep),
            build_dir: Path::new("/tmp/nix-build-x.drv-0"),
            sandbox_paths: &[],
            fixed_output: false,
            kvm: false,
        });
        assert_eq!(
            p.root,
            Path::new("/tmp/t/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-x.drv.chroot")
        );
        let modes: Vec<_> = p
            .dirs
            .iter()
            .filter(|(d, _)| d.starts_with("/tmp"))
            .collect();
        assert_eq!(
            modes,
            [
                &(PathBuf::from("/tmp"), 0o1777),
                &(PathBuf::from("/tmp/t"), 0o755),
                &(PathBuf::from("/tmp/t/store"), 0o1775)
            ]
        );
        assert_eq!(p.store_dir, Path::new("/tmp/t/store"));
        assert!(p.binds.iter().any(|b| b.source
            == Path::new("/tmp/t/store/0hk42s8j7kqg82l6ncz33d8xx332vz9f-dep")
            && b.target == b.source));
    }

    #[test]
    fn layout() {
        let sd = StoreDir::default();
        let drv = sd
            .parse("/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-x.drv")
            .unwrap();
        let dep = sd
            .parse("/nix/store/0hk42s8j7kqg82l6ncz33d8xx332vz9f-dep")
            .unwrap();
        let paths = parse_sandbox_paths("/bin/sh=/bin/busybox /opt/x?");
        assert_eq!(
            paths[0],
            (
                PathBuf::from("/bin/sh"),
                PathBuf::from("/bin/busybox"),
                false
            )
        );
        assert_eq!(
            paths[1],
            (PathBuf::from("/opt/x"), PathBuf::from("/opt/x"), true)
        );
        let p = plan_sandbox(&SandboxInput {
            real_store: Path::new("/r/nix/store"),
            store_dir: "/nix/store",
            drv_path: &drv,
            inputs: std::slice::from_ref(&dep),
            build_dir: Path::new("/tmp/nix-build-x.drv-0"),
            sandbox_paths: &paths,
            fixed_output: false,
            kvm: true,
        });
        assert_eq!(
            p.root,
            PathBuf::from("/r/nix/store/qhk42s8j7kqg82l6ncz33d8xx332vz9f-x.drv.chroot")
        );
        assert!(p.private_network);
        let dep_bind = p
            .binds
            .iter()
            .find(|b| b.target == Path::new("/nix/store/0hk42s8j7kqg82l6ncz33d8xx332vz9f-dep"))
            .unwrap();
        assert!(dep_bind.read_only, "inputs are read-only");
        assert!(p.dirs.contains(&(PathBuf::from("/nix/store"), 0o1775)));
        assert!(p
            .files
            .iter()
            .any(|(f, c)| f == Path::new("/etc/hosts") && c.starts_with(b"127.0.0.1 localhost")));
        // A fixed-output build keeps the network and gets the host's resolver files.
        let f = plan_sandbox(&SandboxInput {
            fixed_output: true,
            ..SandboxInput {
                real_store: Path::new("/r/nix/store"),
                store_dir: "/nix/store",
                drv_path: &drv,
                inputs: &[],
                build_dir: Path::new("/tmp/b"),
                sandbox_paths: &[],
                fixed_output: false,
                kvm: false,
            }
        });
        assert!(!f.private_network);
        assert!(!f.binds.iter().any(|b| b.target == Path::new("/dev/kvm")));
        assert!(p
            .binds
            .iter()
            .any(|b| b.target == Path::new("/dev/kvm") && b.optional));
        // The builder's identity is Nix's, whatever the build user's uid outside.
        let passwd = &p
            .files
            .iter()
            .find(|(f, _)| f == Path::new("/etc/passwd"))
            .unwrap()
            .1;
        assert!(String::from_utf8_lossy(passwd).contains("nixbld:x:1000:100:"));
        assert!(p
            .proc_masks
            .contains(&ProcMask::ReadOnly(PathBuf::from("/proc/sys"))));
        assert!(p
            .proc_masks
            .contains(&ProcMask::File(PathBuf::from("/proc/kcore"))));
        assert!(f
            .binds
            .iter()
            .any(|b| b.source == Path::new("/etc/resolv.conf") && b.optional));
    }
}

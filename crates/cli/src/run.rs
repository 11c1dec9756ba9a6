//! `firn run` and `firn shell`: a command that sees the store's `/nix`.
//!
//! An ordinary user's store is `~/.local/share/firn/root`, whose outputs are printed as
//! `/nix/store/…`, a path that does not exist on the host. As nix-user-chroot and
//! nix-portable do, `firn run CMD…` runs CMD in a new user and mount namespace (the
//! caller mapped to itself, `setgroups` denied) whose root is a tmpfs holding a bind
//! mount of every top-level host directory but `/nix`, and `ROOT/nix` at `/nix`:
//!
//! 1. unshare the user and mount namespaces, write the id maps, make every mount
//!    private (nothing done here reaches the host);
//! 2. mount a tmpfs on `ROOT` itself (any directory would do: this one is the user's
//!    and the mount is seen only in the new namespace) and `pivot_root` into it, the old
//!    root going to `/.firn-old-root` (so `ROOT`, which the tmpfs covered, is visible
//!    again under the old root);
//! 3. for each entry of the old root but `nix`: a directory is bind-mounted
//!    (recursively, so `/proc`, `/dev`, … come with their sub-mounts), a symlink is made
//!    again (`/bin -> usr/bin`), a file is bind-mounted on an empty file; `ROOT/nix` is
//!    bind-mounted at `/nix`;
//! 4. detach the old root, make the tmpfs read-only, go back to the caller's directory
//!    and `execvp` CMD: its exit status is firn's.
//!
//! Root runs CMD directly against the real `/nix`; with `--store ROOT`, the same way as
//! above in a new mount namespace only. Every mount lives in the namespace and goes when
//! its last process does: the host is left as it was.

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use clap::Args;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::error::CliError;
use crate::settings::Settings;

/// `firn run [--] CMD [ARG…]`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The command and its arguments (searched in `PATH`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<OsString>,
}

/// Where the old root is while the new one is put together.
const OLD_ROOT: &str = "/.firn-old-root";

/// `firn shell`: `$SHELL` (default `/bin/sh`) as [`run`] runs a command.
pub fn shell(settings: &Settings) -> Result<(), CliError> {
    let shell = std::env::var_os("SHELL")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| OsString::from("/bin/sh"));
    run(settings, &[shell])
}

/// Run `command` with the store's `/nix` at `/nix`; returns only on failure (on
/// success the process is the command).
pub fn run(settings: &Settings, command: &[OsString]) -> Result<(), CliError> {
    let Some(program) = command.first() else {
        return Err(CliError::usage("firn run needs a command"));
    };
    let argv = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CliError::usage("a command argument contains a NUL byte"))?;
    let Some(root) = settings.chroot_root() else {
        return Err(CliError::usage(
            "firn run needs a store in Nix's layout at /nix/store (not one relocated with NIX_STORE_DIR)",
        ));
    };
    let is_root = nix::unistd::Uid::effective().is_root();
    if !(is_root && root == Path::new("/")) {
        // The layout exists, and is this user's (or the error says whose it is).
        drop(crate::store_cmds::open(settings)?);
        enter_store(&root, !is_root)?;
    }
    let e = nix::unistd::execvp(&argv[0], &argv).unwrap_err();
    Err(CliError::Exec {
        program: program.to_string_lossy().into_owned(),
        source: e.into(),
    })
}

fn ns_err(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> CliError {
    let what = what.into();
    move |e| CliError::Namespace {
        what,
        source: e.into(),
    }
}

fn io_ns_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CliError {
    let what = what.into();
    move |source| CliError::Namespace { what, source }
}

/// Steps 1 to 4 of the module's description; `user_ns`: in a new user namespace too.
fn enter_store(root: &Path, user_ns: bool) -> Result<(), CliError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let store_nix = root.join("nix");
    if user_ns {
        let uid = nix::unistd::Uid::effective();
        let gid = nix::unistd::Gid::effective();
        unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
            .map_err(ns_err("creating a user and mount namespace"))?;
        for (file, text) in [
            ("/proc/self/setgroups", "deny".to_owned()),
            ("/proc/self/uid_map", format!("{uid} {uid} 1")),
            ("/proc/self/gid_map", format!("{gid} {gid} 1")),
        ] {
            fs::write(file, text).map_err(io_ns_err(format!("writing '{file}'")))?;
        }
    } else {
        unshare(CloneFlags::CLONE_NEWNS).map_err(ns_err("creating a mount namespace"))?;
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(ns_err("making the mounts private"))?;

    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(ns_err(format!("mounting a tmpfs on '{}'", root.display())))?;
    let put_old = root.join(OLD_ROOT.trim_start_matches('/'));
    fs::create_dir(&put_old).map_err(io_ns_err(format!("creating '{}'", put_old.display())))?;
    nix::unistd::pivot_root(root, &put_old)
        .map_err(ns_err(format!("pivot_root to '{}'", root.display())))?;
    nix::unistd::chdir("/").map_err(ns_err("changing to '/'"))?;

    let old = Path::new(OLD_ROOT);
    let entries = fs::read_dir(old).map_err(io_ns_err("reading the host's '/'"))?;
    for entry in entries {
        let entry = entry.map_err(io_ns_err("reading the host's '/'"))?;
        let name = entry.file_name();
        if name == OsStr::new("nix") {
            continue;
        }
        let from = old.join(&name);
        let to = Path::new("/").join(&name);
        let meta = fs::symlink_metadata(&from)
            .map_err(io_ns_err(format!("reading '/{}'", name.to_string_lossy())))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&from)
                .map_err(io_ns_err(format!("reading '/{}'", name.to_string_lossy())))?;
            std::os::unix::fs::symlink(target, &to)
                .map_err(io_ns_err(format!("creating '{}'", to.display())))?;
            continue;
        }
        if meta.is_dir() {
            fs::create_dir(&to)
        } else {
            fs::File::create(&to).map(drop)
        }
        .map_err(io_ns_err(format!("creating '{}'", to.display())))?;
        bind(&from, &to, &Path::new("/").join(&name))?;
    }
    let nix_dir = Path::new("/nix");
    fs::create_dir(nix_dir).map_err(io_ns_err("creating '/nix'"))?;
    let old_store = old.join(store_nix.strip_prefix("/").unwrap_or(&store_nix));
    bind(&old_store, nix_dir, &store_nix)?;

    umount2(old, MntFlags::MNT_DETACH).map_err(ns_err("detaching the host's old root"))?;
    fs::remove_dir(old).map_err(io_ns_err(format!("removing '{OLD_ROOT}'")))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(ns_err("making the new '/' read-only"))?;
    nix::unistd::chdir(&cwd).map_err(ns_err(format!(
        "changing back to '{}' under the store's /nix",
        cwd.display()
    )))?;
    Ok(())
}

/// Bind-mount `from` (the host's `host`) on `to`, with its sub-mounts.
fn bind(from: &Path, to: &Path, host: &Path) -> Result<(), CliError> {
    mount(
        Some(from),
        to,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(ns_err(format!(
        "bind-mounting '{}' at '{}'",
        host.display(),
        to.display()
    )))
}

//! The sandbox's child side: after the fork, clone the builder into its namespaces and
//! set everything up before exec (`enter_sandbox`). The steps, in order (each a
//! function below, each failing with its `Step`):
//!
//! 1. drop the supplementary groups (only root can; for anyone else `setgroups deny`
//!    hides them) — `drop_supplementary_groups`;
//! 2. clone the builder into new user, mount, PID, IPC, UTS and (unless fixed-output)
//!    network namespaces, as a child of firn's (`CLONE_PARENT`); the shim left outside
//!    writes the id maps, releases the builder and exits — `clone_builder`, `run_shim`,
//!    `write_id_maps`. firn waits for both (they are its children, in the process group
//!    the shim leads); the shim, gone at once, does not keep a copy-on-write image of
//!    firn's memory alive for the whole build (every page firn wrote meanwhile would be
//!    copied);
//! 3. in the builder: make `/` private, bind the root onto itself, mount the overlay of
//!    the store dir (if planned), bind the inputs and sandbox paths (read-only ones
//!    remounted), mount `/proc` and mask it, a tmpfs on `/dev/shm`, a new devpts —
//!    `make_mounts_private`, `bind_root`, `mount_overlay`, `bind_inputs`,
//!    `mount_proc`, `mask_proc`, `mount_shm`, `mount_devpts`;
//! 4. bring `lo` up (private network only), set the host and domain names, pivot into
//!    the root, enter `/build` — `bring_up_loopback`, `set_names`, `pivot`,
//!    `enter_build_dir`;
//! 5. `ADDR_NO_RANDOMIZE` and `RLIMIT_CORE` 0, become 1000:100 with umask 022,
//!    `no_new_privs` and the seccomp filter — `limit_process`,
//!    `drop_to_sandbox_ids`, `install_seccomp`.
//!
//! 6. exec the builder itself (`ExecArgs`). `Command::spawn` returns as soon as the
//!    forked child has closed its exec-report pipe, its first step, so firn goes on with
//!    other builds while this one sets up.
//!
//! A failing step (the exec included) writes its errno (4 bytes, little-endian) and its
//! `Step::message` on the step pipe in one write, and the process exits 1; the parent
//! reads it once the build has exited and turns it into the error
//! ([`read_step_failure`]).
//!
//! Everything the child does after the fork is a system call through
//! `crate::builder::sys` on data prepared before it (C strings, the seccomp program):
//! no allocation, no locks.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::prctl;
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Pid, Uid};

use super::plan::{SANDBOX_GID, SANDBOX_UID};
use crate::builder::sys::{self, Cloned, Forked};

/// How one `/proc` entry is masked, for the child (see [`super::plan::ProcMask`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum MaskKind {
    File,
    Dir,
    ReadOnly,
}

/// Everything `enter_sandbox` needs, as C strings made before the fork (by
/// `root.rs`).
#[derive(Debug)]
pub(crate) struct SandboxSetup {
    /// The seccomp program (see [`super::seccomp::seccomp_filter`]).
    pub(crate) seccomp: Vec<libc::sock_filter>,
    pub(crate) root: CString,
    /// (source, target in the root, read-only).
    pub(crate) binds: Vec<(CString, CString, bool)>,
    /// The overlay for the store dir (target, options), when directory inputs have
    /// their mount points on a tmpfs; if it cannot be mounted, they are made on disk.
    pub(crate) overlay: Option<(CString, CString)>,
    /// Directory inputs: (source, target, read-only), mounted after the overlay.
    pub(crate) input_binds: Vec<(CString, CString, bool)>,
    pub(crate) proc_dir: CString,
    pub(crate) proc_masks: Vec<(CString, MaskKind)>,
    pub(crate) shm_dir: CString,
    pub(crate) pts_dir: CString,
    pub(crate) private_network: bool,
    pub(crate) put_old: CString,
    pub(crate) put_old_inside: CString,
    pub(crate) build_dir: CString,
    /// `1000 <uid> 1` and `100 <gid> 1`: the builder's ids mapped to the build user's
    /// (or the caller's).
    pub(crate) uid_map: Vec<u8>,
    pub(crate) gid_map: Vec<u8>,
    /// Write end of the pipe on which a failing set-up step names itself.
    pub(crate) step_fd: i32,
}

/// A step of the sandbox's set-up, named on the step pipe when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    MakePipe,
    CreateNamespaces,
    WriteIdMaps,
    SetParentDeathSignal,
    MakeMountsPrivate,
    BindRoot,
    MakeInputMountPoint,
    BindInput,
    MakeInputReadOnly,
    MountProc,
    MaskProc,
    MountShm,
    OpenLoopbackSocket,
    BringUpLoopback,
    SetNames,
    Pivot,
    EnterBuildDir,
    BecomeSandboxIds,
    SetNoNewPrivs,
    InstallSeccomp,
    Exec,
}

impl Step {
    /// What the parent shows (`<message>: <errno>`); tests and users see these.
    pub(crate) const fn message(self) -> &'static str {
        match self {
            Step::MakePipe => "making a pipe",
            Step::CreateNamespaces => {
                "creating the user, mount, PID, IPC, UTS and network namespaces"
            }
            Step::WriteIdMaps => "writing the user namespace's id maps",
            Step::SetParentDeathSignal => "setting the parent-death signal",
            Step::MakeMountsPrivate => "making the mounts private",
            Step::BindRoot => "bind-mounting the root onto itself",
            Step::MakeInputMountPoint => "making a mount point for an input",
            Step::BindInput => "bind-mounting an input or sandbox path",
            Step::MakeInputReadOnly => "making an input or sandbox path read-only",
            Step::MountProc => "mounting /proc",
            Step::MaskProc => "masking /proc",
            Step::MountShm => "mounting /dev/shm",
            Step::OpenLoopbackSocket => "opening a socket to bring up lo",
            Step::BringUpLoopback => "bringing up lo",
            Step::SetNames => "setting the host and domain names",
            Step::Pivot => "pivoting into the root",
            Step::EnterBuildDir => "entering /build",
            Step::BecomeSandboxIds => "becoming uid 1000, gid 100",
            Step::SetNoNewPrivs => "setting no_new_privs",
            Step::InstallSeccomp => "installing the seccomp filter",
            Step::Exec => "executing the builder",
        }
    }
}

/// A failed step and the errno it failed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepError {
    pub(crate) step: Step,
    pub(crate) errno: Errno,
}

/// `result.at(step)`: an errno becomes the step's error.
trait At<T> {
    fn at(self, step: Step) -> Result<T, StepError>;
}

impl<T> At<T> for Result<T, Errno> {
    fn at(self, step: Step) -> Result<T, StepError> {
        self.map_err(|errno| StepError { step, errno })
    }
}

/// In the forked child (the "shim"): `clone` the builder into new user, mount, PID,
/// IPC, UTS and (unless fixed-output) network namespaces, so that it is PID 1 of its
/// PID namespace; write its uid/gid maps from outside (`1000 → uid`, `100 → gid`,
/// `setgroups deny`, as Nix), release it, then wait for it and exit the same way. The
/// builder's side does the mounts with the capabilities it has in its own user
/// namespace, pivots into the root, becomes 1000:100 and returns to exec. Because the
/// namespaces belong to the new user namespace, the same code serves root (mapping to a
/// build user) and ordinary users (mapping to themselves). A namespace that cannot be
/// created is an error: there is no silent unsandboxed fallback (Nix #8165).
///
/// The builder then execs `exec` itself. A failing step (or exec) is reported on
/// `s.step_fd` and the process exits 1.
pub(crate) fn enter_sandbox(forked: &Forked, s: &SandboxSetup, exec: &sys::ExecArgs) -> ! {
    let failed = match set_up(forked, s) {
        Ok(()) => StepError {
            step: Step::Exec,
            errno: exec.exec(),
        },
        Err(e) => e,
    };
    report(s.step_fd, failed);
    sys::exit(1)
}

/// `failed` on the step pipe: its errno (4 bytes, little-endian) and its message, in one
/// write (shorter than `PIPE_BUF`, so never mixed with another's).
fn report(fd: i32, failed: StepError) {
    let mut buf = [0u8; 128];
    let message = failed.step.message().as_bytes();
    let n = (4 + message.len()).min(buf.len());
    buf[..4].copy_from_slice(&(failed.errno as i32).to_le_bytes());
    buf[4..n].copy_from_slice(&message[..n - 4]);
    let _ = sys::write_raw(fd, &buf[..n]);
}

/// What a sandboxed build's set-up reported on the step pipe (all of it, read once the
/// build has exited, or after a failed spawn): the step that failed and its errno, if
/// one did. `Step::Exec` is the exec of the builder.
pub(crate) fn read_step_failure(data: &[u8]) -> Option<(String, io::Error)> {
    let errno = i32::from_le_bytes(data.get(..4)?.try_into().ok()?);
    let message = String::from_utf8_lossy(&data[4..]).into_owned();
    Some((message, io::Error::from_raw_os_error(errno)))
}

/// Whether a step message from [`read_step_failure`] is the exec of the builder.
pub(crate) fn is_exec_step(message: &str) -> bool {
    message == Step::Exec.message()
}

/// The steps, in order; returns only in the builder (the shim exits in `run_shim`).
fn set_up(forked: &Forked, s: &SandboxSetup) -> Result<(), StepError> {
    // Among the descriptors closed is the pipe on which `Command::spawn` waits: it
    // returns now, not when the builder has set up and exec'd. The standard ones are
    // the builder's (`/dev/null` and the log pipe); the step pipe reports failures.
    sys::close_fds_except(&[s.step_fd]);
    drop_supplementary_groups();
    clone_builder(forked, s)?;
    make_mounts_private()?;
    bind_root(s)?;
    mount_overlay(s)?;
    bind_inputs(s)?;
    mount_proc(s)?;
    mask_proc(s)?;
    mount_shm(s)?;
    mount_devpts(s);
    bring_up_loopback(s)?;
    set_names()?;
    pivot(s)?;
    enter_build_dir(s)?;
    limit_process();
    drop_to_sandbox_ids()?;
    install_seccomp(s)
}

/// No supplementary groups leak into the sandbox (only root may drop them; for anyone
/// else `setgroups deny` hides them). Not checked.
fn drop_supplementary_groups() {
    let _ = nix::unistd::setgroups(&[]);
}

/// Clone the builder into its namespaces. The caller becomes the shim (`run_shim`),
/// which returns only if the id maps could not be written; in the builder this returns
/// once the shim has written them.
fn clone_builder(forked: &Forked, s: &SandboxSetup) -> Result<(), StepError> {
    let (sync_read, sync_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).at(Step::MakePipe)?;
    let mut flags = CloneFlags::CLONE_PARENT
        | CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if s.private_network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    match sys::clone_into(forked, flags).at(Step::CreateNamespaces)? {
        Cloned::Parent(builder) => {
            drop(sync_read);
            Err(run_shim(builder, sync_write, s))
        }
        Cloned::Child => {
            // PID 1 of the new namespaces: it dies with firn, everything else with it.
            drop(sync_write);
            prctl::set_pdeathsig(Signal::SIGKILL).at(Step::SetParentDeathSignal)?;
            // Wait for the id maps; EOF means the shim failed (and said why) or died.
            let mut byte = [0u8];
            if nix::unistd::read(sync_read.as_raw_fd(), &mut byte) != Ok(1) {
                sys::exit(1);
            }
            drop(sync_read);
            Ok(())
        }
    }
}

/// The shim, outside the builder's namespaces: write its id maps, release it and exit
/// 0. Returns only if the maps could not be written (the builder is then killed; firn,
/// its parent, reaps it).
fn run_shim(builder: Pid, release: OwnedFd, s: &SandboxSetup) -> StepError {
    if let Err(e) = write_id_maps(builder, s) {
        let _ = kill(builder, Signal::SIGKILL);
        return e;
    }
    let _ = nix::unistd::write(release.as_fd(), b"1");
    sys::exit(0)
}

/// `setgroups deny`, then `1000 <uid> 1` and `100 <gid> 1` (Nix's maps).
fn write_id_maps(builder: Pid, s: &SandboxSetup) -> Result<(), StepError> {
    sys::write_proc_file(builder, b"setgroups", b"deny")
        .and_then(|()| sys::write_proc_file(builder, b"uid_map", &s.uid_map))
        .and_then(|()| sys::write_proc_file(builder, b"gid_map", &s.gid_map))
        .at(Step::WriteIdMaps)
}

/// `/` and everything under it private, so nothing the builder mounts reaches the host.
fn make_mounts_private() -> Result<(), StepError> {
    sys::mount(
        None,
        c"/",
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )
    .at(Step::MakeMountsPrivate)
}

/// `pivot_root` needs the new root to be a mount point.
fn bind_root(s: &SandboxSetup) -> Result<(), StepError> {
    sys::mount(
        Some(&s.root),
        &s.root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .at(Step::BindRoot)
}

/// The overlay on the store dir whose lower layer holds the directory inputs' mount
/// points, if planned. The kernel refuses an overlay to a mounter whose uid the user
/// namespace does not map (this process is host root, unmapped): a short-lived child
/// in the same namespaces mounts it as the builder's (mapped) ids. If it cannot be
/// mounted, the mount points go on the disk after all.
fn mount_overlay(s: &SandboxSetup) -> Result<(), StepError> {
    let Some((target, opts)) = &s.overlay else {
        return Ok(());
    };
    let ids = (Uid::from_raw(SANDBOX_UID), Gid::from_raw(SANDBOX_GID));
    if !sys::mount_overlay_as(target, opts, ids.0, ids.1) {
        for (_, dst, _) in &s.input_binds {
            sys::mkdir(dst, Mode::from_bits_truncate(0o555)).at(Step::MakeInputMountPoint)?;
        }
    }
    Ok(())
}

/// The directory inputs, then the other inputs and sandbox paths, bound (recursively)
/// and remounted read-only where planned.
fn bind_inputs(s: &SandboxSetup) -> Result<(), StepError> {
    for (src, dst, ro) in s.input_binds.iter().chain(&s.binds) {
        sys::mount(
            Some(src),
            dst,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )
        .at(Step::BindInput)?;
        if *ro {
            sys::remount_read_only(dst).at(Step::MakeInputReadOnly)?;
        }
    }
    Ok(())
}

/// A fresh `/proc` of the builder's PID namespace.
fn mount_proc(s: &SandboxSetup) -> Result<(), StepError> {
    sys::mount(
        Some(c"proc"),
        &s.proc_dir,
        Some(c"proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )
    .at(Step::MountProc)
}

/// The `/proc` entries to mask: files under `/dev/null`, directories under an empty
/// read-only tmpfs, the rest bound read-only.
fn mask_proc(s: &SandboxSetup) -> Result<(), StepError> {
    for (path, kind) in &s.proc_masks {
        let masked = match kind {
            MaskKind::File => sys::mount(Some(c"/dev/null"), path, None, MsFlags::MS_BIND, None),
            MaskKind::Dir => sys::mount(
                Some(c"tmpfs"),
                path,
                Some(c"tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(c"size=0"),
            ),
            MaskKind::ReadOnly => sys::mount(
                Some(path),
                path,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )
            .and_then(|()| sys::remount_read_only(path)),
        };
        masked.at(Step::MaskProc)?;
    }
    Ok(())
}

/// A tmpfs (1777) on `/dev/shm`.
fn mount_shm(s: &SandboxSetup) -> Result<(), StepError> {
    sys::mount(
        Some(c"tmpfs"),
        &s.shm_dir,
        Some(c"tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(c"mode=1777"),
    )
    .at(Step::MountShm)
}

/// A private devpts; without one the builder simply has no ptys (not checked).
fn mount_devpts(s: &SandboxSetup) {
    let _ = sys::mount(
        Some(c"devpts"),
        &s.pts_dir,
        Some(c"devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(c"newinstance,mode=0620,ptmxmode=0666"),
    );
}

/// `lo` up in a private network namespace (the host's network needs nothing).
fn bring_up_loopback(s: &SandboxSetup) -> Result<(), StepError> {
    if !s.private_network {
        return Ok(());
    }
    let sock = sys::inet_socket().at(Step::OpenLoopbackSocket)?;
    sys::bring_up_loopback(sock.as_fd()).at(Step::BringUpLoopback)
}

/// Hostname `localhost`, domain name `(none)`, as Nix.
fn set_names() -> Result<(), StepError> {
    sys::set_host_and_domain_names(c"localhost", c"(none)").at(Step::SetNames)
}

/// Into the root: `pivot_root` with the old root parked on the root's `/tmp`, then
/// detached from there.
fn pivot(s: &SandboxSetup) -> Result<(), StepError> {
    sys::chdir(&s.root)
        .and_then(|()| sys::pivot_root(c".", &s.put_old))
        .and_then(|()| sys::chroot(c"."))
        .and_then(|()| sys::detach(&s.put_old_inside))
        .at(Step::Pivot)
}

/// The builder starts in `/build`.
fn enter_build_dir(s: &SandboxSetup) -> Result<(), StepError> {
    sys::chdir(&s.build_dir).at(Step::EnterBuildDir)
}

/// `ADDR_NO_RANDOMIZE` and no core dumps, as Nix (neither is checked, as in Nix).
fn limit_process() {
    sys::disable_address_randomization();
    sys::disable_core_dumps();
}

/// Nix's sandbox identity, umask 022; supplementary groups cannot be set (setgroups
/// deny).
fn drop_to_sandbox_ids() -> Result<(), StepError> {
    nix::unistd::setgid(Gid::from_raw(SANDBOX_GID))
        .and_then(|()| nix::unistd::setuid(Uid::from_raw(SANDBOX_UID)))
        .at(Step::BecomeSandboxIds)?;
    sys::set_umask(0o022);
    Ok(())
}

/// No privilege can be gained back through exec (setuid binaries, file caps), and the
/// filter holds for everything the builder starts.
fn install_seccomp(s: &SandboxSetup) -> Result<(), StepError> {
    prctl::set_no_new_privs().at(Step::SetNoNewPrivs)?;
    sys::install_seccomp_filter(&s.seccomp).at(Step::InstallSeccomp)
}

#[cfg(test)]
mod tests {
    use super::Step;

    /// The step names are what users and tests see (`<step>: <errno>`): they stay the
    /// same byte for byte.
    #[test]
    fn step_messages_are_unchanged() {
        let all = [
            (Step::MakePipe, "making a pipe"),
            (
                Step::CreateNamespaces,
                "creating the user, mount, PID, IPC, UTS and network namespaces",
            ),
            (Step::WriteIdMaps, "writing the user namespace's id maps"),
            (
                Step::SetParentDeathSignal,
                "setting the parent-death signal",
            ),
            (Step::MakeMountsPrivate, "making the mounts private"),
            (Step::BindRoot, "bind-mounting the root onto itself"),
            (
                Step::MakeInputMountPoint,
                "making a mount point for an input",
            ),
            (Step::BindInput, "bind-mounting an input or sandbox path"),
            (
                Step::MakeInputReadOnly,
                "making an input or sandbox path read-only",
            ),
            (Step::MountProc, "mounting /proc"),
            (Step::MaskProc, "masking /proc"),
            (Step::MountShm, "mounting /dev/shm"),
            (Step::OpenLoopbackSocket, "opening a socket to bring up lo"),
            (Step::BringUpLoopback, "bringing up lo"),
            (Step::SetNames, "setting the host and domain names"),
            (Step::Pivot, "pivoting into the root"),
            (Step::EnterBuildDir, "entering /build"),
            (Step::BecomeSandboxIds, "becoming uid 1000, gid 100"),
            (Step::SetNoNewPrivs, "setting no_new_privs"),
            (Step::InstallSeccomp, "installing the seccomp filter"),
            (Step::Exec, "executing the builder"),
        ];
        for (step, message) in all {
            assert_eq!(step.message(), message, "{step:?}");
        }
    }
}

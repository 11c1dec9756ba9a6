//! Builds on this machine. What the forked child does before exec is a `BeforeExec`,
//! which `sys::run_before_exec` registers. In the sandbox (the default) it hands over to
//! `sandbox::child::enter_sandbox`. With `sandbox = false` the builder runs as a build
//! user (when firn is root) in a private mount namespace in which the store's real
//! directory is mounted at the logical store directory when they differ (a chroot store
//! not at `/`), so it builds at the paths its derivations name; nothing else is
//! isolated.
//!
//! The builder's stdout and stderr go to one pipe, which the worker polls and reads.
//!
//! A `builtin:NAME` builder is firn's own binary run as `firn __builtin NAME`
//! (`crate::builtins::exec`): the same fork, environment, directory, user and sandbox
//! as any builder, with the binary and its libraries bound into the sandbox.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use firn_derivation::{OutputName, StoreDir, StorePath};
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};

use super::build_dirs::BuildDirs;
use super::build_user::{kill_user, uses_build_users, AcquiredUser, BuildUser, BuildUsers};
use super::cgroup::{BuildCgroup, Cgroups, Limits, Usage};
use super::error::{cstring, io_err, ExecError};
use super::processes::Processes;
use super::sandbox::child::{enter_sandbox, is_exec_step, read_step_failure, SandboxSetup};
use super::sandbox::{plan_sandbox, RootPool, SandboxInput, SandboxRoot};
use super::sys::{self, Forked};
use super::{BuildDir, BuildJob, Builder, Collected, RunningBuild};
use crate::builtins::exec::{BuiltinExec, Runner};
use crate::plan::{BuildPlan, SANDBOX_BUILD_DIR};

/// How the local builder runs builds.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The store's real directory (`ROOT/nix/store`, or `store_dir` itself).
    pub real_store: PathBuf,
    /// The logical store directory, which the builder sees.
    pub store_dir: StoreDir,
    /// Where build users are locked (Nix's `<nixStateDir>/userpool`).
    pub userpool: PathBuf,
    /// `build-users-group` ('' = build as the caller).
    pub build_users_group: String,
    /// `use-cgroups`: each build in a cgroup of its own where the machine has them.
    pub use_cgroups: bool,
    /// `build-memory-max`, `build-pids-max`.
    pub limits: Limits,
}

impl LocalOptions {
    /// The options for building into `store` with `settings`, locking build users in
    /// `userpool` (what the CLI, the daemon and `firn serve` all build with).
    pub fn for_store(
        store: &firn_store::Store,
        settings: &crate::settings::Settings,
        userpool: PathBuf,
    ) -> Self {
        Self {
            real_store: store.real_store_dir().to_path_buf(),
            store_dir: store.store_dir().clone(),
            userpool,
            build_users_group: settings.build_users_group.clone(),
            use_cgroups: settings.use_cgroups,
            limits: Limits {
                memory_max: settings.build_memory_max.0,
                pids_max: settings.build_pids_max.0,
            },
        }
    }
}

/// Builds on this machine; owns the spare sandbox roots of its builds.
#[derive(Debug)]
pub struct LocalBuilder {
    options: LocalOptions,
    pool: RootPool,
    build_dirs: BuildDirs,
    /// The members of `build-users-group`, once looked up.
    build_users: Option<BuildUsers>,
    /// The cgroup hierarchies this machine offers.
    cgroups: Cgroups,
    /// Whether the host has `/dev/kvm` (bound into the sandbox, as Nix does).
    kvm: bool,
    /// The binary that runs builtin builders (`firn __builtin NAME`); `None`: this
    /// process's own.
    builtin_exe: Option<PathBuf>,
}

impl LocalBuilder {
    pub fn new(options: LocalOptions) -> Self {
        let cgroups = match options.use_cgroups {
            true => Cgroups::detect(),
            false => Cgroups::default(),
        };
        Self {
            options,
            pool: RootPool::new(),
            build_dirs: BuildDirs::default(),
            build_users: None,
            cgroups,
            kvm: Path::new("/dev/kvm").exists(),
            builtin_exe: None,
        }
    }

    /// Run builtin builders with `exe` (a `firn` binary) instead of this process's
    /// own binary (for embedders whose binary has no `__builtin` command).
    pub fn with_builtin_exe(mut self, exe: PathBuf) -> Self {
        self.builtin_exe = Some(exe);
        self
    }

    /// How to start builtin builder `name`.
    fn builtin_exec(&self, name: &[u8], sandboxed: bool) -> Result<BuiltinExec, ExecError> {
        let name = String::from_utf8_lossy(name).into_owned();
        let runner =
            Runner::current(self.builtin_exe.as_deref()).map_err(|msg| ExecError::Builtin {
                builtin: name.clone(),
                msg,
            })?;
        Ok(runner.plan(&name, sandboxed))
    }

    /// Why the limits asked for cannot be enforced here, if they cannot (builds then
    /// run without them).
    pub fn cannot_enforce_limits(&self) -> Option<String> {
        if !self.options.use_cgroups {
            return (self.options.limits != Limits::default())
                .then(|| "use-cgroups is false".to_owned());
        }
        self.cgroups.cannot_enforce(&self.options.limits)
    }

    fn real_store(&self) -> PathBuf {
        self.options.real_store.clone()
    }

    /// Whether the real store dir is not the logical one.
    fn relocated(&self) -> bool {
        self.options.real_store != Path::new(self.options.store_dir.as_str())
    }
}

/// A builder running on this machine.
#[derive(Debug)]
pub struct LocalBuild {
    processes: Processes,
    /// Sandboxed: the read end of the step pipe, on which a set-up that failed after
    /// the spawn returned (see `sandbox/child.rs`) said why.
    step: Option<io::PipeReader>,
    /// The builder, for the message if its exec failed.
    program: Vec<u8>,
    /// Read end of the builder's stdout+stderr.
    log: io::PipeReader,
    /// The real build directory.
    build_dir: PathBuf,
    user: Option<BuildUser>,
    /// The sandbox's root, if sandboxed.
    root: Option<SandboxRoot>,
    real_store: PathBuf,
    /// The build's cgroup, if the machine offers one.
    cgroup: Option<BuildCgroup>,
}

impl RunningBuild for LocalBuild {
    fn log_fd(&self) -> BorrowedFd<'_> {
        self.log.as_fd()
    }

    fn read_log(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.log.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            other => other,
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.processes.try_wait()
    }

    fn kill(&mut self) -> Option<ExitStatus> {
        kill_group(self.processes.group());
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        if let Some(u) = &self.user {
            kill_user(u.uid);
        }
        self.processes.wait().ok()
    }

    fn built_path(&self, output: &StorePath) -> PathBuf {
        match &self.root {
            Some(root) => root.store_inside().join(output.base_name()),
            None => self.real_store.join(output.base_name()),
        }
    }

    fn build_uid(&self) -> Option<u32> {
        self.user.as_ref().map(|u| u.uid)
    }

    fn usage(&self) -> Option<Usage> {
        self.cgroup.as_ref().map(BuildCgroup::usage)
    }

    fn build_dir(&self) -> &Path {
        &self.build_dir
    }

    fn start_failure(&mut self) -> Option<ExecError> {
        // Every writer is gone once the build has exited: this does not block.
        let mut step = Vec::new();
        let _ = self.step.take()?.take(256).read_to_end(&mut step);
        step_failure(&step, &self.program)
    }
}

/// What the step pipe's `data` says failed: the exec of `program`, or a step of the
/// sandbox's set-up.
fn step_failure(data: &[u8], program: &[u8]) -> Option<ExecError> {
    let (step, source) = read_step_failure(data)?;
    Some(match is_exec_step(&step) {
        true => ExecError::Spawn {
            program: String::from_utf8_lossy(program).into_owned(),
            source,
        },
        false => ExecError::SandboxSetup { step, source },
    })
}

/// SIGKILL to the builder's process group.
fn kill_group(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Builder for LocalBuilder {
    type Build = LocalBuild;

    fn acquire_user(&mut self) -> Result<AcquiredUser, ExecError> {
        let group = &self.options.build_users_group;
        if !uses_build_users(group) {
            return Ok(AcquiredUser::NotConfigured);
        }
        let users = match &self.build_users {
            Some(users) => users,
            None => self.build_users.insert(BuildUsers::lookup(group)?),
        };
        users.acquire(&self.options.userpool)
    }

    fn build_dir(
        &mut self,
        drv_path: &StorePath,
        user: Option<&BuildUser>,
        sandboxed: bool,
    ) -> Result<BuildDir, ExecError> {
        let real = self
            .build_dirs
            .take(drv_path.base_name(), user, sandboxed)?;
        let seen = match sandboxed {
            true => PathBuf::from(SANDBOX_BUILD_DIR),
            false => real.clone(),
        };
        Ok(BuildDir::new(real, seen))
    }

    fn start(&mut self, job: BuildJob<'_>) -> Result<LocalBuild, ExecError> {
        let relocated = self.relocated();
        let opts = &self.options;
        let is_root = Uid::effective().is_root();
        if relocated && !job.sandboxed && !is_root {
            return Err(ExecError::NeedRoot {
                real: opts.real_store.display().to_string(),
                logical: opts.store_dir.as_str().to_owned(),
            });
        }
        let user = job.user;
        let plan = job.plan;
        let real_build_dir = job.build_dir.real().to_path_buf();
        // The builder's host identity: the build user, else the caller.
        let host_ids = user
            .as_ref()
            .map(|u| (u.uid, u.gid))
            .unwrap_or_else(|| (Uid::effective().as_raw(), Gid::effective().as_raw()));
        let (step_reader, step_writer) = io::pipe().map_err(io_err(&real_build_dir))?;
        let real_store = self.real_store();
        let builtin = match plan.builtin() {
            Some(name) => Some(self.builtin_exec(name, job.sandboxed)?),
            None => None,
        };
        let mut sandbox = None;
        let mut sandbox_setup = None;
        if job.sandboxed {
            let inputs: Vec<StorePath> = job.inputs.iter().cloned().collect();
            let mut sandbox_paths: Vec<(PathBuf, PathBuf, bool)> = job
                .sandbox_paths
                .iter()
                .map(|p| (p.target.clone(), p.source.clone(), p.optional))
                .collect();
            // A builtin's binary and libraries, read-only like every sandbox path.
            if let Some(b) = &builtin {
                sandbox_paths.extend(b.binds.iter().map(|(t, s)| (t.clone(), s.clone(), false)));
            }
            let sandbox_plan = plan_sandbox(&SandboxInput {
                real_store: &real_store,
                store_dir: opts.store_dir.as_str(),
                drv_path: job.drv_path,
                inputs: &inputs,
                build_dir: &real_build_dir,
                sandbox_paths: &sandbox_paths,
                fixed_output: !job.drv.is_sandboxed(),
                kvm: self.kvm,
            });
            let (root, mut setup) = self.pool.prepare(&sandbox_plan, user.as_ref(), host_ids)?;
            setup.step_fd = step_writer.as_raw_fd();
            // Paths a recursive-Nix build adds appear in its store dir as copies.
            if let Some(allowed) = job.recursive {
                let (from, to) = (real_store.clone(), root.store_inside().to_path_buf());
                let uid = Some(host_ids.0);
                allowed.set_materialise(Box::new(move |p: &StorePath| {
                    let name = p.base_name();
                    crate::recursive::materialise_copy(&from.join(name), &to.join(name), uid)
                }));
            }
            sandbox = Some(root);
            sandbox_setup = Some(setup);
        }
        write_build_files(plan, &real_build_dir, user.as_ref())?;
        // A cgroup where it does something the build needs: limits asked for, or an
        // unsandboxed build, whose leftovers only the cgroup can find (in the sandbox
        // the PID namespace ends them). Joining one costs the builder an RCU grace
        // period in the kernel (7–12 ms here), too much for every trivial build.
        let wants_cgroup = opts.limits != Limits::default() || !job.sandboxed;
        let cgroup = match opts.use_cgroups && wants_cgroup {
            true => self
                .cgroups
                .create(&opts.limits)
                .map_err(|e| ExecError::Cgroup { source: e })?,
            false => None,
        };
        let join_cgroups = cgroup
            .as_ref()
            .map(|c| c.procs_files().to_vec())
            .unwrap_or_default();
        let spawned = spawn(
            plan,
            builtin.as_ref(),
            &real_build_dir,
            relocated.then_some(real_store.as_path()),
            opts.store_dir.as_str(),
            user.as_ref(),
            sandbox_setup,
            is_root,
            join_cgroups,
        );
        drop(step_writer);
        let (child, reader) = match spawned {
            Ok(c) => c,
            Err(e) => {
                // The sandbox's set-up may have named the step that failed; the root
                // and the build directory go with their owners.
                let mut step = Vec::new();
                let _ = (&step_reader).take(256).read_to_end(&mut step);
                return Err(step_failure(&step, &plan.program).unwrap_or(e));
            }
        };
        Ok(LocalBuild {
            processes: Processes::new(child, sandbox.is_some()),
            step: sandbox.is_some().then_some(step_reader),
            program: plan.program.clone(),
            log: reader,
            build_dir: job.build_dir.into_real(),
            user,
            root: sandbox,
            real_store,
            cgroup,
        })
    }

    fn collect_outputs(
        &mut self,
        build: &mut LocalBuild,
        outputs: &BTreeMap<OutputName, (StorePath, PathBuf)>,
    ) -> Result<Collected, ExecError> {
        let mut collected = Collected::default();
        if build.root.is_none() {
            // Unsandboxed, the builder wrote them in place.
            return Ok(collected);
        }
        // Sandboxed outputs were built inside the root, on the store's file system:
        // a rename moves them into the store.
        for (name, (path, real)) in outputs {
            let inside = build.built_path(path);
            if fs::symlink_metadata(&inside).is_ok() {
                fs::rename(&inside, real).map_err(io_err(real))?;
            } else {
                collected.missing_at.insert(name.clone(), inside);
            }
        }
        Ok(collected)
    }

    fn release(
        &mut self,
        mut build: LocalBuild,
        keep_build_dir: bool,
    ) -> Result<Option<PathBuf>, ExecError> {
        // The builder is done: nothing it left running may outlive the build. In the
        // sandbox the PID namespace saw to that when its PID 1 exited.
        if let Some(u) = build.user.as_ref().filter(|_| build.root.is_none()) {
            kill_user(u.uid);
        }
        kill_group(build.processes.group());
        // Everything the build started, wherever it went (cgroup.kill), and the
        // cgroup itself.
        drop(build.cgroup.take());
        build.processes.drain();
        let sandboxed = build.root.is_some();
        if let Some(root) = build.root.take() {
            self.pool.recycle(root);
        }
        if keep_build_dir {
            let _ = fs::set_permissions(&build.build_dir, fs::Permissions::from_mode(0o755));
            return Ok(Some(build.build_dir));
        }
        match sandboxed {
            true => self.build_dirs.give_back(&build.build_dir),
            false => firn_store::canonical::delete_path(&build.build_dir),
        }
        .map_err(io_err(&build.build_dir))?;
        Ok(None)
    }
}

/// The plan's files in the build directory, owned by the build user.
fn write_build_files(
    plan: &BuildPlan,
    build_dir: &Path,
    user: Option<&BuildUser>,
) -> Result<(), ExecError> {
    for (name, contents) in &plan.files {
        let p = build_dir.join(name);
        fs::write(&p, contents).map_err(io_err(&p))?;
        if let Some(u) = user {
            nix::unistd::chown(&p, Some(Uid::from_raw(u.uid)), Some(Gid::from_raw(u.gid)))
                .map_err(|e| io_err(&p)(e.into()))?;
        }
    }
    Ok(())
}

/// Fork and exec the builder: sandboxed through `setup`, else in a private mount
/// namespace (as root) as the build user, `relocated_store` (the real store dir when it
/// is not the logical one) bound at `store_dir` in it.
#[allow(clippy::too_many_arguments)]
fn spawn(
    plan: &BuildPlan,
    builtin: Option<&BuiltinExec>,
    build_dir: &Path,
    relocated_store: Option<&Path>,
    store_dir: &str,
    user: Option<&BuildUser>,
    setup: Option<SandboxSetup>,
    is_root: bool,
    join_cgroups: Vec<CString>,
) -> Result<(Child, io::PipeReader), ExecError> {
    // Read-write, as Nix opens it.
    let dev_null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_err(Path::new("/dev/null")))?;
    let (reader, writer) = io::pipe().map_err(io_err(build_dir))?;
    let writer2 = writer.try_clone().map_err(io_err(build_dir))?;
    let mut cmd = match builtin {
        // firn's binary runs the builtin: `firn __builtin NAME`.
        Some(b) => {
            let mut cmd = Command::new(&b.program);
            if let Some((argv0, rest)) = b.argv.split_first() {
                cmd.arg0(argv0).args(rest);
            }
            cmd
        }
        None => {
            let mut cmd = Command::new(OsStr::from_bytes(&plan.program));
            if let Some((argv0, rest)) = plan.argv.split_first() {
                cmd.arg0(OsStr::from_bytes(argv0));
                cmd.args(rest.iter().map(|a| OsStr::from_bytes(a)));
            }
            cmd
        }
    };
    cmd.env_clear()
        .envs(
            plan.env
                .iter()
                .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
        )
        .current_dir(build_dir)
        .stdin(dev_null)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2))
        .process_group(0);

    // Everything the child needs is prepared here: after fork only system calls.
    let store_bind = match relocated_store {
        None => None,
        Some(real) => Some((
            cstring(real.as_os_str().as_bytes())?,
            cstring(store_dir.as_bytes())?,
        )),
    };
    if relocated_store.is_some() && setup.is_none() {
        fs::create_dir_all(store_dir).map_err(io_err(Path::new(store_dir)))?;
    }
    let mode = match setup {
        Some(setup) => ExecMode::Sandbox(Box::new(setup), exec_args(plan, builtin)?),
        None => ExecMode::Unsandboxed(Unsandboxed {
            private_mounts: is_root,
            store_bind,
            ids: user.map(|u| (Uid::from_raw(u.uid), Gid::from_raw(u.gid))),
        }),
    };
    let before_exec = BeforeExec { join_cgroups, mode };
    sys::run_before_exec(&mut cmd, before_exec);
    let child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: String::from_utf8_lossy(&plan.program).into_owned(),
        source,
    })?;
    // `cmd` holds our copies of the write end: EOF then means every writer is gone.
    drop(cmd);
    Ok((child, reader))
}

/// The builder's `execve` arguments, as `cmd` has them: the program (not searched in
/// `PATH`, as Nix's `execve`), its arguments (`argv[0]` the program if there are none),
/// the environment.
fn exec_args(plan: &BuildPlan, builtin: Option<&BuiltinExec>) -> Result<sys::ExecArgs, ExecError> {
    let (program, argv): (&[u8], Vec<&[u8]>) = match builtin {
        Some(b) => (
            b.program.as_os_str().as_bytes(),
            b.argv.iter().map(|a| a.as_bytes()).collect(),
        ),
        None => (&plan.program, plan.argv.iter().map(Vec::as_slice).collect()),
    };
    let program = cstring(program)?;
    let mut args = argv
        .into_iter()
        .map(cstring)
        .collect::<Result<Vec<_>, _>>()?;
    if args.is_empty() {
        args.push(program.clone());
    }
    let env = plan
        .env
        .iter()
        .map(|(k, v)| cstring(&[k.as_slice(), b"=", v.as_slice()].concat()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(sys::ExecArgs::new(program, args, env))
}

/// What the forked child does before it execs the builder ([`sys::run_before_exec`]
/// runs [`BeforeExec::run`]): system calls on data prepared before the fork, no
/// allocation, no locks.
#[derive(Debug)]
pub(crate) struct BeforeExec {
    /// The `cgroup.procs` files of the build's cgroup, joined first (so that all the
    /// builder starts is in it).
    join_cgroups: Vec<CString>,
    mode: ExecMode,
}

/// Where the builder goes.
#[derive(Debug)]
pub(crate) enum ExecMode {
    /// Into the sandbox ([`enter_sandbox`]), which execs the builder itself.
    Sandbox(Box<SandboxSetup>, sys::ExecArgs),
    /// `sandbox = false`.
    Unsandboxed(Unsandboxed),
}

/// The unsandboxed builder's set-up.
#[derive(Debug)]
pub(crate) struct Unsandboxed {
    /// As root: a private mount namespace (`/` made private).
    private_mounts: bool,
    /// In it, for a store whose real directory is not the logical one: the real one
    /// bound at the logical one (real, logical).
    store_bind: Option<(CString, CString)>,
    /// The build user to become.
    ids: Option<(Uid, Gid)>,
}

impl sys::ChildSetup for BeforeExec {
    /// Runs in the forked child, before exec: the builder dies with firn, inherits none
    /// of firn's descriptors, then enters the sandbox or (unsandboxed) its mount
    /// namespace and the build user's identity.
    fn run(&self, forked: &Forked) -> io::Result<()> {
        prctl::set_pdeathsig(Signal::SIGKILL)?;
        close_inherited_fds();
        for procs in &self.join_cgroups {
            sys::write_path(procs, b"0")?;
        }
        match &self.mode {
            ExecMode::Sandbox(setup, exec) => enter_sandbox(forked, setup, exec),
            ExecMode::Unsandboxed(u) => {
                if u.private_mounts {
                    enter_private_mount_namespace(u.store_bind.as_ref())?;
                }
                drop_privileges(u.ids)
            }
        }
    }
}

/// A new mount namespace with `/` private, and `store_bind`'s real store dir bound at
/// the logical one.
fn enter_private_mount_namespace(store_bind: Option<&(CString, CString)>) -> io::Result<()> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
    sys::mount(
        Some(c"none"),
        c"/",
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    if let Some((real, logical)) = store_bind {
        sys::mount(
            Some(real),
            logical,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
    }
    Ok(())
}

/// Descriptors firn inherited from its own caller must not reach the builder (Nix's
/// `closeMostFDs`): mark everything above stderr close-on-exec. Closing them outright
/// is not possible here: `Command` reports a failed exec through one of them.
fn close_inherited_fds() {
    sys::cloexec_fds_above_stderr();
}

/// Become the build user (no supplementary groups), umask 022.
fn drop_privileges(ids: Option<(Uid, Gid)>) -> io::Result<()> {
    if let Some((uid, gid)) = ids {
        nix::unistd::setgroups(&[])?;
        nix::unistd::setgid(gid)?;
        nix::unistd::setuid(uid)?;
    }
    sys::set_umask(0o022);
    Ok(())
}

//! Starting a builder (`start_builder`), its build user and build directory, and its
//! log. In the sandbox (the default) the forked child hands over to
//! `sandbox_exec::enter_sandbox`. With `sandbox = false` the builder runs as a build
//! user (when firn is root) in a private mount namespace in which the store's real
//! directory is mounted at the logical store directory, so a store rooted elsewhere than
//! `/` builds at the paths its derivations name; nothing else is isolated.
//!
//! The builder's stdout and stderr go to one pipe, read by the worker and written to the
//! bzip2 build log. The builder's exit is taken from `waitpid`, never from EOF on its
//! output (Nix 2.8 kills a builder that closes its output, #2176).

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};
use nix::libc;
use nix::unistd::{Gid, Group, Uid, User};
use thiserror::Error;

use crate::sandbox::SandboxPlan;
use crate::sandbox_exec::{enter_sandbox, prepare_root, recycle_root};

#[derive(Debug, Error)]
pub enum ExecError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("starting builder '{program}': {source}")]
    Spawn { program: String, source: io::Error },
    /// A step of the sandbox's set-up failed; firn never falls back to an unsandboxed
    /// build (`--option sandbox false` is the explicit way).
    #[error("{step}: {source}{}", hint(source))]
    SandboxSetup { step: String, source: io::Error },
    #[error("the group '{0}' specified in 'build-users-group' does not exist")]
    NoSuchGroup(String),
    #[error("the build users group '{0}' has no members")]
    NoMembers(String),
    #[error("looking up the group '{group}' of 'build-users-group': {source}")]
    GroupLookup { group: String, source: io::Error },
    #[error("building in a store rooted at '{0}' needs root (the store is mounted at /nix/store for the builder); run as root or use the sandbox")]
    NeedRoot(String),
}

/// What to do about a set-up error that has a usual cause.
fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EUSERS) => {
            " (the limit on user namespaces is reached: see /proc/sys/user/max_user_namespaces; --option sandbox false builds without the sandbox)"
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (user namespaces are not allowed here; --option sandbox false builds without the sandbox)"
        }
        _ => "",
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ExecError + '_ {
    move |source| ExecError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to run: the output of the build plan.
#[derive(Debug, Clone)]
pub struct Spawn {
    pub program: Vec<u8>,
    /// argv, argv[0] included.
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Files to create in the build directory before the builder starts.
    pub files: Vec<(String, Vec<u8>)>,
}

/// A build user taken from the `nixbld` group, locked in the user pool like Nix does
/// (`/nix/var/nix/userpool/<uid>`), so concurrent builds — firn's or Nix's — never share
/// a uid and cannot signal each other.
#[derive(Debug)]
pub struct BuildUser {
    pub uid: u32,
    pub gid: u32,
    _lock: Flock<File>,
}

/// What asking for a build user gave.
#[derive(Debug)]
pub enum AcquiredUser {
    /// A free member of the group, locked until dropped.
    Got(BuildUser),
    /// Every member is building: wait and ask again (Nix: "waiting for UID to build").
    Busy,
    /// No build users here: firn is not root, or `build-users-group` is empty. Builds
    /// run as the caller.
    NotConfigured,
}

impl BuildUser {
    /// A free member of `group` (`build-users-group`). Only root uses build users (as
    /// Nix); an empty `group` means builds run as the caller. A group that does not
    /// exist or has no members is an error, never a build as root.
    pub fn acquire(group: &str) -> Result<AcquiredUser, ExecError> {
        if !Uid::effective().is_root() || group.is_empty() {
            return Ok(AcquiredUser::NotConfigured);
        }
        let found = Group::from_name(group).map_err(|e| ExecError::GroupLookup {
            group: group.to_owned(),
            source: e.into(),
        })?;
        let Some(group_entry) = found else {
            return Err(ExecError::NoSuchGroup(group.to_owned()));
        };
        let members: Vec<User> = group_entry
            .mem
            .iter()
            .filter_map(|m| User::from_name(m).ok().flatten())
            .filter(|u| !u.uid.is_root())
            .collect();
        if members.is_empty() {
            return Err(ExecError::NoMembers(group.to_owned()));
        }
        let pool = Path::new("/nix/var/nix/userpool");
        fs::create_dir_all(pool).map_err(io_err(pool))?;
        for user in members {
            let path = pool.join(user.uid.to_string());
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io_err(&path))?;
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(AcquiredUser::Got(Self {
                    uid: user.uid.as_raw(),
                    gid: group_entry.gid.as_raw(),
                    _lock: lock,
                }));
            }
        }
        Ok(AcquiredUser::Busy)
    }
}

/// Kill every process of `uid` (Nix's `killUser`): a child becomes that user and kills
/// everything it may signal. Needed because a builder's children can leave its process
/// group.
pub fn kill_user(uid: u32) {
    if uid == 0 {
        return;
    }
    // SAFETY: the child only makes async-signal-safe system calls and exits.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            // One kill(-1) reaches every process of the user (but this one); retry
            // only when interrupted, as Nix's killUser does.
            if libc::setuid(uid) == 0 {
                while libc::kill(-1, libc::SIGKILL) != 0 && *libc::__errno_location() == libc::EINTR
                {
                }
            }
            libc::_exit(0);
        }
        if pid > 0 {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
    }
}

/// The bzip2-compressed build log being written.
struct LogSink(bzip2::write::BzEncoder<File>);

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

/// A running builder.
#[derive(Debug)]
pub struct RunningBuild {
    pub child: Child,
    /// Read end of the builder's stdout+stderr.
    pub log: io::PipeReader,
    /// The real build directory.
    pub build_dir: PathBuf,
    pub started: Instant,
    pub last_output: Instant,
    pub user: Option<BuildUser>,
    /// Bytes of log written so far.
    pub log_size: u64,
    /// The last lines of output, for error messages and progress.
    pub tail: VecDeque<String>,
    partial: Vec<u8>,
    log_file: Option<LogSink>,
    log_tmp: PathBuf,
    log_path: PathBuf,
    /// Builder exit status, once reaped.
    pub status: Option<std::process::ExitStatus>,
    /// Run in the sandbox (in its own PID namespace).
    pub sandboxed: bool,
    pub eof: bool,
}

pub(crate) fn cstring(b: &[u8]) -> Result<CString, ExecError> {
    CString::new(b).map_err(|_| ExecError::Spawn {
        program: String::from_utf8_lossy(b).into_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}

/// A fresh `/tmp/nix-build-<drv name>-<n>` (0700), owned by the build user.
pub fn create_build_dir(drv_base: &str, user: Option<&BuildUser>) -> Result<PathBuf, ExecError> {
    let tmp = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let name = drv_base.get(33..).unwrap_or(drv_base);
    for n in 0..100_000 {
        let dir = tmp.join(format!("nix-build-{name}-{n}"));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .map_err(io_err(&dir))?;
                if let Some(u) = user {
                    nix::unistd::chown(
                        &dir,
                        Some(Uid::from_raw(u.uid)),
                        Some(Gid::from_raw(u.gid)),
                    )
                    .map_err(|e| io_err(&dir)(e.into()))?;
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        }
    }
    Err(io_err(&tmp)(io::Error::other(
        "no free build directory name",
    )))
}

/// Start the builder. `store_root` is the store's root (`/` for the real store);
/// `log_path` the final `.bz2` log file.
pub fn start_builder(
    store_root: &Path,
    store_dir: &str,
    spawn: &Spawn,
    build_dir: PathBuf,
    user: Option<BuildUser>,
    log_path: PathBuf,
    sandbox: Option<&SandboxPlan>,
) -> Result<RunningBuild, ExecError> {
    let root_is_slash = store_root == Path::new("/");
    let is_root = Uid::effective().is_root();
    if !root_is_slash && sandbox.is_none() && !is_root {
        return Err(ExecError::NeedRoot(store_root.display().to_string()));
    }
    // The builder's host identity: the build user, else the caller.
    let host_ids = user
        .as_ref()
        .map(|u| (u.uid, u.gid))
        .unwrap_or_else(|| (Uid::effective().as_raw(), Gid::effective().as_raw()));
    let (step_reader, step_writer) = io::pipe().map_err(io_err(&build_dir))?;
    let sandbox_setup = match sandbox {
        Some(plan) => {
            let mut setup = prepare_root(plan, user.as_ref(), host_ids)?;
            setup.step_fd = step_writer.as_raw_fd();
            Some(setup)
        }
        None => None,
    };
    for (name, contents) in &spawn.files {
        let p = build_dir.join(name);
        fs::write(&p, contents).map_err(io_err(&p))?;
        if let Some(u) = &user {
            nix::unistd::chown(&p, Some(Uid::from_raw(u.uid)), Some(Gid::from_raw(u.gid)))
                .map_err(|e| io_err(&p)(e.into()))?;
        }
    }
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let log_tmp = log_path.with_extension(format!("tmp.{}", std::process::id()));
    let log_file = File::create(&log_tmp).map_err(io_err(&log_tmp))?;

    // Read-write, as Nix opens it.
    let dev_null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_err(Path::new("/dev/null")))?;
    let (reader, writer) = io::pipe().map_err(io_err(&build_dir))?;
    let writer2 = writer.try_clone().map_err(io_err(&build_dir))?;
    let program = OsStr::from_bytes(&spawn.program);
    let mut cmd = Command::new(program);
    if let Some((argv0, rest)) = spawn.argv.split_first() {
        cmd.arg0(OsStr::from_bytes(argv0));
        cmd.args(rest.iter().map(|a| OsStr::from_bytes(a)));
    }
    cmd.env_clear()
        .envs(
            spawn
                .env
                .iter()
                .map(|(k, v)| (OsStr::from_bytes(k), OsStr::from_bytes(v))),
        )
        .current_dir(&build_dir)
        .stdin(dev_null)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2))
        .process_group(0);

    // Everything the child needs is prepared here: after fork only system calls.
    let real_store = cstring(store_root.join("nix/store").as_os_str().as_bytes())?;
    let logical_store = cstring(store_dir.as_bytes())?;
    if !root_is_slash {
        fs::create_dir_all(store_dir).map_err(io_err(Path::new(store_dir)))?;
    }
    let ids = user.as_ref().map(|u| (u.uid, u.gid));
    let none = cstring(b"none")?;
    let slash = cstring(b"/")?;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            close_inherited_fds();
            if let Some(setup) = &sandbox_setup {
                return enter_sandbox(setup);
            }
            if is_root {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::mount(
                    none.as_ptr(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if !root_is_slash
                    && libc::mount(
                        real_store.as_ptr(),
                        logical_store.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            drop_privileges(ids)
        });
    }
    let spawned = cmd.spawn();
    drop(step_writer);
    if spawned.is_err() {
        // Nothing of a build that never started stays behind.
        if let Some(plan) = sandbox {
            recycle_root(&plan.root);
        }
        let _ = firn_store::canonical::delete_path(&build_dir);
        let _ = fs::remove_file(&log_tmp);
    }
    let child = spawned.map_err(|source| {
        // The sandbox's set-up names the step that failed.
        let mut step = String::new();
        let _ = (&step_reader).take(256).read_to_string(&mut step);
        if step.is_empty() {
            ExecError::Spawn {
                program: String::from_utf8_lossy(&spawn.program).into_owned(),
                source,
            }
        } else {
            ExecError::SandboxSetup { step, source }
        }
    })?;
    // Close our copies of the write end: EOF then means every writer is gone.
    drop(cmd);
    let now = Instant::now();
    Ok(RunningBuild {
        child,
        log: reader,
        build_dir,
        started: now,
        last_output: now,
        user,
        log_size: 0,
        tail: VecDeque::new(),
        partial: Vec::new(),
        log_file: Some(LogSink(bzip2::write::BzEncoder::new(
            log_file,
            bzip2::Compression::default(),
        ))),
        log_tmp,
        log_path,
        status: None,
        sandboxed: sandbox.is_some(),
        eof: false,
    })
}

/// Descriptors firn inherited from its own caller must not reach the builder (Nix's
/// `closeMostFDs`): mark everything above stderr close-on-exec. Closing them outright
/// is not possible here: `Command` reports a failed exec through one of them.
fn close_inherited_fds() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: plain system calls on descriptor numbers.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            // Kernels before 5.11: one fcntl per possible descriptor.
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(0, 65536) as i32;
            for fd in 3..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
}

/// Become the build user (no supplementary groups).
///
/// # Safety
/// Only for a freshly forked child: it changes the process's identity.
unsafe fn drop_privileges(ids: Option<(u32, u32)>) -> io::Result<()> {
    if let Some((uid, gid)) = ids {
        // SAFETY: plain system calls.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::umask(0o022);
    }
    Ok(())
}

/// How many lines of output to keep for messages.
const TAIL_LINES: usize = 10;

impl RunningBuild {
    /// Read what is available on the log pipe (the caller polled it readable). Returns
    /// the bytes read (empty at EOF).
    pub fn read_log(&mut self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        let n = match self.log.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        buf.truncate(n);
        if n == 0 {
            self.eof = true;
            return Ok(buf);
        }
        self.last_output = Instant::now();
        self.log_size += n as u64;
        if let Some(f) = &mut self.log_file {
            f.0.write_all(&buf)?;
        }
        for &b in &buf {
            match b {
                b'\n' => {
                    let line = String::from_utf8_lossy(&self.partial).into_owned();
                    self.partial.clear();
                    self.tail.push_back(line);
                    if self.tail.len() > TAIL_LINES {
                        self.tail.pop_front();
                    }
                }
                // A carriage return rewinds the line, as on a terminal.
                b'\r' => self.partial.clear(),
                _ => self.partial.push(b),
            }
        }
        Ok(buf)
    }

    /// Kill the builder and everything it started.
    pub fn kill(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: plain system calls on our child's process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        if let Some(u) = &self.user {
            kill_user(u.uid);
        }
        if let Ok(status) = self.child.wait() {
            self.status = Some(status);
        }
    }

    /// Finish the log file (rename into place) and, unless `keep`, remove the build dir.
    pub fn finish(&mut self, keep_build_dir: bool) -> io::Result<()> {
        // The builder is done: nothing it left running may outlive the build. In the
        // sandbox the PID namespace saw to that when its PID 1 exited.
        if let Some(u) = self.user.as_ref().filter(|_| !self.sandboxed) {
            kill_user(u.uid);
        }
        let pid = self.child.id() as i32;
        // SAFETY: as in `kill`.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        if let Some(LogSink(enc)) = self.log_file.take() {
            // Not synced: a log is not store content, and an fsync per build is
            // a measurable part of a trivial build.
            enc.finish()?;
            fs::rename(&self.log_tmp, &self.log_path)?;
        }
        if !keep_build_dir {
            firn_store::canonical::delete_path(&self.build_dir)?;
        } else {
            let _ = fs::set_permissions(&self.build_dir, fs::Permissions::from_mode(0o755));
        }
        Ok(())
    }

    pub fn log_fd(&self) -> i32 {
        self.log.as_raw_fd()
    }
}

//! Every `unsafe` of firn-build (the crate denies `unsafe_code` everywhere else): small
//! wrappers around the system calls a builder's child makes between `fork` and `exec`,
//! each with the reason it is sound.
//!
//! All of them can be called after `fork`: they do not allocate and take no lock. Their
//! arguments are `&CStr`s, slices and descriptors prepared before the fork; their errors
//! are [`Errno`]s (a number; `io::Error::from(Errno)` does not allocate either). They use
//! the `nix` crate where its function does not allocate — path arguments are `&CStr`,
//! which nix's `NixPath` hands to the kernel as they are (its `[u8]`, `str` and `Path`
//! impls copy into a stack buffer and allocate from 1024 bytes on), and ids and
//! descriptors are plain integers — and `libc` otherwise (raw `clone`, `setdomainname`,
//! `personality`, `setrlimit`, `umask`, the `SIOCSIFFLAGS` ioctl, seccomp, `close_range`,
//! `_exit`, `waitpid` with the raw status).
//!
//! What runs in the forked child is a [`ChildSetup`] (the local builder's `BeforeExec`,
//! the only one): [`run_before_exec`] registers its `run` and hands it the [`Forked`]
//! token, which is what allows the raw [`clone_into`] (a second return into Rust code)
//! to be a safe function.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc::{self, c_int, c_ulong};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::sys::statvfs::FsFlags;
use nix::unistd::{Gid, Pid, Uid};

/// Proof that the code holding it runs in the child forked by [`Command::spawn`] before
/// `exec`, under [`run_before_exec`]'s rules: one thread, no allocation, no locks. Only
/// [`run_before_exec`] makes one.
#[derive(Debug)]
pub(crate) struct Forked(());

/// What a forked child runs before exec. Implementing it is a promise: `run` and all it
/// calls make system calls (through this module, or nix functions on integers and
/// `&CStr`s) on data prepared before the fork, and never allocate or lock. The one
/// implementation is `BeforeExec` in `local.rs` (and `sandbox/child.rs` under it).
pub(crate) trait ChildSetup: Send + Sync + 'static {
    fn run(&self, forked: &Forked) -> std::io::Result<()>;
}

/// Have `cmd`'s forked child run `setup` before it execs.
pub(crate) fn run_before_exec(cmd: &mut Command, setup: impl ChildSetup) {
    // SAFETY: the closure runs in the child `Command::spawn` forks, where only
    // async-signal-safe code may run. It runs `ChildSetup::run` and only that, whose
    // implementations promise (see the trait) to make system calls on data prepared
    // before the fork and never allocate or lock: `BeforeExec::run` (local.rs) and
    // `sandbox/child.rs`. Whoever changes them keeps that true.
    unsafe {
        cmd.pre_exec(move || setup.run(&Forked(())));
    }
}

/// Which side of [`clone_into`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cloned {
    /// The caller, with the new process's pid (in the caller's PID namespace).
    Parent(Pid),
    /// The new process.
    Child,
}

/// The raw `clone` system call with `flags | SIGCHLD` and no new stack: like `fork`
/// (copy-on-write memory; it returns in both processes) but into the new namespaces
/// `flags` ask for. glibc's `fork` handlers do not run.
pub(crate) fn clone_into(_forked: &Forked, flags: CloneFlags) -> Result<Cloned, Errno> {
    // SAFETY: without `CLONE_VM` and a stack the child runs on a copy of this process's
    // memory, as after `fork`, and returns here like `fork` does. The `Forked` token
    // says this process is a forked child before exec, with one thread and bound to
    // async-signal-safe code: both processes go on under those rules.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags.bits() | libc::SIGCHLD) as c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    Ok(match Errno::result(rc)? {
        0 => Cloned::Child,
        pid => Cloned::Parent(Pid::from_raw(pid as i32)),
    })
}

/// `_exit(code)`: leave now, without destructors or `atexit` handlers.
pub(crate) fn exit(code: c_int) -> ! {
    // SAFETY: `_exit` ends the process; nothing is left to observe the Rust state.
    unsafe { libc::_exit(code) }
}

/// One `waitpid(pid, 0)` (not retried on `EINTR`): the raw status.
pub(crate) fn waitpid_raw(pid: Pid) -> Result<c_int, Errno> {
    let mut status = 0;
    // SAFETY: `status` is a live local the kernel writes an int to.
    let rc = unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
    Errno::result(rc).map(|_| status)
}

/// `waitpid(-pgid)`: a child of this process in the process group `pgid` that has
/// exited, and its raw status; without `block`, `Ok(None)` if none has yet. `ECHILD`
/// once none is left. Retried on `EINTR`.
pub(crate) fn wait_group(pgid: Pid, block: bool) -> Result<Option<(Pid, c_int)>, Errno> {
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        let mut status = 0;
        // SAFETY: `status` is a live local the kernel writes an int to.
        let rc = unsafe { libc::waitpid(-pgid.as_raw(), &mut status, flags) };
        match Errno::result(rc) {
            Ok(0) => return Ok(None),
            Ok(pid) => return Ok(Some((Pid::from_raw(pid), status))),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Kill every process of `uid` (Nix's `killUser`): a forked child becomes `uid` and
/// sends `SIGKILL` to everything it may signal (`kill(-1)`, retried only on `EINTR`);
/// the caller waits for it. Nothing happens if the fork fails.
pub(crate) fn kill_every_process_of(uid: Uid) {
    // SAFETY: the child makes only system calls (`setuid`, `kill`) and `_exit`s: it
    // never returns into Rust code, so the state `fork` copied (locks held by other
    // threads included) is never touched.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        if nix::unistd::setuid(uid).is_ok() {
            while kill(Pid::from_raw(-1), Signal::SIGKILL) == Err(Errno::EINTR) {}
        }
        exit(0);
    }
    if pid > 0 {
        let _ = waitpid_raw(Pid::from_raw(pid));
    }
}

/// Mark every descriptor above stderr close-on-exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`; before Linux 5.11, one `fcntl` per possible descriptor).
pub(crate) fn cloexec_fds_above_stderr() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: system calls on descriptor numbers; close-on-exec leaves every descriptor
    // valid until exec, so nothing that owns one is affected.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(0, 65536) as i32;
            for fd in 3..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
}

/// Close every descriptor above stderr but those in `keep` (`close_range` over the gaps;
/// `keep` need not be sorted and may hold at most 8 descriptors, the rest are ignored).
pub(crate) fn close_fds_except(keep: &[RawFd]) {
    let mut sorted = [RawFd::MAX; 8];
    let n = keep.len().min(sorted.len());
    sorted[..n].copy_from_slice(&keep[..n]);
    sorted[..n].sort_unstable();
    let mut from: u32 = 3;
    for &fd in &sorted[..n] {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd >= from {
            if fd > from {
                // SAFETY: closes descriptor numbers; the process that calls this never
                // returns into Rust code that owns them (it execs or exits).
                unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
            }
            from = fd + 1;
        }
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

/// A program, its arguments and its environment as `execve(2)` takes them, made before
/// the fork so that the child only makes the call.
pub(crate) struct ExecArgs {
    path: std::ffi::CString,
    /// Owns what `argv` and `envp` point to.
    _strings: Vec<std::ffi::CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into the heap buffers of `_strings`, owned by the same
// value and never changed or freed while it lives; they are only read (by `execve`).
unsafe impl Send for ExecArgs {}
// SAFETY: as for `Send`: nothing is ever written through the pointers.
unsafe impl Sync for ExecArgs {}

impl std::fmt::Debug for ExecArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecArgs")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ExecArgs {
    pub(crate) fn new(
        path: std::ffi::CString,
        argv: Vec<std::ffi::CString>,
        envp: Vec<std::ffi::CString>,
    ) -> Self {
        let ptrs = |v: &[std::ffi::CString]| {
            let mut p: Vec<*const libc::c_char> = v.iter().map(|s| s.as_ptr()).collect();
            p.push(std::ptr::null());
            p
        };
        let (argv_ptrs, envp_ptrs) = (ptrs(&argv), ptrs(&envp));
        let mut strings = argv;
        strings.extend(envp);
        Self {
            path,
            _strings: strings,
            argv: argv_ptrs,
            envp: envp_ptrs,
        }
    }

    /// `execve`: returns only if it failed, with why.
    pub(crate) fn exec(&self) -> Errno {
        // SAFETY: `path` is a C string; `argv` and `envp` are null-terminated arrays of
        // pointers to C strings this value owns (moving a `CString` into `_strings`
        // does not move its buffer).
        unsafe { libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
        Errno::last()
    }
}

/// `write(fd, buf)` on a descriptor number (the step pipe, whose owner outlives the
/// fork).
pub(crate) fn write_raw(fd: RawFd, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: the kernel reads `buf.len()` bytes of a live slice; a descriptor that is
    // not open is an error, not undefined behaviour.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    Errno::result(n).map(|n| n as usize)
}

/// Write `data` to `/proc/<pid>/<name>` in one `write` (the user namespace's id maps;
/// the kernel takes each of them in one write only). The path is built in a stack
/// buffer. A short write fails with the `errno` left by the call, as before.
pub(crate) fn write_proc_file(pid: Pid, name: &[u8], data: &[u8]) -> Result<(), Errno> {
    let mut buf = [0u8; 64];
    let path = proc_path(&mut buf, pid, name);
    let raw = nix::fcntl::open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    match nix::unistd::write(&fd, data) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(_) => Err(Errno::last()),
        Err(e) => Err(e),
    }
}

/// Write `data` to the file `path` in one `write` (joining a cgroup: `0` to its
/// `cgroup.procs`).
pub(crate) fn write_path(path: &CStr, data: &[u8]) -> Result<(), Errno> {
    let raw = nix::fcntl::open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    match nix::unistd::write(&fd, data) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(_) => Err(Errno::EIO),
        Err(e) => Err(e),
    }
}

/// `/proc/<pid>/<name>` as a C string in `buf` (cut to fit), without allocating.
fn proc_path<'b>(buf: &'b mut [u8; 64], pid: Pid, name: &[u8]) -> &'b CStr {
    let mut digits = [0u8; 12];
    let mut n = pid.as_raw().unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut len = 0;
    for part in [b"/proc/".as_slice(), &digits[i..], b"/", name] {
        for &b in part {
            if len < buf.len() - 1 {
                buf[len] = b;
                len += 1;
            }
        }
    }
    buf[len] = 0;
    // A NUL was just written at `len`; if `name` holds one, the path ends there.
    CStr::from_bytes_until_nul(&buf[..=len]).unwrap_or(c"")
}

/// `mount(2)` with `&CStr` arguments (nix passes them through without copying).
pub(crate) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: MsFlags,
    data: Option<&CStr>,
) -> Result<(), Errno> {
    nix::mount::mount(source, target, fstype, flags, data)
}

/// Bind-remount `target` read-only, keeping the flags its mount already has: in a user
/// namespace the flags inherited from the host (nosuid, nodev, noexec, atime) are locked
/// and a remount that would clear them fails.
pub(crate) fn remount_read_only(target: &CStr) -> Result<(), Errno> {
    let st = nix::sys::statvfs::statvfs(target)?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (st_flag, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st.flags().contains(st_flag) {
            flags |= ms;
        }
    }
    mount(None, target, None, flags, None)
}

/// Mount an overlay (`options`) on `target` from a short-lived child whose file-system
/// ids are `uid`:`gid` — the kernel refuses an overlay to a mounter whose uid the user
/// namespace does not map —, leaving the caller's credentials alone. Whether it was
/// mounted.
pub(crate) fn mount_overlay_as(target: &CStr, options: &CStr, uid: Uid, gid: Gid) -> bool {
    // SAFETY: a raw clone without a stack is `fork` without glibc's handlers. The child
    // makes only system calls and `_exit`s: it never returns into Rust code.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::SIGCHLD as c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    } as i32;
    if rc == 0 {
        nix::unistd::setfsgid(gid);
        nix::unistd::setfsuid(uid);
        let mounted = mount(
            Some(c"overlay"),
            target,
            Some(c"overlay"),
            MsFlags::empty(),
            Some(options),
        );
        exit(if mounted.is_ok() { 0 } else { 1 });
    }
    rc > 0
        && waitpid_raw(Pid::from_raw(rc))
            .is_ok_and(|status| libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
}

/// `mkdir(path, mode)`.
pub(crate) fn mkdir(path: &CStr, mode: Mode) -> Result<(), Errno> {
    nix::unistd::mkdir(path, mode)
}

/// `chdir(path)`.
pub(crate) fn chdir(path: &CStr) -> Result<(), Errno> {
    nix::unistd::chdir(path)
}

/// `pivot_root(new_root, put_old)`.
pub(crate) fn pivot_root(new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
    nix::unistd::pivot_root(new_root, put_old)
}

/// `chroot(path)`.
pub(crate) fn chroot(path: &CStr) -> Result<(), Errno> {
    nix::unistd::chroot(path)
}

/// `umount2(target, MNT_DETACH)`.
pub(crate) fn detach(target: &CStr) -> Result<(), Errno> {
    nix::mount::umount2(target, MntFlags::MNT_DETACH)
}

/// `sethostname(name)` and `setdomainname(domain)`, stopping at the first failure.
pub(crate) fn set_host_and_domain_names(name: &CStr, domain: &CStr) -> Result<(), Errno> {
    nix::unistd::sethostname(OsStr::from_bytes(name.to_bytes()))?;
    let domain = domain.to_bytes();
    // SAFETY: the kernel reads `domain.len()` bytes of a live buffer.
    let rc = unsafe { libc::setdomainname(domain.as_ptr().cast(), domain.len()) };
    Errno::result(rc).map(drop)
}

/// `personality(ADDR_NO_RANDOMIZE)`, as Nix (the result is not checked, as in Nix).
pub(crate) fn disable_address_randomization() {
    // SAFETY: sets a flag of this process; no memory is passed.
    unsafe { libc::personality(libc::ADDR_NO_RANDOMIZE as c_ulong) };
}

/// No core dumps: `RLIMIT_CORE` soft limit 0. Nix asks for `{0, RLIM_INFINITY}` and
/// ignores the result, which fails as a whole where the hard limit is finite (only the
/// initial namespace's root may raise it), leaving core dumps on; firn keeps the hard
/// limit it has, so the soft limit always drops to 0.
pub(crate) fn disable_core_dumps() {
    let mut core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: the kernel fills a live local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut core) } == 0 {
        core.rlim_cur = 0;
    } else {
        core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
    }
    // SAFETY: the kernel reads a live local struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &core) };
}

/// `umask(mode)` (libc's: nix's panics on a mode it does not know, which must not
/// happen after fork).
pub(crate) fn set_umask(mode: libc::mode_t) {
    // SAFETY: sets a field of this process; always succeeds.
    unsafe { libc::umask(mode) };
}

/// A close-on-exec `AF_INET` datagram socket (to bring an interface up).
pub(crate) fn inet_socket() -> Result<OwnedFd, Errno> {
    // SAFETY: no memory is passed.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let fd = Errno::result(fd)?;
    // SAFETY: `socket` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Set `lo` up (`IFF_UP | IFF_LOOPBACK | IFF_RUNNING`) through `sock`
/// (`SIOCSIFFLAGS`).
pub(crate) fn bring_up_loopback(sock: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: `ifreq` is plain data, for which all zeros is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        ifr.ifr_name[i] = *b as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: `SIOCSIFFLAGS` reads an `ifreq`, and `ifr` is a live one.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) };
    Errno::result(rc).map(drop)
}

/// Install `filter` as this thread's seccomp filter (`PR_SET_SECCOMP`,
/// `SECCOMP_MODE_FILTER`); the kernel checks the program. Needs `no_new_privs` (or
/// `CAP_SYS_ADMIN`). A program longer than 65535 instructions is `EINVAL`.
pub(crate) fn install_seccomp_filter(filter: &[libc::sock_filter]) -> Result<(), Errno> {
    let len = u16::try_from(filter.len()).map_err(|_| Errno::EINVAL)?;
    let prog = libc::sock_fprog {
        len,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies `len` instructions from a live slice during the call
    // (the `*mut` is the C type's; nothing writes through it).
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    Errno::result(rc).map(drop)
}

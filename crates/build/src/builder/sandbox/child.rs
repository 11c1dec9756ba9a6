//! The sandbox's child side: after the fork, clone the builder into its namespaces and
//! set everything up before exec ([`enter_sandbox`]). The steps, in order, are in
//! docs/build.md.
//!
//! Everything the child does after the fork is a plain system call on data prepared
//! before it (C strings, the seccomp program): no allocation, no locks.

use std::ffi::CString;
use std::io;

use nix::libc;

use super::plan::{SANDBOX_GID, SANDBOX_UID};

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

/// `/proc/<pid>/<name>` as a C string in `buf`, without allocating (after fork).
fn proc_file<'b>(buf: &'b mut [u8; 64], pid: i32, name: &[u8]) -> &'b libc::c_char {
    let mut digits = [0u8; 12];
    let mut n = pid.unsigned_abs();
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
    // SAFETY: reinterpreting a u8 as a c_char.
    unsafe { &*(buf.as_ptr().cast::<libc::c_char>()) }
}

/// Write `data` to `/proc/<pid>/<name>` (the user namespace's id maps).
///
/// # Safety
/// After fork: system calls only.
unsafe fn write_proc_file(pid: i32, name: &[u8], data: &[u8]) -> io::Result<()> {
    let mut buf = [0u8; 64];
    let path = proc_file(&mut buf, pid, name);
    // SAFETY: a NUL-terminated path and a live buffer.
    unsafe {
        let fd = libc::open(path, libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n != data.len() as isize {
            return Err(err);
        }
    }
    Ok(())
}

/// Bind-remount `dst` read-only, keeping the flags its mount already has: in a user
/// namespace the flags inherited from the host (nosuid, nodev, noexec, atime) are locked
/// and a remount that would clear them fails.
///
/// # Safety
/// After fork: system calls only.
unsafe fn remount_read_only(dst: &CString) -> io::Result<()> {
    // SAFETY: plain system calls on a C string and a local struct.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(dst.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
        for (st_flag, ms) in [
            (libc::ST_NOSUID, libc::MS_NOSUID),
            (libc::ST_NODEV, libc::MS_NODEV),
            (libc::ST_NOEXEC, libc::MS_NOEXEC),
            (libc::ST_NOATIME, libc::MS_NOATIME),
            (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
            (libc::ST_RELATIME, libc::MS_RELATIME),
        ] {
            if st.f_flag & st_flag != 0 {
                flags |= ms;
            }
        }
        if libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
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
/// # Safety
/// Only for a freshly forked child; async-signal-safe calls only.
pub(crate) unsafe fn enter_sandbox(s: &SandboxSetup) -> io::Result<()> {
    // Say which step failed on the step pipe (the parent turns it into the message),
    // then fail with the step's errno.
    let fail = |step: &'static [u8]| {
        let e = io::Error::last_os_error();
        // SAFETY: writing a static buffer to our pipe.
        unsafe { libc::write(s.step_fd, step.as_ptr().cast(), step.len()) };
        Err(e)
    };
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: system calls on C strings prepared before the fork.
    unsafe {
        // No supplementary groups leak into the sandbox (only root may drop them; for
        // anyone else `setgroups deny` hides them).
        libc::setgroups(0, std::ptr::null());
        let mut sync = [0i32; 2];
        if libc::pipe2(sync.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return fail(b"making a pipe");
        }
        let mut flags = libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        if s.private_network {
            flags |= libc::CLONE_NEWNET;
        }
        // Like fork (no new stack, copy-on-write memory) but into the new namespaces.
        let pid = libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        ) as i32;
        if pid < 0 {
            return fail(b"creating the user, mount, PID, IPC, UTS and network namespaces");
        }
        if pid > 0 {
            libc::close(sync[0]);
            let maps = write_proc_file(pid, b"setgroups", b"deny")
                .and_then(|()| write_proc_file(pid, b"uid_map", &s.uid_map))
                .and_then(|()| write_proc_file(pid, b"gid_map", &s.gid_map));
            if let Err(e) = maps {
                let step = b"writing the user namespace's id maps";
                libc::write(s.step_fd, step.as_ptr().cast(), step.len());
                libc::kill(pid, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                return Err(e);
            }
            libc::write(sync[1], b"1".as_ptr().cast(), 1);
            libc::close(sync[1]);
            // The shim: wait for the builder and leave the same way. It closes every
            // descriptor but the standard ones first: among them is the pipe on which
            // `Command::spawn` waits for the exec, which must not stay open for the
            // whole build (firn would not read the log meanwhile and the builder would
            // block on a full pipe).
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let mut status = 0;
            while libc::waitpid(pid, &mut status, 0) < 0 {
                if *libc::__errno_location() != libc::EINTR {
                    libc::_exit(1);
                }
            }
            if libc::WIFEXITED(status) {
                libc::_exit(libc::WEXITSTATUS(status));
            }
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        // PID 1 of the new namespaces: it dies with the shim, everything else with it.
        libc::close(sync[1]);
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return fail(b"setting the parent-death signal");
        }
        // Wait for the id maps; EOF means the shim failed (and said why) or died.
        let mut byte = 0u8;
        if libc::read(sync[0], (&mut byte as *mut u8).cast(), 1) != 1 {
            libc::_exit(1);
        }
        libc::close(sync[0]);
        if libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return fail(b"making the mounts private");
        }
        // pivot_root needs the new root to be a mount point.
        if libc::mount(
            s.root.as_ptr(),
            s.root.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return fail(b"bind-mounting the root onto itself");
        }
        if let Some((target, opts)) = &s.overlay {
            // The kernel refuses an overlay to a mounter whose uid the user namespace
            // does not map (this process is host root, unmapped): a short-lived child
            // in the same namespaces mounts it as the builder's (mapped) ids, leaving
            // this process's credentials alone. Raw clone, like fork without glibc's
            // atfork handlers.
            let helper = libc::syscall(
                libc::SYS_clone,
                libc::SIGCHLD as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            ) as i32;
            if helper == 0 {
                libc::setfsgid(SANDBOX_GID);
                libc::setfsuid(SANDBOX_UID);
                let rc = libc::mount(
                    c"overlay".as_ptr(),
                    target.as_ptr(),
                    c"overlay".as_ptr(),
                    0,
                    opts.as_ptr().cast(),
                );
                libc::_exit(if rc == 0 { 0 } else { 1 });
            }
            let mut status = 0;
            let mounted = helper > 0
                && libc::waitpid(helper, &mut status, 0) == helper
                && libc::WIFEXITED(status)
                && libc::WEXITSTATUS(status) == 0;
            if !mounted {
                // No overlay here: the mount points go on the disk after all.
                for (_, dst, _) in &s.input_binds {
                    if libc::mkdir(dst.as_ptr(), 0o555) != 0 {
                        return fail(b"making a mount point for an input");
                    }
                }
            }
        }
        for (src, dst, ro) in s.input_binds.iter().chain(&s.binds) {
            if libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return fail(b"bind-mounting an input or sandbox path");
            }
            if *ro && remount_read_only(dst).is_err() {
                return fail(b"making an input or sandbox path read-only");
            }
        }
        if libc::mount(
            c"proc".as_ptr(),
            s.proc_dir.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            return fail(b"mounting /proc");
        }
        for (path, kind) in &s.proc_masks {
            let ok = match kind {
                MaskKind::File => {
                    libc::mount(
                        c"/dev/null".as_ptr(),
                        path.as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) == 0
                }
                MaskKind::Dir => {
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        path.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"size=0".as_ptr().cast(),
                    ) == 0
                }
                MaskKind::ReadOnly => {
                    libc::mount(
                        path.as_ptr(),
                        path.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) == 0
                        && remount_read_only(path).is_ok()
                }
            };
            if !ok {
                return fail(b"masking /proc");
            }
        }
        if libc::mount(
            c"tmpfs".as_ptr(),
            s.shm_dir.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=1777".as_ptr().cast(),
        ) != 0
        {
            return fail(b"mounting /dev/shm");
        }
        // A private devpts; without one the builder simply has no ptys.
        libc::mount(
            c"devpts".as_ptr(),
            s.pts_dir.as_ptr(),
            c"devpts".as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            c"newinstance,mode=0620,ptmxmode=0666".as_ptr().cast(),
        );
        if s.private_network {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return fail(b"opening a socket to bring up lo");
            }
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (i, b) in b"lo".iter().enumerate() {
                ifr.ifr_name[i] = *b as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags =
                (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) != 0 {
                return fail(b"bringing up lo");
            }
            libc::close(fd);
        }
        if libc::sethostname(c"localhost".as_ptr(), 9) != 0
            || libc::setdomainname(c"(none)".as_ptr(), 6) != 0
        {
            return fail(b"setting the host and domain names");
        }
        if libc::chdir(s.root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), s.put_old.as_ptr()) != 0
            || libc::chroot(c".".as_ptr()) != 0
            || libc::umount2(s.put_old_inside.as_ptr(), libc::MNT_DETACH) != 0
        {
            return fail(b"pivoting into the root");
        }
        if libc::chdir(s.build_dir.as_ptr()) != 0 {
            return fail(b"entering /build");
        }
        libc::personality(0x0040000); // ADDR_NO_RANDOMIZE, as Nix
        let core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &core);
        // Nix's sandbox identity; supplementary groups cannot be set (setgroups deny).
        if libc::setgid(SANDBOX_GID) != 0 || libc::setuid(SANDBOX_UID) != 0 {
            return fail(b"becoming uid 1000, gid 100");
        }
        libc::umask(0o022);
        // No privilege can be gained back through exec (setuid binaries, file caps),
        // and the filter holds for everything the builder starts.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(b"setting no_new_privs");
        }
        let prog = libc::sock_fprog {
            len: s.seccomp.len() as u16,
            filter: s.seccomp.as_ptr() as *mut libc::sock_filter,
        };
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            return fail(b"installing the seccomp filter");
        }
        Ok(())
    }
}

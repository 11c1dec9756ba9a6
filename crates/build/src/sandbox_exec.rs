//! The system-call side of the sandbox: laying out the root that `sandbox::plan_sandbox`
//! planned (reusing spare roots of earlier builds, hard-linking file inputs, putting
//! the mount points of many directory inputs on a tmpfs under an overlay), and, in the
//! forked child, cloning the builder into its namespaces and setting everything up
//! before exec (`enter_sandbox`). The steps, in order, are in docs/build.md.
//!
//! Everything the child does after the fork is a plain system call on data prepared
//! before it (C strings, the seccomp program): no allocation, no locks.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::libc;
use nix::unistd::{Gid, Uid};

use crate::executor::{cstring, io_err, BuildUser, ExecError};
use crate::sandbox::SandboxPlan;

/// The seccomp filter Nix 2.8 installs, as classic BPF: `chmod`, `fchmod`, `fchmodat`
/// (and `fchmodat2`) with a setuid or setgid bit fail with `EPERM`; `setxattr`,
/// `lsetxattr`, `fsetxattr` fail with `ENOTSUP`; everything else is allowed. The same
/// rules cover the three ABIs an x86_64 kernel runs: x86_64, x32 (x86_64 numbers with
/// bit 30 set) and i386 (`int 0x80`, its own numbers), as libseccomp does for Nix. Built
/// before the fork (it allocates).
pub fn seccomp_filter() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let allow = stmt(RET_K, libc::SECCOMP_RET_ALLOW);
    let errno = |e: i32| {
        stmt(
            RET_K,
            libc::SECCOMP_RET_ERRNO | (e as u32 & libc::SECCOMP_RET_DATA),
        )
    };
    // seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low word first).
    let arg_low = |i: u32| 16 + 8 * i;
    let suid_bits = libc::S_ISUID | libc::S_ISGID;
    // One ABI's rules, given its numbers: (chmod-like calls with their mode argument,
    // xattr-setting calls); ends by allowing everything else.
    let section = |chmods: [(u32, u32); 4], xattrs: [u32; 3], strip_x32: bool| {
        let mut f = vec![stmt(LD_W_ABS, 0)];
        if strip_x32 {
            f.push(stmt(AND_K, !X32_SYSCALL_BIT));
        }
        for (nr, mode_arg) in chmods {
            // If nr matches: load the mode; deny if setuid/setgid, else allow.
            f.push(jump(JEQ_K, nr, 0, 4));
            f.push(stmt(LD_W_ABS, arg_low(mode_arg)));
            f.push(jump(JSET_K, suid_bits, 0, 1));
            f.push(errno(libc::EPERM));
            f.push(allow);
        }
        for nr in xattrs {
            f.push(jump(JEQ_K, nr, 0, 1));
            f.push(errno(libc::ENOTSUP));
        }
        f.push(allow);
        f
    };
    let x86_64 = section(
        [
            (libc::SYS_chmod as u32, 1),
            (libc::SYS_fchmod as u32, 1),
            (libc::SYS_fchmodat as u32, 2),
            (452 /* fchmodat2 */, 2),
        ],
        [
            libc::SYS_setxattr as u32,
            libc::SYS_lsetxattr as u32,
            libc::SYS_fsetxattr as u32,
        ],
        true,
    );
    // i386: chmod 15, fchmod 94, fchmodat 306, fchmodat2 452; setxattr 226-228.
    let i386 = section(
        [(15, 1), (94, 1), (306, 2), (452, 2)],
        [226, 227, 228],
        false,
    );
    let mut f = vec![stmt(LD_W_ABS, 4)];
    f.push(jump(JEQ_K, AUDIT_ARCH_X86_64, 0, x86_64.len() as u8));
    f.extend(x86_64);
    f.push(jump(JEQ_K, AUDIT_ARCH_I386, 0, i386.len() as u8));
    f.extend(i386);
    f.push(allow);
    f
}

/// How one `/proc` entry is masked, for the child (see [`crate::sandbox::ProcMask`]).
#[derive(Debug, Clone, Copy)]
enum MaskKind {
    File,
    Dir,
    ReadOnly,
}

/// Everything `enter_sandbox` needs, as C strings made before the fork.
#[derive(Debug)]
pub(crate) struct SandboxSetup {
    /// The seccomp program (see [`seccomp_filter`]).
    seccomp: Vec<libc::sock_filter>,
    root: CString,
    /// (source, target in the root, read-only).
    binds: Vec<(CString, CString, bool)>,
    /// The overlay for the store dir (target, options), when directory inputs have
    /// their mount points on a tmpfs; if it cannot be mounted, they are made on disk.
    overlay: Option<(CString, CString)>,
    /// Directory inputs: (source, target, read-only), mounted after the overlay.
    input_binds: Vec<(CString, CString, bool)>,
    proc_dir: CString,
    proc_masks: Vec<(CString, MaskKind)>,
    shm_dir: CString,
    pts_dir: CString,
    private_network: bool,
    put_old: CString,
    put_old_inside: CString,
    build_dir: CString,
    /// `1000 <uid> 1` and `100 <gid> 1`: the builder's ids mapped to the build user's
    /// (or the caller's).
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    /// Write end of the pipe on which a failing set-up step names itself.
    pub(crate) step_fd: i32,
}

/// From how many directory inputs on their mount points go on a tmpfs under an overlay.
const OVERLAY_MIN_INPUTS: usize = 16;

/// The tmpfs directory holding a root's mount points for directory inputs (the host's
/// `/dev/shm`, so that making them costs no disk inodes).
fn lower_dir(root: &Path) -> PathBuf {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from(format!(
        "/dev/shm/.firn-lower-{}-{name}",
        std::process::id()
    ))
}

/// Remove the mount-point trees that firn processes killed before they could clean up
/// left in `/dev/shm` (once per process).
fn clean_stale_lowers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir("/dev/shm") else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(".firn-lower-")
                .and_then(|r| r.split('-').next())
            else {
                continue;
            };
            if !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = firn_store::canonical::delete_path(&e.path());
            }
        }
    });
}

/// A sandbox root whose build is over, emptied, kept for the next build of the same
/// layout: making a root's skeleton (`/dev`, `/etc`, links, mount points) takes some 30
/// new inodes, which is most of a trivial build's cost on a slow disk.
#[derive(Debug)]
struct SpareRoot {
    layout: String,
    path: PathBuf,
}

/// A root a build is using: what `recycle_root` needs to empty and file it.
#[derive(Debug)]
struct RootInUse {
    path: PathBuf,
    layout: String,
    /// The store dir inside it (where the inputs' links and mount points are).
    store_inside: PathBuf,
}

/// The roots of this process.
#[derive(Debug)]
struct Roots {
    spare: Vec<SpareRoot>,
    in_use: Vec<RootInUse>,
}

static ROOTS: std::sync::Mutex<Roots> = std::sync::Mutex::new(Roots {
    spare: Vec::new(),
    in_use: Vec::new(),
});

/// Numbers the spare roots' names (unique within the process).
static SPARE_SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What makes two roots interchangeable: everything but the store inputs.
fn layout_key(plan: &SandboxPlan, user: Option<&BuildUser>) -> String {
    let host_binds: Vec<_> = plan
        .binds
        .iter()
        .filter(|b| !b.store_input)
        .map(|b| &b.target)
        .collect();
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        plan.dirs,
        plan.files,
        plan.symlinks,
        host_binds,
        user.map(|u| u.gid)
    )
}

/// The build that used `root` is over (its outputs moved out): empty its store dir and
/// `/tmp` and keep it for the next build of the same layout, or delete it.
pub fn recycle_root(root: &Path) {
    let _ = firn_store::canonical::delete_path(&lower_dir(root));
    let Ok(mut reg) = ROOTS.lock() else {
        let _ = firn_store::canonical::delete_path(root);
        return;
    };
    let Some(i) = reg.in_use.iter().position(|r| r.path == root) else {
        drop(reg);
        let _ = firn_store::canonical::delete_path(root);
        return;
    };
    let RootInUse {
        layout,
        store_inside,
        ..
    } = reg.in_use.swap_remove(i);
    let empty = |dir: &Path| -> io::Result<()> {
        for e in fs::read_dir(dir)? {
            firn_store::canonical::delete_path(&e?.path())?;
        }
        Ok(())
    };
    // Named like a firn temporary (`.<name>.tmp-<pid>`) so that `firn gc` leaves it
    // alone while this process lives and removes it once it is gone.
    let spare = root.with_file_name(format!(
        ".firn-spare-root-{}.tmp-{}",
        SPARE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::process::id()
    ));
    let kept = empty(&store_inside)
        .and_then(|()| empty(&root.join("tmp")))
        .and_then(|()| fs::rename(root, &spare));
    match kept {
        Ok(()) => reg.spare.push(SpareRoot {
            layout,
            path: spare,
        }),
        Err(_) => {
            let _ = firn_store::canonical::delete_path(root);
        }
    }
}

/// Delete the spare roots (at the end of a run).
pub fn drop_spare_roots() {
    if let Ok(mut reg) = ROOTS.lock() {
        for s in reg.spare.drain(..) {
            let _ = firn_store::canonical::delete_path(&s.path);
        }
    }
}

/// Create the sandbox's root on the host (directories, files, mount points) as the plan
/// says, or take a spare one of the same layout; the mounts themselves happen in the
/// child's own mount namespace. `ids` are the host uid and gid the builder runs as.
pub(crate) fn prepare_root(
    plan: &SandboxPlan,
    user: Option<&BuildUser>,
    ids: (u32, u32),
) -> Result<SandboxSetup, ExecError> {
    let root = &plan.root;
    let layout = layout_key(plan, user);
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let store_inside = inside(&plan.store_dir);
    firn_store::canonical::delete_path(root).map_err(io_err(root))?;
    let spare = ROOTS.lock().ok().and_then(|mut reg| {
        let i = reg.spare.iter().position(|s| s.layout == layout)?;
        Some(reg.spare.swap_remove(i))
    });
    let reused = match spare {
        Some(s) => fs::rename(&s.path, root).is_ok(),
        None => false,
    };
    if let Ok(mut reg) = ROOTS.lock() {
        reg.in_use.push(RootInUse {
            path: root.clone(),
            layout,
            store_inside,
        });
    }
    if reused {
        return finish_root(plan, ids, true);
    }
    fs::create_dir_all(root).map_err(io_err(root))?;
    // As Nix: 0750 and group-owned by the build group, so the builder can enter it
    // and nobody else on the host can.
    fs::set_permissions(root, fs::Permissions::from_mode(0o750)).map_err(io_err(root))?;
    let chgrp = |p: &Path| -> Result<(), ExecError> {
        if let Some(u) = user {
            nix::unistd::chown(p, None, Some(Gid::from_raw(u.gid)))
                .map_err(|e| io_err(p)(e.into()))?;
        }
        Ok(())
    };
    chgrp(root)?;
    for (d, mode) in &plan.dirs {
        let p = inside(d);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(io_err(&p))?;
        if *mode == 0o1775 {
            chgrp(&p)?;
        }
    }
    for (f, contents) in &plan.files {
        let p = inside(f);
        fs::write(&p, contents).map_err(io_err(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).map_err(io_err(&p))?;
    }
    for (link, target) in &plan.symlinks {
        let p = inside(link);
        std::os::unix::fs::symlink(target, &p).map_err(io_err(&p))?;
    }
    finish_root(plan, ids, false)
}

/// The per-build part of a root: inputs linked or given mount points (host mount
/// points too unless `reused`), and the C strings the child needs.
fn finish_root(
    plan: &SandboxPlan,
    ids: (u32, u32),
    reused: bool,
) -> Result<SandboxSetup, ExecError> {
    let root = &plan.root;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let c = |p: &Path| cstring(p.as_os_str().as_bytes());
    let mut binds = Vec::new();
    let mut dir_inputs: Vec<&crate::sandbox::Bind> = Vec::new();
    for b in &plan.binds {
        let target = inside(&b.target);
        if b.store_input {
            let meta = fs::symlink_metadata(&b.source).map_err(io_err(&b.source))?;
            // A file or symlink of the store is linked, not mounted (Nix's linkOrCopy):
            // a link is ~40x cheaper than creating a mount point here. It stays
            // read-only for the builder: store files are 0444 and owned by someone the
            // builder is not, and it has no capabilities. If the builder's host uid
            // owns it (a per-user store), it could chmod it: mount it read-only instead.
            if !meta.is_dir() && meta.uid() != ids.0 {
                fs::hard_link(&b.source, &target).map_err(io_err(&target))?;
                continue;
            }
            if meta.is_dir() {
                dir_inputs.push(b);
                continue;
            }
        }
        let meta = match fs::metadata(&b.source) {
            Ok(m) => m,
            Err(_) if b.optional => continue,
            Err(e) => return Err(io_err(&b.source)(e)),
        };
        if reused && !b.store_input && fs::symlink_metadata(&target).is_ok() {
            binds.push((c(&b.source)?, c(&target)?, b.read_only));
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        if meta.is_dir() {
            fs::create_dir_all(&target).map_err(io_err(&target))?;
        } else if fs::symlink_metadata(&target).is_err() {
            File::create(&target).map_err(io_err(&target))?;
        }
        binds.push((c(&b.source)?, c(&target)?, b.read_only));
    }
    // Directory inputs need mount points in the store dir. Many of them: on a tmpfs
    // (an overlay's lower layer, the root's store dir its upper layer, where the
    // outputs land as before), since a directory on the store's disk costs far more
    // than the mount itself; a few: on the disk directly.
    let store_inside = inside(Path::new(&plan.store_dir));
    let lower = lower_dir(root);
    let mut overlay = None;
    if dir_inputs.len() >= OVERLAY_MIN_INPUTS {
        clean_stale_lowers();
        let made = (|| -> io::Result<()> {
            firn_store::canonical::delete_path(&lower)?;
            fs::create_dir(&lower)?;
            for b in &dir_inputs {
                if let Some(name) = b.target.file_name() {
                    fs::create_dir(lower.join(name))?;
                }
            }
            Ok(())
        })();
        let work = root.join("proc/.overlay-work");
        let paths = [&lower, &store_inside, &work].map(|p| p.display().to_string());
        // Overlay options cannot carry these characters in paths.
        let plain = paths.iter().all(|p| !p.contains([',', ':', '\\']));
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            paths[0], paths[1], paths[2]
        );
        let work_ready = fs::create_dir_all(&work).is_ok()
            && nix::unistd::chown(
                &work,
                Some(Uid::from_raw(ids.0)),
                Some(Gid::from_raw(ids.1)),
            )
            .is_ok();
        if made.is_ok() && plain && work_ready {
            overlay = Some((c(&store_inside)?, cstring(opts.as_bytes())?));
        } else {
            let _ = firn_store::canonical::delete_path(&lower);
        }
    }
    let mut input_binds = Vec::new();
    for b in dir_inputs {
        let target = inside(&b.target);
        if overlay.is_none() {
            fs::create_dir(&target).map_err(io_err(&target))?;
        }
        input_binds.push((c(&b.source)?, c(&target)?, b.read_only));
    }
    let mut proc_masks = Vec::new();
    for m in &plan.proc_masks {
        let (p, kind) = match m {
            crate::sandbox::ProcMask::File(p) => (p, MaskKind::File),
            crate::sandbox::ProcMask::Dir(p) => (p, MaskKind::Dir),
            crate::sandbox::ProcMask::ReadOnly(p) => (p, MaskKind::ReadOnly),
        };
        // The kernel that serves the sandbox's /proc is this one: skip what it lacks.
        if fs::symlink_metadata(p).is_ok() {
            proc_masks.push((c(&inside(p))?, kind));
        }
    }
    // The old root is parked on the root's own /tmp and detached from there, which
    // uncovers the empty /tmp again: no extra directory to make and remove per build.
    let put_old = root.join("tmp");
    Ok(SandboxSetup {
        seccomp: seccomp_filter(),
        root: c(root)?,
        binds,
        overlay,
        input_binds,
        proc_dir: c(&inside(Path::new("/proc")))?,
        proc_masks,
        shm_dir: c(&inside(Path::new("/dev/shm")))?,
        pts_dir: c(&inside(Path::new("/dev/pts")))?,
        private_network: plan.private_network,
        put_old: c(&put_old)?,
        put_old_inside: c(Path::new("/tmp"))?,
        build_dir: c(&plan.build_dir)?,
        uid_map: format!("{} {} 1\n", crate::sandbox::SANDBOX_UID, ids.0).into_bytes(),
        gid_map: format!("{} {} 1\n", crate::sandbox::SANDBOX_GID, ids.1).into_bytes(),
        step_fd: -1,
    })
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
                libc::setfsgid(crate::sandbox::SANDBOX_GID);
                libc::setfsuid(crate::sandbox::SANDBOX_UID);
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
        if libc::setgid(crate::sandbox::SANDBOX_GID) != 0
            || libc::setuid(crate::sandbox::SANDBOX_UID) != 0
        {
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

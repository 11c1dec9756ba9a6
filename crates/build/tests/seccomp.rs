//! The sandbox's seccomp filter on every ABI an x86_64 kernel runs: a setuid `fchmod`
//! must fail with EPERM whether it comes through the x86_64, the x32 or the i386
//! (`int 0x80`) entry, an ordinary one must pass, and `fsetxattr` must fail with
//! ENOTSUP. Runs the filter in a forked child (it cannot be removed once installed).
#![allow(clippy::unwrap_used)]
#![cfg(target_arch = "x86_64")]

use std::os::fd::AsRawFd;

use nix::libc;

/// `fchmod` through the i386 entry point (`int 0x80`, syscall 94).
fn fchmod_i386(fd: i32, mode: u32) -> i64 {
    let ret: i64;
    // SAFETY: a system call on our own descriptor; rbx is saved around it (LLVM
    // reserves it) and the registers the kernel clears on int 0x80 are clobbered.
    unsafe {
        std::arch::asm!(
            "xchg {b}, rbx",
            "int 0x80",
            "xchg {b}, rbx",
            b = inout(reg) fd as i64 => _,
            inlateout("rax") 94i64 => ret,
            in("rcx") mode as i64,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        );
    }
    ret
}

/// Whether the kernel runs i386 system calls at all (CONFIG_IA32_EMULATION): try one
/// in a child, which dies if not.
fn has_ia32() -> bool {
    // SAFETY: the child only makes system calls and exits.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let ret: i64;
            std::arch::asm!("int 0x80", inlateout("rax") 20i64 => ret,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _);
            libc::_exit(if ret > 0 { 0 } else { 1 });
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

#[test]
fn filter_covers_x86_64_x32_and_i386() {
    let dir = std::env::temp_dir().join(format!("firn-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::create(dir.join("f")).unwrap();
    let fd = file.as_raw_fd();
    let ia32 = has_ia32();
    if !ia32 {
        eprintln!("SKIPPED (i386 part only): this kernel runs no i386 system calls");
    }
    let filter = firn_build::builder::sandbox::seccomp::seccomp_filter();
    // Each check sets one bit of the exit status when it fails.
    // SAFETY: the child makes system calls and exits.
    let status = unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                libc::_exit(99);
            }
            let errno = || *libc::__errno_location();
            let mut bad = 0;
            if libc::fchmod(fd, 0o4755) == 0 || errno() != libc::EPERM {
                bad |= 1;
            }
            if libc::fchmod(fd, 0o755) != 0 {
                bad |= 2;
            }
            let x32 = libc::syscall(libc::SYS_fchmod | 0x4000_0000, fd, 0o2755);
            if x32 == 0 || errno() != libc::EPERM {
                bad |= 4;
            }
            if ia32 {
                if fchmod_i386(fd, 0o4755) != -(libc::EPERM as i64) {
                    bad |= 8;
                }
                if fchmod_i386(fd, 0o700) != 0 {
                    bad |= 16;
                }
            }
            let r = libc::fsetxattr(fd, c"user.x".as_ptr(), c"v".as_ptr().cast(), 1, 0);
            if r == 0 || errno() != libc::ENOTSUP {
                bad |= 32;
            }
            libc::_exit(bad);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        status
    };
    let _ = std::fs::remove_dir_all(&dir);
    assert!(libc::WIFEXITED(status), "child died: {status}");
    let bad = libc::WEXITSTATUS(status);
    assert_eq!(
        bad, 0,
        "failed checks (1 x86_64 setuid, 2 plain, 4 x32, 8 i386 setuid, 16 i386 plain, 32 xattr, 99 install)"
    );
}

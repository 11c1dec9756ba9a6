//! The seccomp filter Nix 2.8 installs in the sandbox, as a classic BPF program built
//! before the fork (building it allocates; installing it after the fork does not).

use nix::libc;

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

//! A world of its own for a host helper that reads bytes a guest made (`tar2sqfs` packing a
//! builder VM's root): it sees the host's programs and libraries read-only, one writable
//! file (its output), its inherited descriptors (the input pipe, stderr), and nothing else.
//!
//! Between fork and exec the child unshares user, mount, PID, network, IPC and UTS
//! namespaces, maps only its own uid and gid, and forks once more: the outer process stays
//! behind as the handle pen waits on and kills (exiting with the program's status, 128 + N
//! for signal N), the inner one becomes PID 1 of the new PID namespace (it cannot see or
//! signal any host process) and builds a new root on a small tmpfs: `/usr` and the
//! `/lib*`, `/bin`, `/sbin` of hosts without merged `/usr` bound read-only,
//! `/etc/ld.so.cache`, the program itself when it lives elsewhere, and the output file bound
//! at its own path. The old root is detached, the new one remounted read-only. No `/proc`,
//! no `/dev`, no network interface but a down loopback. Capabilities end at exec (a root
//! pen's uid 0 is mapped to itself, so `SECBIT_NOROOT` keeps exec from granting them back
//! and `no_new_privs` rules out set-id and file capabilities): the program cannot undo the
//! read-only binds. Last, a seccomp filter refuses what could widen the jail or reach other
//! processes (mounts, namespaces, nested user namespaces, ptrace, bpf, io_uring...).
//!
//! The same mechanism as virtiofsd's own sandbox (user namespaces), so it works for an
//! ordinary user wherever pen works at all, and as root. `pen doctor` checks it
//! ([`check_user_namespaces`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Host paths bound read-only when present: the programs and their libraries. `/lib`,
/// `/bin`... are symlinks into `/usr` on merged-`/usr` hosts and are then recreated as such.
const READ_ONLY: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
];

/// One step of building the new root, every path prepared before the fork (nothing may
/// allocate between fork and exec).
enum Step {
    Mkdir(CString),
    Symlink {
        target: CString,
        at: CString,
    },
    /// An empty file to bind a file onto.
    Touch(CString),
    Bind {
        from: CString,
        to: CString,
        /// Remount read-only, keeping these flags of the source (a mount namespace owned
        /// by a user namespace may not clear nosuid, nodev, noexec or the atime flags).
        read_only: Option<libc::c_ulong>,
    },
}

/// A prepared confinement for one program writing one output file.
pub struct Jail {
    program: PathBuf,
    output: PathBuf,
    steps: Vec<Step>,
    uid_map: Vec<u8>,
    /// The seccomp filter installed last ([`seccomp_filter`]).
    filter: Vec<libc::sock_filter>,
    gid_map: Vec<u8>,
}

impl Jail {
    /// A jail for `program` (a name looked up in `PATH`, or a path) that may write `output`
    /// only. `output` is created (empty, 0600) when missing: a bind needs a file to bind.
    pub fn new(program: &Path, output: &Path) -> io::Result<Jail> {
        let program = if program.components().count() > 1 {
            program.to_path_buf()
        } else {
            pen_core::fsutil::find_in_path(&program.to_string_lossy()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} not found in PATH", program.display()),
                )
            })?
        };
        let program = std::fs::canonicalize(&program)?;
        if std::fs::symlink_metadata(output).is_err() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_0600()
                .open(output)?;
        }
        let output = std::fs::canonicalize(output)?;
        let mut steps = Vec::new();
        let mut made = Vec::new();
        let mut bound = Vec::new();
        for path in READ_ONLY {
            let path = Path::new(path);
            let Ok(meta) = std::fs::symlink_metadata(path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                mkdirs(&mut steps, &mut made, path.parent());
                steps.push(Step::Symlink {
                    target: cstr(&std::fs::read_link(path)?),
                    at: in_new_root(path),
                });
            } else {
                bind(&mut steps, &mut made, path, meta.is_dir(), true)?;
                bound.push(path.to_path_buf());
            }
        }
        if !bound.iter().any(|b| program.starts_with(b)) {
            bind(&mut steps, &mut made, &program, false, true)?;
        }
        bind(&mut steps, &mut made, &output, false, false)?;
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        Ok(Jail {
            program,
            output,
            steps,
            uid_map: format!("{uid} {uid} 1\n").into_bytes(),
            gid_map: format!("{gid} {gid} 1\n").into_bytes(),
            filter: seccomp_filter(),
        })
    }

    /// The program, canonical: what to pass to [`Command::new`].
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The output file, canonical: the path the program must be given (the jail has no
    /// working directory of the caller's).
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// Makes `cmd` (for [`Jail::program`]) run the program in the jail, after the pre-exec
    /// hooks `cmd` already has. Its child is the handle (see the module doc): killing it
    /// kills the program.
    pub fn confine(self, cmd: &mut Command) {
        // SAFETY: only async-signal-safe calls (unshare, open, write, fork, waitpid, prctl,
        // mount, mkdir, symlink, pivot_root, chdir, umount2, close_range, _exit) between
        // fork and exec; every path and buffer was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || self.enter());
        }
    }

    /// Runs in the forked child.
    fn enter(&self) -> io::Result<()> {
        let flags = libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        // SAFETY: see `command`.
        unsafe {
            check(libc::unshare(flags))?;
            // Kernels before 3.19 have no setgroups file; nothing to deny there.
            let _ = write_file(c"/proc/self/setgroups", b"deny");
            write_file(c"/proc/self/uid_map", &self.uid_map)?;
            write_file(c"/proc/self/gid_map", &self.gid_map)?;
            let inner = check(libc::fork())?;
            if inner > 0 {
                // The handle: holds no descriptor (the input pipe must see its reader
                // go when the program ends, and spawn() waits for the exec pipe to close).
                libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
                libc::_exit(wait_for(inner));
            }
            // PID 1 of the new namespace: dies with the handle.
            check(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
            ))?;
            self.build_root()?;
            // Exec grants no capability back to uid 0 (root's own, mapped to itself).
            const SECBITS: libc::c_ulong = 0x01 | 0x02 | 0x20; // NOROOT, its lock, KEEP_CAPS lock
            check(libc::prctl(libc::PR_SET_SECUREBITS, SECBITS))?;
            check(libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            if !self.filter.is_empty() {
                let prog = libc::sock_fprog {
                    len: self.filter.len() as u16,
                    filter: self.filter.as_ptr() as *mut libc::sock_filter,
                };
                check(libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &prog as *const libc::sock_fprog as libc::c_ulong,
                ))?;
            }
        }
        Ok(())
    }

    /// # Safety
    /// Only between fork and exec, in a fresh mount namespace.
    unsafe fn build_root(&self) -> io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        private_tmp(c"size=1m,mode=0755")?;
        check(libc::chdir(c"/tmp".as_ptr()))?;
        check(libc::mkdir(c"newroot".as_ptr(), 0o755))?;
        check(libc::mkdir(c"oldroot".as_ptr(), 0o755))?;
        check(pivot_root(c"/tmp", c"/tmp/oldroot"))?;
        check(libc::chdir(c"/".as_ptr()))?;
        check(libc::mount(
            c"/newroot".as_ptr(),
            c"/newroot".as_ptr(),
            null,
            libc::MS_BIND,
            std::ptr::null(),
        ))?;
        for step in &self.steps {
            match step {
                Step::Mkdir(path) => {
                    check(libc::mkdir(path.as_ptr(), 0o755))?;
                }
                Step::Symlink { target, at } => {
                    check(libc::symlink(target.as_ptr(), at.as_ptr()))?;
                }
                Step::Touch(path) => {
                    let fd = check(libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    ))?;
                    libc::close(fd);
                }
                Step::Bind {
                    from,
                    to,
                    read_only,
                } => {
                    check(libc::mount(
                        from.as_ptr(),
                        to.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    if let Some(kept) = read_only {
                        check(libc::mount(
                            null,
                            to.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept,
                            std::ptr::null(),
                        ))?;
                    }
                }
            }
        }
        check(libc::umount2(c"/oldroot".as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(c"/newroot".as_ptr()))?;
        check(pivot_root(c".", c"."))?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))?;
        check(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ))?;
        Ok(())
    }
}

/// Syscalls the jailed program gets EPERM for: what could undo or widen the jail (mounts,
/// namespaces, nested user namespaces and their capabilities), reach other processes, or
/// open large kernel attack surface a packer never needs. Thread creation stays (`clone`
/// without namespace flags; `clone3`, whose flags a filter cannot read, says ENOSYS and
/// glibc falls back to `clone`).
#[cfg(target_arch = "x86_64")]
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
];

/// The namespace flags `clone` may not carry.
#[cfg(target_arch = "x86_64")]
const CLONE_NS_FLAGS: u32 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u32;

/// A classic-BPF seccomp filter: other architectures' and x32 calls kill the process, the
/// [`DENIED`] calls and `clone` with namespace flags fail with EPERM, `clone3` with ENOSYS,
/// the rest is allowed. On other host architectures: none (the namespaces still hold).
fn seccomp_filter() -> Vec<libc::sock_filter> {
    #[cfg(target_arch = "x86_64")]
    {
        const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
        const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
        const JGE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
        const JSET: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
        const RET: u16 = 0x06; // BPF_RET | BPF_K
        const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
        const X32_BIT: u32 = 0x4000_0000;
        let op = |code, k| libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        };
        // Built as jumps to four returns at the end, resolved once the length is known.
        enum To {
            Allow,
            Deny,
            NoSys,
            Kill,
            Next,
        }
        let mut body: Vec<(libc::sock_filter, To, To)> = vec![
            (op(LD_ABS, 4), To::Next, To::Next), // seccomp_data.arch
            (op(JEQ, AUDIT_ARCH_X86_64), To::Next, To::Kill),
            (op(LD_ABS, 0), To::Next, To::Next), // seccomp_data.nr
            (op(JGE, X32_BIT), To::Kill, To::Next),
        ];
        for nr in DENIED {
            body.push((op(JEQ, *nr as u32), To::Deny, To::Next));
        }
        body.push((op(JEQ, libc::SYS_clone3 as u32), To::NoSys, To::Next));
        body.push((op(JEQ, libc::SYS_clone as u32), To::Next, To::Allow));
        body.push((op(LD_ABS, 16), To::Next, To::Next)); // args[0], low half: the flags
        body.push((op(JSET, CLONE_NS_FLAGS), To::Deny, To::Allow));
        let n = body.len();
        let target = |to: &To, at: usize| -> u8 {
            let index = match to {
                To::Next => at + 1,
                To::Allow => n,
                To::Deny => n + 1,
                To::NoSys => n + 2,
                To::Kill => n + 3,
            };
            (index - at - 1) as u8
        };
        let mut prog: Vec<libc::sock_filter> = body
            .iter()
            .enumerate()
            .map(|(at, (ins, jt, jf))| libc::sock_filter {
                jt: target(jt, at),
                jf: target(jf, at),
                ..*ins
            })
            .collect();
        prog.push(op(RET, libc::SECCOMP_RET_ALLOW));
        prog.push(op(RET, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
        prog.push(op(RET, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32));
        prog.push(op(RET, libc::SECCOMP_RET_KILL_PROCESS));
        prog
    }
    #[cfg(not(target_arch = "x86_64"))]
    Vec::new()
}

/// `path` inside the new root, as seen after the first pivot.
fn in_new_root(path: &Path) -> CString {
    let mut bytes = b"/newroot".to_vec();
    bytes.extend_from_slice(path.as_os_str().as_bytes());
    CString::new(bytes).expect("paths hold no NUL")
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths hold no NUL")
}

/// Steps that create `dir` and its parents in the new root (each once).
fn mkdirs(steps: &mut Vec<Step>, made: &mut Vec<PathBuf>, dir: Option<&Path>) {
    let Some(dir) = dir else { return };
    let mut missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| *a != Path::new("/") && !made.iter().any(|m| m == a))
        .collect();
    missing.reverse();
    for d in missing {
        steps.push(Step::Mkdir(in_new_root(d)));
        made.push(d.to_path_buf());
    }
}

fn bind(
    steps: &mut Vec<Step>,
    made: &mut Vec<PathBuf>,
    path: &Path,
    is_dir: bool,
    read_only: bool,
) -> io::Result<()> {
    if is_dir {
        mkdirs(steps, made, Some(path));
    } else {
        mkdirs(steps, made, path.parent());
        steps.push(Step::Touch(in_new_root(path)));
    }
    let kept = if read_only {
        let st = nix::sys::statvfs::statvfs(path)?;
        Some(kept_flags(st.flags()))
    } else {
        None
    };
    let mut from = b"/oldroot".to_vec();
    from.extend_from_slice(path.as_os_str().as_bytes());
    steps.push(Step::Bind {
        from: CString::new(from).expect("paths hold no NUL"),
        to: in_new_root(path),
        read_only: kept,
    });
    Ok(())
}

/// The mount flags of a source that a read-only remount in a user namespace must keep.
fn kept_flags(flags: nix::sys::statvfs::FsFlags) -> libc::c_ulong {
    use nix::sys::statvfs::FsFlags;
    [
        (FsFlags::ST_NOSUID, libc::MS_NOSUID),
        (FsFlags::ST_NODEV, libc::MS_NODEV),
        (FsFlags::ST_NOEXEC, libc::MS_NOEXEC),
        (FsFlags::ST_NOATIME, libc::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, libc::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, libc::MS_RELATIME),
    ]
    .iter()
    .filter(|(st, _)| flags.contains(*st))
    .fold(0, |acc, (_, ms)| acc | ms)
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

fn check<T: PartialOrd + Default>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// # Safety
/// Async-signal-safe; `data` is written in one call.
unsafe fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    let fd = check(libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC))?;
    let written = libc::write(fd, data.as_ptr().cast(), data.len());
    libc::close(fd);
    if written != data.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

unsafe fn pivot_root(new: &std::ffi::CStr, old: &std::ffi::CStr) -> libc::c_int {
    libc::syscall(libc::SYS_pivot_root, new.as_ptr(), old.as_ptr()) as libc::c_int
}

/// Waits for `pid`; its exit code, or 128 + the signal that killed it. Async-signal-safe.
unsafe fn wait_for(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        let r = libc::waitpid(pid, &mut status, 0);
        if r == pid {
            break;
        }
        if r < 0 && *libc::__errno_location() != libc::EINTR {
            return 127;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// The user-namespace settings of this host that decide whether [`Jail`] (and virtiofsd's
/// sandbox) can work; `None` where the file does not exist.
#[derive(Debug, Default, Clone)]
pub struct UsernsSysctls {
    /// `user.max_user_namespaces`: 0 disables them for everyone.
    pub max_user_namespaces: Option<u64>,
    /// Debian's and older Ubuntus' `kernel.unprivileged_userns_clone`: 0 refuses them to
    /// ordinary users.
    pub unprivileged_userns_clone: Option<u64>,
    /// Ubuntu 23.10+'s `kernel.apparmor_restrict_unprivileged_userns`: 1 lets an unconfined
    /// program create one but strips its capabilities in it, so mounting fails.
    pub apparmor_restrict: Option<u64>,
}

impl UsernsSysctls {
    pub fn read() -> UsernsSysctls {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        UsernsSysctls {
            max_user_namespaces: read("/proc/sys/user/max_user_namespaces"),
            unprivileged_userns_clone: read("/proc/sys/kernel/unprivileged_userns_clone"),
            apparmor_restrict: read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        }
    }
}

/// What failed when pen tried to use a user namespace.
#[derive(Debug)]
pub enum UsernsFailure {
    /// unshare(CLONE_NEWUSER) itself, or writing the uid/gid maps.
    Create(io::Error),
    /// Creating one worked, mounting a tmpfs in it did not.
    Mount(io::Error),
    /// The full jail (pivot into a new root) failed to run `true`.
    Jail(io::Error),
}

/// The fix for `failure` on a host with `sysctls`, in one sentence.
pub fn userns_fix(failure: &UsernsFailure, sysctls: &UsernsSysctls) -> String {
    const KEEP: &str = "(and the same setting in /etc/sysctl.d/90-pen.conf to keep it)";
    match failure {
        UsernsFailure::Create(e) => {
            if sysctls.max_user_namespaces == Some(0) {
                format!(
                    "user namespaces are disabled (user.max_user_namespaces = 0): \
                     `sudo sysctl -w user.max_user_namespaces=15000` {KEEP}"
                )
            } else if sysctls.unprivileged_userns_clone == Some(0) {
                format!(
                    "user namespaces are refused to ordinary users \
                     (kernel.unprivileged_userns_clone = 0): \
                     `sudo sysctl -w kernel.unprivileged_userns_clone=1` {KEEP}"
                )
            } else if e.raw_os_error() == Some(libc::ENOSPC) {
                format!(
                    "the limit on user namespaces is reached (user.max_user_namespaces = {}): \
                     raise it with `sudo sysctl -w user.max_user_namespaces=15000` {KEEP}",
                    sysctls
                        .max_user_namespaces
                        .map_or("?".to_string(), |n| n.to_string())
                )
            } else {
                format!(
                    "creating a user namespace fails ({e}): a container's seccomp policy or a \
                     security module forbids it; run pen where unshare(CLONE_NEWUSER) is allowed"
                )
            }
        }
        UsernsFailure::Mount(e) if sysctls.apparmor_restrict == Some(1) => format!(
            "a user namespace is created but mounting in it fails ({e}): AppArmor's \
             restriction (kernel.apparmor_restrict_unprivileged_userns = 1, Ubuntu 23.10 and \
             later) strips its capabilities; give pen and virtiofsd a profile with `userns,` \
             (README: Hosts), or `sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` \
             {KEEP}"
        ),
        UsernsFailure::Mount(e) => format!(
            "a user namespace is created but mounting in it fails ({e}): a security module \
             (AppArmor, SELinux) or a container's seccomp policy restricts user namespaces; \
             allow mounts in them for pen and virtiofsd"
        ),
        UsernsFailure::Jail(e) => format!(
            "user namespaces work, but tar2sqfs's confinement fails ({e}): please report it \
             with this host's distribution and kernel"
        ),
    }
}

/// Makes every mount of this (fresh) mount namespace private, then mounts a small tmpfs
/// (`options`) on `/tmp`: the first steps of the jail, and what `pen doctor` tries.
///
/// # Safety
/// Only between fork and exec, in a fresh mount namespace.
unsafe fn private_tmp(options: &std::ffi::CStr) -> io::Result<()> {
    check(libc::mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ))?;
    check(libc::mount(
        c"tmpfs".as_ptr(),
        c"/tmp".as_ptr(),
        c"tmpfs".as_ptr(),
        libc::MS_NOSUID | libc::MS_NODEV,
        options.as_ptr().cast(),
    ))?;
    Ok(())
}

/// Creates a user namespace, mounts in it, then runs `true` in a full [`Jail`]: what
/// `pen doctor` checks, stage by stage, since Ubuntu's AppArmor restriction lets the first
/// step succeed and only the mount fail.
pub fn check_user_namespaces() -> Result<(), UsernsFailure> {
    let truth =
        pen_core::fsutil::find_in_path("true").unwrap_or_else(|| PathBuf::from("/bin/true"));
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    let uid_map = format!("{uid} {uid} 1\n").into_bytes();
    let gid_map = format!("{gid} {gid} 1\n").into_bytes();
    let stage = |mount: bool| -> io::Result<()> {
        let mut cmd = Command::new(&truth);
        let (uid_map, gid_map) = (uid_map.clone(), gid_map.clone());
        // SAFETY: unshare, open, write, mount: async-signal-safe; buffers made before.
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::CLONE_NEWUSER | if mount { libc::CLONE_NEWNS } else { 0 };
                check(libc::unshare(flags))?;
                let _ = write_file(c"/proc/self/setgroups", b"deny");
                write_file(c"/proc/self/uid_map", &uid_map)?;
                write_file(c"/proc/self/gid_map", &gid_map)?;
                if mount {
                    private_tmp(c"size=1m")?;
                }
                Ok(())
            });
        }
        let status = cmd.status()?;
        if !status.success() {
            return Err(io::Error::other(format!("`true` exited with {status}")));
        }
        Ok(())
    };
    stage(false).map_err(UsernsFailure::Create)?;
    stage(true).map_err(UsernsFailure::Mount)?;
    let scratch = tempfile::tempdir().map_err(UsernsFailure::Jail)?;
    let jail = Jail::new(&truth, &scratch.path().join("out")).map_err(UsernsFailure::Jail)?;
    let mut cmd = Command::new(jail.program());
    jail.confine(&mut cmd);
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(UsernsFailure::Jail(io::Error::other(format!(
            "`true` exited with {s}"
        )))),
        Err(e) => Err(UsernsFailure::Jail(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    /// Runs `script` with bash in a jail whose output is `out`; its stdout and stderr.
    fn jailed_bash(out: &Path, script: &str) -> (std::process::ExitStatus, String, String) {
        let jail = Jail::new(Path::new("bash"), out).unwrap();
        let mut cmd = Command::new(jail.program());
        jail.confine(&mut cmd);
        let o = cmd
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            o.status,
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    #[test]
    fn a_jailed_program_writes_its_output_and_reaches_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.sqfs");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret").unwrap();
        let sibling = dir.path().join("sibling");
        let home_probe = std::env::temp_dir().join(format!("pen-jail-{}", std::process::id()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let out_abs = std::fs::canonicalize(dir.path()).unwrap().join("out.sqfs");
        // Every attempt that succeeds prints a marker; the jail must let none through. (No
        // /dev/null in there: a redirection to it would fail before the attempt.)
        let script = format!(
            r#"
            echo packed > {out}
            cat {secret} && echo READ-BESIDE
            echo x > {sibling} && echo WROTE-BESIDE
            echo x > {probe} && echo WROTE-TMP
            echo x > /usr/pen-jail-probe && echo WROTE-USR
            echo x > /pen-jail-probe && echo WROTE-ROOT
            cat /etc/passwd >&2 && echo READ-ETC
            ls /proc/1 >&2 && echo SAW-PROC
            kill -0 {me} && echo SIGNALLED-HOST
            echo hi > /dev/tcp/127.0.0.1/{port} && echo CONNECTED
            unshare --mount true >&2 && echo KEPT-CAPABILITIES
            unshare --user true >&2 && echo NESTED-USER-NAMESPACE
            echo done
            "#,
            out = out_abs.display(),
            secret = secret.display(),
            sibling = sibling.display(),
            probe = home_probe.display(),
            me = std::process::id(),
        );
        let (status, stdout, stderr) = jailed_bash(&out, &script);
        eprintln!("the jailed attempts:\n{stderr}");
        assert!(status.success(), "{status}: {stdout}\n{stderr}");
        assert_eq!(
            stdout.trim(),
            "done",
            "the jail let through:\n{stdout}\n{stderr}"
        );
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "packed\n");
        assert!(!sibling.exists() && !home_probe.exists());
        assert!(!Path::new("/usr/pen-jail-probe").exists());
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "a connection reached the host");
    }

    #[test]
    fn the_handle_exits_with_the_programs_status_and_a_missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (status, _, _) = jailed_bash(&dir.path().join("out"), "exit 7");
        assert_eq!(status.code(), Some(7));
        let (status, _, _) = jailed_bash(
            &dir.path().join("out"),
            "exec sleep 1000 & kill -9 $!; wait $!",
        );
        assert_eq!(status.code(), Some(128 + 9));
        let err = Jail::new(Path::new("no-such-packer"), &dir.path().join("o"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("no-such-packer"), "{err}");
    }

    #[test]
    fn killing_the_handle_kills_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let jail = Jail::new(Path::new("sleep"), &dir.path().join("out")).unwrap();
        let mut cmd = Command::new(jail.program());
        jail.confine(&mut cmd);
        let mut child = cmd.arg("1000").stdout(Stdio::piped()).spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = std::io::Read::read_to_end(&mut stdout, &mut Vec::new());
            let _ = tx.send(());
        });
        child.kill().unwrap();
        child.wait().unwrap();
        // The program holds the pipe's write end: it closes when the program is gone.
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the jailed program outlived its handle");
    }

    #[test]
    fn this_host_passes_the_doctor_check() {
        check_user_namespaces().unwrap();
    }

    #[test]
    fn each_failure_names_its_setting_and_fix() {
        let enospc = || io::Error::from_raw_os_error(libc::ENOSPC);
        let eperm = || io::Error::from_raw_os_error(libc::EPERM);
        let zero = UsernsSysctls {
            max_user_namespaces: Some(0),
            ..Default::default()
        };
        let fix = userns_fix(&UsernsFailure::Create(enospc()), &zero);
        assert!(
            fix.contains("sudo sysctl -w user.max_user_namespaces=15000"),
            "{fix}"
        );
        let debian = UsernsSysctls {
            unprivileged_userns_clone: Some(0),
            ..Default::default()
        };
        let fix = userns_fix(&UsernsFailure::Create(eperm()), &debian);
        assert!(fix.contains("kernel.unprivileged_userns_clone=1"), "{fix}");
        let ubuntu = UsernsSysctls {
            apparmor_restrict: Some(1),
            ..Default::default()
        };
        let fix = userns_fix(&UsernsFailure::Mount(eperm()), &ubuntu);
        assert!(fix.contains("AppArmor") && fix.contains("userns,"), "{fix}");
        let fix = userns_fix(&UsernsFailure::Create(eperm()), &UsernsSysctls::default());
        assert!(fix.contains("seccomp"), "{fix}");
    }
}

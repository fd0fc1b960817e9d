//! seccomp-bpf confinement per thread kind: once a thread has done its setup it may make only
//! the system calls its job needs, so that a guest that subverts a device model or the pager
//! cannot open files, sockets or processes through apfvm. Installing a filter also sets
//! no-new-privileges on the thread.
//!
//! A forbidden call raises SIGSYS; apfvm's handler names the calling thread and the system
//! call number on stderr and exits with 159 (128 + SIGSYS). `--no-seccomp` turns confinement
//! off (for debugging on a new host or kernel).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// What a thread does, and so which system calls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: event loop (console, signals, stop requests,
    /// guest-requested snapshots), then stopping the vCPUs and tearing down (terminal
    /// restore, trace instance removal).
    Main,
    /// KVM_RUN and the device models behind port I/O (serial output, pager-control evictions).
    Vcpu,
    /// Reads userfaultfd messages; serves zero-latency fetches itself.
    PagerReader,
    /// Serves fetches from the queue (memory image reads, UFFDIO_COPY).
    PagerWorker,
    /// Periodic eviction (write-protect, drop, wake).
    PagerEvictor,
    /// Writes --metrics-file lines.
    Metrics,
    /// Reads KVM's tracepoints from tracefs (--kvm-trace).
    KvmTrace,
    /// Decides when a lazy restore's working set is recorded and writes it.
    WorkingSet,
    /// Serves the control API (--api-socket): accepts connections on its socket, reads
    /// requests and writes answers; the VM's owner does the work.
    Api,
}

/// Exit status after a forbidden system call: 128 + SIGSYS, as if killed by it.
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 128 + libc::SIGSYS;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter for {kind:?} threads: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter on a {kind:?} thread: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

static ENABLED: OnceLock<bool> = OnceLock::new();

/// Turns confinement on or off for the threads this process starts from now on. Called once,
/// by the VM, before any of its threads exists; without it nothing is confined (the pager in
/// unit tests and in `apfvm bench`'s floor measurement).
pub fn enable(on: bool) -> Result<(), SeccompError> {
    if on {
        install_sigsys_handler()?;
    }
    let _ = ENABLED.set(on);
    Ok(())
}

/// Confines the calling thread to what `kind` needs, if confinement is on.
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    if !ENABLED.get().copied().unwrap_or(false) {
        return Ok(());
    }
    for program in compile(kind)? {
        seccompiler::apply_filter(&program)
            .map_err(|source| SeccompError::Install { kind, source })?;
    }
    Ok(())
}

/// The BPF programs for `kind`: its allow-list (SIGSYS for everything else) and, for kinds
/// that have no file to open, one that makes opening a file fail with EACCES. The kernel
/// applies the stricter verdict of the two. glibc's allocator opens
/// /proc/sys/vm/overcommit_memory once, from whichever thread first shrinks a heap, and
/// copes with being refused; that must not end the VM.
pub fn compile(kind: ThreadKind) -> Result<Vec<BpfProgram>, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in COMMON.iter().chain(allowed(kind)) {
        rules.insert(call, vec![]);
    }
    let opens_files = allowed(kind).any(|&call| call == libc::SYS_openat);
    if !opens_files {
        rules.insert(libc::SYS_openat, vec![]);
    }
    // The SIGSYS handler reads the thread's name.
    let get_name = arg_is(0, libc::PR_GET_NAME as u64).map_err(build)?;
    rules.insert(libc::SYS_prctl, vec![get_name]);
    // Dropping an owned descriptor in a debug build first checks it is open (std's
    // debug_assert_fd_is_open): fcntl(F_GETFD) only.
    let fd_is_open = arg_is(1, libc::F_GETFD as u64).map_err(build)?;
    rules.insert(libc::SYS_fcntl, vec![fd_is_open]);
    let ioctl_types = ioctl_types(kind);
    if !ioctl_types.is_empty() {
        // ioctl only for the request types this kind uses: bits 8-15 of the request number.
        let per_type = ioctl_types
            .iter()
            .map(|&t| {
                SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(0xff00),
                    u64::from(t) << 8,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(build)?;
        rules.insert(libc::SYS_ioctl, per_type);
    }
    let allow_list = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(build)?;
    if opens_files {
        return Ok(vec![allow_list]);
    }
    let no_files = SeccompFilter::new(
        [(libc::SYS_openat, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        seccompiler::TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(build)?;
    // The allow-list goes last: it does not allow installing another filter.
    Ok(vec![no_files, allow_list])
}

/// A rule that allows a call only when its argument `index` (32 bits) is `value`.
fn arg_is(index: u8, value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .and_then(|c| SeccompRule::new(vec![c]))
}

/// ioctl request types: KVM's, userfaultfd's, the terminal's.
const KVMIO: u8 = 0xae;
const UFFDIO: u8 = 0xaa;
const TERMINAL: u8 = b'T';

fn ioctl_types(kind: ThreadKind) -> &'static [u8] {
    match kind {
        ThreadKind::Main => &[KVMIO, TERMINAL],
        // Evictions requested through the pager-control port run on the vCPU thread.
        ThreadKind::Vcpu => &[KVMIO, UFFDIO],
        ThreadKind::PagerReader | ThreadKind::PagerWorker | ThreadKind::PagerEvictor => &[UFFDIO],
        ThreadKind::Metrics | ThreadKind::KvmTrace | ThreadKind::WorkingSet | ThreadKind::Api => {
            &[]
        }
    }
}

/// What every thread needs: memory allocation, locks, signals (the vCPU kick, SIGSYS
/// itself), time, writing diagnostics to stderr, and ending the thread.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Writing a file whole and putting it in place: a temporary file, fsync, rename over the
/// old one, and removing what is left (snapshot state files, working sets).
const REPLACES_FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_fsync,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// What `kind` needs besides `COMMON`.
fn allowed(kind: ThreadKind) -> impl Iterator<Item = &'static i64> {
    let replaces_files: &[i64] = match kind {
        ThreadKind::Main | ThreadKind::WorkingSet => REPLACES_FILES,
        _ => &[],
    };
    own_calls(kind).iter().chain(replaces_files)
}

fn own_calls(kind: ThreadKind) -> &'static [i64] {
    match kind {
        ThreadKind::Main => &[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_read,
            libc::SYS_tgkill,
            // Console output without blocking: waiting for a stalled stdout with a deadline,
            // and a socket as stdout.
            libc::SYS_poll,
            libc::SYS_sendto,
            // Teardown: the kvm-trace instance is read one last time and removed.
            libc::SYS_openat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_rmdir,
            // Guest-requested snapshots (with REPLACES_FILES): the snapshot directory, its
            // memory file, and /proc/self/pagemap (which pages were never written).
            libc::SYS_pread64,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_ftruncate,
            libc::SYS_pwrite64,
        ],
        ThreadKind::Vcpu => &[libc::SYS_fallocate],
        ThreadKind::PagerReader => &[
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_pread64,
        ],
        ThreadKind::PagerWorker => &[libc::SYS_pread64],
        ThreadKind::PagerEvictor => &[libc::SYS_fallocate],
        ThreadKind::Metrics => &[libc::SYS_fsync, libc::SYS_read, libc::SYS_openat],
        ThreadKind::WorkingSet => &[],
        ThreadKind::KvmTrace => &[
            libc::SYS_read,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_openat,
            libc::SYS_getdents64,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
        ],
        // tokio's event loop (its epoll and eventfd, and the listening socket's
        // registration, all made before the filter; `read` drains a full eventfd) and the
        // API socket's connections: accepted, read (recv), written (writev, write), shut
        // down, closed. No socket can be created, bound or connected, no file opened.
        ThreadKind::Api => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_read,
            libc::SYS_writev,
            libc::SYS_shutdown,
        ],
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; we set a handler that only calls async-signal-safe
    // functions (write, _exit) and SA_SIGINFO to receive the system call number.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Reports the forbidden system call and ends apfvm: a thread that was refused a call it
/// needs cannot go on, and the VM must not be left half-running.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The SIGSYS siginfo (`_sigsys`): call address at byte 16, system call number at 24.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS these
    // bytes hold `_sigsys`.
    let syscall = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL-terminated) into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let mut message = [0u8; 128];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(message.len() - len);
        message[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"apfvm: seccomp: thread ");
    put(&name[..name_len]);
    put(b" made a forbidden system call #");
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    let mut n = syscall.unsigned_abs();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[start..]);
    put(b"\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for `len` bytes.
    unsafe {
        libc::write(2, message.as_ptr().cast(), len);
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    const ALL: [ThreadKind; 9] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::PagerReader,
        ThreadKind::PagerWorker,
        ThreadKind::PagerEvictor,
        ThreadKind::Metrics,
        ThreadKind::KvmTrace,
        ThreadKind::WorkingSet,
        ThreadKind::Api,
    ];

    #[test]
    fn every_kind_compiles() {
        for kind in ALL {
            let programs = compile(kind).unwrap();
            assert!(programs.iter().all(|p| !p.is_empty()), "{kind:?}");
        }
    }

    /// In a child process (a forbidden call ends the process): on a confined vCPU thread an
    /// allowed call goes through, opening a file fails with EACCES, and opening a socket ends
    /// the process with exit 159 and a message naming the thread and the call.
    #[test]
    fn a_forbidden_system_call_ends_the_process_with_a_named_error() {
        let programs = compile(ThreadKind::Vcpu).unwrap();
        install_sigsys_handler().unwrap();
        let mut pipe = [0; 2];
        // SAFETY: pipe() fills the two-element array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child makes only async-signal-safe calls (dup2, prctl/seccomp through
        // apply_filter on precompiled programs, getpid, open, socket, _exit) before it ends.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the child: stderr goes to the pipe; raw syscalls only.
            unsafe {
                libc::dup2(pipe[1], 2);
                for program in &programs {
                    if seccompiler::apply_filter(program).is_err() {
                        libc::_exit(1);
                    }
                }
                if libc::getpid() <= 0 {
                    libc::_exit(2);
                }
                // Opening a file is refused without ending the process.
                let path = c"/proc/sys/vm/overcommit_memory";
                if libc::open(path.as_ptr(), libc::O_RDONLY) != -1
                    || *libc::__errno_location() != libc::EACCES
                {
                    libc::_exit(3);
                }
                // Dropping an owned descriptor goes through (debug builds check it first).
                drop(std::os::fd::OwnedFd::from_raw_fd(pipe[0]));
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end; reading into a local buffer.
        let output = unsafe {
            libc::close(pipe[1]);
            let mut buf = [0u8; 256];
            let n = libc::read(pipe[0], buf.as_mut_ptr().cast(), buf.len());
            String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned()
        };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), EXIT_FORBIDDEN_SYSCALL);
        // The forked child is named after the test's thread (at most 15 bytes).
        let thread = std::thread::current().name().unwrap_or("").to_string();
        let thread = &thread[..thread.len().min(15)];
        assert_eq!(
            output,
            format!(
                "apfvm: seccomp: thread {thread} made a forbidden system call #{}\n",
                libc::SYS_socket
            )
        );
    }
}

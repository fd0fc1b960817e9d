//! Running the real `apfvm` binary the way a user does, with a time limit, and the guests the
//! tests boot.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

pub const APFVM: &str = env!("CARGO_BIN_EXE_apfvm");
pub const REFERENCE_GUEST: &str = env!("APFVM_REFERENCE_GUEST");

/// Whether KVM tests can run. Without /dev/kvm they fail with a clear message, unless
/// APFVM_SKIP_KVM_TESTS=1 says to skip them.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("APFVM_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping: /dev/kvm is missing and APFVM_SKIP_KVM_TESTS=1");
        return false;
    }
    panic!(
        "/dev/kvm is missing: these tests boot real guests under KVM. Run them on a host with \
         KVM, or set APFVM_SKIP_KVM_TESTS=1 to skip them."
    );
}

pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Guest serial lines starting with `prefix`.
    pub fn lines_with(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Spawns apfvm with `args` (stdin closed to /dev/null, as in CI).
pub fn spawn(args: &[&str]) -> Child {
    Command::new(APFVM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start apfvm")
}

/// Waits for a spawned apfvm; a run past `limit` is killed and fails the test: apfvm must
/// never hang.
pub fn wait(child: Child, limit: Duration) -> Run {
    let done = vmm::child::wait_with_limit(child, limit).expect("wait for apfvm");
    let run = Run {
        status: done.status,
        stdout: done.stdout,
        stderr: done.stderr,
        elapsed: done.elapsed,
    };
    if done.timed_out {
        panic!("apfvm did not finish within {limit:?}: {}", run.describe());
    }
    run
}

pub fn apfvm(args: &[&str], limit: Duration) -> Run {
    wait(spawn(args), limit)
}

/// The directory for downloaded test inputs (gitignored).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("APFVM_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache"),
    }
}

/// Debian's packaged cloud kernel, fetched with apt by resources/debian-kernel/fetch.sh:
/// (bzImage, vmlinux extracted from it).
pub fn debian_kernel() -> (PathBuf, PathBuf) {
    let dir = cache_dir().join("debian-kernel");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/debian-kernel/fetch.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("run fetch.sh");
    assert!(
        out.status.success(),
        "fetching Debian's kernel failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir.join("vmlinuz"), dir.join("vmlinux"))
}

/// The pager's summary line (`apfvm: pager: {json}`) as JSON.
pub fn pager_summary(run: &Run) -> serde_json::Value {
    vmm::vm::pager_summary(&run.stderr)
        .unwrap_or_else(|| panic!("no pager summary: {}", run.describe()))
}

/// The guest's `APFVM-RESULT {json}` line as JSON.
pub fn guest_result(run: &Run) -> serde_json::Value {
    vmm::reference_guest::result(&run.stdout)
        .unwrap_or_else(|| panic!("no APFVM-RESULT line: {}", run.describe()))
}

/// Serializes guest workloads that saturate the host's CPUs: run side by side on a 2-core
/// machine they starve each other's vCPUs and the kworkers that complete their faults.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A number from a JSON result line.
pub fn field(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric '{key}' in {v}"))
}

/// The reference guest's own checks in its result line: every byte right, every token
/// accounted for, nothing left parked.
pub fn assert_guest_checks_clean(result: &serde_json::Value) {
    for key in [
        "bad_bytes",
        "wrong_tokens",
        "dup_wakes",
        "parked_at_exit",
        "dummies_left",
    ] {
        assert_eq!(field(result, key), 0, "{key}: {result}");
    }
}

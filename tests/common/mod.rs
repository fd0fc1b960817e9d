//! Running the real `apfvm` binary the way a user does, with a time limit, and the guests the
//! tests boot.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

fn drain<R: Read + Send + 'static>(mut pipe: R) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
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
pub fn wait(mut child: Child, limit: Duration) -> Run {
    let start = Instant::now();
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for apfvm") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let status = child.wait().unwrap();
            let run = Run {
                status,
                stdout: out.join().unwrap(),
                stderr: err.join().unwrap(),
                elapsed: start.elapsed(),
            };
            panic!("apfvm did not finish within {limit:?}: {}", run.describe());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        elapsed: start.elapsed(),
    }
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
    let line = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("apfvm: pager: "))
        .unwrap_or_else(|| panic!("no pager summary: {}", run.describe()));
    serde_json::from_str(line).expect("pager summary is JSON")
}

/// The guest's `APFVM-RESULT {json}` line as JSON.
pub fn guest_result(run: &Run) -> serde_json::Value {
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("APFVM-RESULT "))
        .unwrap_or_else(|| panic!("no APFVM-RESULT line: {}", run.describe()));
    serde_json::from_str(line.trim()).expect("APFVM-RESULT is JSON")
}

//! Running the real `apfvm` binary the way a user does, with a time limit, and the guests the
//! tests boot. The child runner and the parsing of result lines are tests/support's
//! (`test_support`, shared with `apfvm bench`); here they fail the test with all the output.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const APFVM: &str = env!("CARGO_BIN_EXE_apfvm");
pub const REFERENCE_GUEST: &str = env!("APFVM_REFERENCE_GUEST");

/// KVM tests this test binary skipped (APFVM_SKIP_KVM_TESTS=1 without /dev/kvm).
static SKIPPED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn report_skipped() {
    let n = SKIPPED.load(Ordering::SeqCst);
    let binary = std::env::args().next().unwrap_or_default();
    let name = Path::new(&binary)
        .file_name()
        .map_or(binary.clone(), |n| n.to_string_lossy().into_owned());
    // After the harness's summary, so that the count is not lost among the test lines.
    eprintln!("APFVM_SKIP_KVM_TESTS=1: {n} KVM test(s) of {name} skipped (no /dev/kvm)");
}

/// Whether KVM tests can run. Without /dev/kvm they fail with a clear message, unless
/// APFVM_SKIP_KVM_TESTS=1 says to skip them; the test binary then says how many it skipped
/// when it ends.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("APFVM_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        if SKIPPED.fetch_add(1, Ordering::SeqCst) == 0 {
            // SAFETY: registers a plain extern "C" function, run once at process exit.
            unsafe { libc::atexit(report_skipped) };
        }
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
    spawn_with_stdin(args, Stdio::null())
}

/// Spawns apfvm with `args` and `stdin` (e.g. `Stdio::piped()`: the guest's console input).
pub fn spawn_with_stdin(args: &[&str], stdin: Stdio) -> Child {
    Command::new(APFVM)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start apfvm")
}

/// Waits for a spawned apfvm; a run past `limit` is killed and fails the test: apfvm must
/// never hang.
pub fn wait(child: Child, limit: Duration) -> Run {
    let done = test_support::child::wait_with_limit(child, limit).expect("wait for apfvm");
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

/// What a running apfvm printed so far.
#[derive(Default)]
struct Output {
    stdout: String,
    stderr: String,
    /// Streams that reached their end (the process closed them: it is exiting).
    closed: u8,
}

/// A running apfvm whose output the test reads as it comes, so that it can act on an event
/// (a line on the console) instead of after a guessed time. Dropped before `finish` (a test
/// that failed halfway), it kills apfvm.
pub struct Watched {
    child: Child,
    /// The guest's console input, when started by `watch_with_console_input`.
    stdin: Option<ChildStdin>,
    output: Arc<(Mutex<Output>, Condvar)>,
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

fn pump(
    mut pipe: impl Read + Send + 'static,
    output: Arc<(Mutex<Output>, Condvar)>,
    stdout: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = pipe.read(&mut buf).unwrap_or(0);
            let (lock, changed) = &*output;
            let mut out = lock.lock().unwrap();
            if n == 0 {
                out.closed += 1;
                changed.notify_all();
                return;
            }
            let text = String::from_utf8_lossy(&buf[..n]);
            if stdout {
                out.stdout.push_str(&text);
            } else {
                out.stderr.push_str(&text);
            }
            changed.notify_all();
        }
    })
}

/// Starts apfvm with `args` (stdin /dev/null) and reads its output as it comes.
pub fn watch(args: &[&str]) -> Watched {
    watch_with_stdin(args, Stdio::null())
}

/// Starts apfvm with `args` and a pipe as its stdin (the guest's console input, see
/// `Watched::send`), and reads its output as it comes.
pub fn watch_with_console_input(args: &[&str]) -> Watched {
    watch_with_stdin(args, Stdio::piped())
}

fn watch_with_stdin(args: &[&str], stdin: Stdio) -> Watched {
    let started = Instant::now();
    let mut child = spawn_with_stdin(args, stdin);
    let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
    let readers = vec![
        pump(child.stdout.take().unwrap(), output.clone(), true),
        pump(child.stderr.take().unwrap(), output.clone(), false),
    ];
    Watched {
        stdin: child.stdin.take(),
        child,
        output,
        readers,
        started,
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Watched {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since apfvm was spawned.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The guest's console output so far.
    pub fn stdout(&self) -> String {
        self.output.0.lock().unwrap().stdout.clone()
    }

    /// Writes `bytes` to apfvm's stdin (the guest's console input); needs
    /// `watch_with_console_input`.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self
            .stdin
            .as_mut()
            .expect("apfvm's stdin is a pipe (watch_with_console_input)");
        if let Err(e) = stdin.write_all(bytes).and_then(|()| stdin.flush()) {
            let out = self.output.0.lock().unwrap();
            panic!(
                "writing to apfvm's stdin: {e} (apfvm ended?) after {:?}\n--- stdout ---\n{}\n\
                 --- stderr ---\n{}",
                self.started.elapsed(),
                out.stdout,
                out.stderr
            );
        }
    }

    /// Waits until `ready` holds, checking it whenever apfvm prints something and at least
    /// every 20 ms. Fails the test with `what` (asked for only then) and all output if apfvm
    /// ends first, or if `limit` passes (apfvm or the guest hangs).
    fn wait(&self, what: impl Fn() -> String, limit: Duration, ready: impl Fn(&Output) -> bool) {
        let (lock, changed) = &*self.output;
        let deadline = Instant::now() + limit;
        let mut out = lock.lock().unwrap();
        while !ready(&out) {
            let now = Instant::now();
            if out.closed == 2 || now >= deadline {
                panic!(
                    "waiting for {}: {} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    what(),
                    if out.closed == 2 {
                        "apfvm ended"
                    } else {
                        "not seen"
                    },
                    self.started.elapsed(),
                    out.stdout,
                    out.stderr
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            out = changed.wait_timeout(out, wait).unwrap().0;
        }
    }

    /// Waits until `ready(stdout, stderr)` holds (see `wait`).
    pub fn wait_until(&self, what: &str, limit: Duration, ready: impl Fn(&str, &str) -> bool) {
        self.wait(
            || what.to_string(),
            limit,
            |out| ready(&out.stdout, &out.stderr),
        );
    }

    /// Waits until the guest's console shows `needle`.
    pub fn wait_for_stdout(&self, needle: &str, limit: Duration) {
        self.wait_until(&format!("{needle:?} on the console"), limit, |out, _| {
            out.contains(needle)
        });
    }

    /// Waits until `ready` holds for the lines of a JSON-lines metrics file (see `wait`).
    pub fn wait_for_metrics(
        &self,
        path: &Path,
        limit: Duration,
        ready: impl Fn(&[serde_json::Value]) -> bool,
    ) {
        let what = || {
            let lines = metrics_lines(path);
            format!("the metrics in {}: {lines:?}", path.display())
        };
        self.wait(what, limit, |_| ready(&metrics_lines(path)));
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) of our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0);
    }

    /// Waits for apfvm to exit; past `limit` it is killed and the test fails: apfvm must never
    /// hang.
    pub fn finish(mut self, limit: Duration) -> Run {
        self.stdin = None;
        let since = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for apfvm") {
                break Some(status);
            }
            if since.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            let (lock, changed) = &*self.output;
            let out = lock.lock().unwrap();
            let _ = changed
                .wait_timeout(out, Duration::from_millis(20))
                .unwrap();
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let out = std::mem::take(&mut *self.output.0.lock().unwrap());
        let Some(status) = status else {
            panic!(
                "apfvm did not finish within {limit:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.stdout, out.stderr
            );
        };
        Run {
            status,
            stdout: out.stdout,
            stderr: out.stderr,
            elapsed: self.started.elapsed(),
        }
    }
}

/// The lines of a JSON-lines metrics file written so far, each parsed (a line still being
/// written is left out).
pub fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Whether this host runs guest kernel mode through an instruction emulator (PVM, see
/// ../shared/docs/host-kvm.md): some guests then end differently, by the host's nature.
pub fn host_emulates_guest_kernel_mode() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
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
        "fetching Debian's kernel failed (this test needs the network to reach Debian's \
         package mirror through apt-get, unless {} already holds the kernel):\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    (dir.join("vmlinuz"), dir.join("vmlinux"))
}

/// The pager's summary line (`apfvm: pager: {json}`) as JSON; the test fails without one.
pub fn pager_summary(run: &Run) -> serde_json::Value {
    test_support::apfvm::pager_summary(&run.stderr)
        .unwrap_or_else(|| panic!("no pager summary: {}", run.describe()))
}

/// The guest's `APFVM-RESULT {json}` line as JSON; the test fails without one.
pub fn guest_result(run: &Run) -> serde_json::Value {
    test_support::reference_guest::result(&run.stdout)
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

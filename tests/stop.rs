//! Stopping apfvm from any state: SIGTERM ends it with exit 143 within its stop budget
//! (apfvm's own: a stop it cannot finish in time is an error, exit 1), and the final metrics
//! line and the pager's summary are still written. (A paused VM, and a vCPU thread that
//! panicked, are in tests/lifecycle.rs.)

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

/// The last metrics line, which must be the final one.
fn final_metrics(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    let last = text.lines().last().expect("metrics lines");
    let last: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["type"], "final", "{text}");
    last
}

/// Starts the reference guest with `flags` and `cmdline` under `--pager uffd` and a metrics
/// file, waits for `ready` in the metrics, sends SIGTERM and checks the stop.
fn stop_when(flags: &[&str], cmdline: &str, ready: impl Fn(&[serde_json::Value]) -> bool) {
    if !kvm_available() {
        return;
    }
    let _one_at_a_time = exclusive();
    let metrics = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let mut args = vec![
        "demo",
        "--vcpus",
        "2",
        "--pager",
        "uffd",
        "--metrics-file",
        metrics.as_path().to_str().unwrap(),
        "--metrics-interval",
        "20ms",
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(flags);
    let vm = watch(&args);
    vm.wait_for_metrics(metrics.as_path(), LIMIT, ready);
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), Some(143), "{}", run.describe());
    let pager = pager_summary(&run);
    let last = final_metrics(metrics.as_path());
    assert_eq!(last["pager"]["faults"], pager["faults"], "{last}\n{pager}");
}

fn pager_count(lines: &[serde_json::Value], key: &str) -> u64 {
    lines
        .iter()
        .filter_map(|l| l["pager"][key].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn an_idle_vm_stops_on_sigterm() {
    stop_when(&[], "hold", |lines| lines.len() >= 2);
}

/// Fetches that take 10 s are in flight: the stop releases them at once.
#[test]
fn a_vm_waiting_on_10_s_fetches_stops_on_sigterm() {
    stop_when(
        &["--fault-latency", "10s"],
        "pages=256 touchers=2 busy=1",
        |lines| pager_count(lines, "faults_async") >= 2,
    );
}

/// The evictor sleeps for an hour between rounds: its wait ends with the stop.
#[test]
fn a_vm_with_an_hourly_evictor_stops_on_sigterm() {
    stop_when(&["--evict", "3600s:1%"], "hold", |lines| lines.len() >= 2);
}

/// stdout and stderr are pipes nobody reads while the guest prints without end: the guest's
/// console output fills the pipe and then apfvm's buffer, is dropped and counted, and no vCPU
/// waits for it. SIGTERM still stops apfvm; once someone reads stderr again, the pager's
/// summary is there.
#[test]
fn a_vm_whose_stdout_and_stderr_are_stalled_pipes_stops_on_sigterm() {
    if !kvm_available() {
        return;
    }
    let _one_at_a_time = exclusive();
    let metrics = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let metrics_path = metrics.as_path().to_str().unwrap();
    let mut child = Command::new(APFVM)
        .args([
            "demo",
            "--pager",
            "uffd",
            "--metrics-file",
            metrics_path,
            "--metrics-interval",
            "20ms",
            "--cmdline",
            "hold chatter",
        ])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads the pipes until the guest's output is being dropped.
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let dropped = metrics_lines(metrics.as_path())
            .iter()
            .any(|l| l["console_dropped_bytes"].as_u64() > Some(0));
        if dropped {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline,
            "apfvm ended or never dropped console output"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill(2) of our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let done = test_support::child::wait_with_limit(child, LIMIT).unwrap();
    assert!(!done.timed_out);
    assert_eq!(done.status.code(), Some(143), "{}", done.stderr);
    assert!(
        done.stderr.contains(test_support::apfvm::PAGER_SUMMARY),
        "{}",
        done.stderr
    );
    let last = final_metrics(metrics.as_path());
    assert!(last["console_dropped_bytes"].as_u64() > Some(0), "{last}");
}

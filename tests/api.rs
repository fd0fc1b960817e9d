//! The control API (`--api-socket`) driven the way a user does: `apfvm ctl` (and, for requests
//! ctl would never send, raw HTTP) against the real apfvm running the reference guest. Pause
//! and resume hold and continue a workload, a snapshot taken through the API restores (through
//! the API's `PUT /snapshot/load` and through `apfvm restore`) and finishes with the guest's
//! checks clean, bad requests get a 400 (404, 405, 413) with a fault message while the VM runs
//! on, and the socket is 0600, never replaces a path, and is gone once apfvm exits.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use common::*;
use vmm_sys_util::tempdir::TempDir;

const LIMIT: Duration = Duration::from_secs(300);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// `apfvm ctl --api-socket SOCKET ARGS...`.
fn ctl(socket: &Path, args: &[&str]) -> Run {
    let mut all = vec!["ctl", "--api-socket", path_str(socket)];
    all.extend_from_slice(args);
    apfvm(&all, LIMIT)
}

/// `ctl` that must succeed; its stdout.
fn ctl_ok(socket: &Path, args: &[&str]) -> String {
    let run = ctl(socket, args);
    assert_eq!(run.code(), Some(0), "ctl {args:?}: {}", run.describe());
    run.stdout
}

/// `ctl` that must fail with an HTTP error naming `needle`; its stderr.
fn ctl_fails(socket: &Path, args: &[&str], needle: &str) -> String {
    let run = ctl(socket, args);
    assert_eq!(run.code(), Some(1), "ctl {args:?}: {}", run.describe());
    assert!(
        run.stderr.contains("400 Bad Request") && run.stderr.contains(needle),
        "ctl {args:?}: {needle:?}: {}",
        run.describe()
    );
    assert!(run.stdout.is_empty(), "{}", run.describe());
    run.stderr
}

fn info(socket: &Path) -> serde_json::Value {
    let out = ctl_ok(socket, &["info"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Waits until apfvm accepts connections on its API socket.
fn wait_for_api(vm: &Watched, socket: &Path) {
    vm.wait_until("the API socket to accept", LIMIT, |_, _| {
        UnixStream::connect(socket).is_ok()
    });
    let meta = std::fs::symlink_metadata(socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "mode {:o}",
        meta.permissions().mode()
    );
}

/// An answer to a raw HTTP request.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    /// The fault message of an error answer (the test fails without one).
    fn fault(&self) -> String {
        let fault: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", self.head, self.body));
        fault["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {}", self.body))
            .to_string()
    }
}

/// Sends `request` as it is (one connection, closed by apfvm after its answer).
fn raw(socket: &Path, request: &[u8]) -> Answer {
    let mut stream = UnixStream::connect(socket).unwrap();
    // A bound on the wait: apfvm must answer, not hang.
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// A well-formed request with a JSON (or any) body.
fn request(socket: &Path, method: &str, path: &str, body: &str) -> Answer {
    let text = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw(socket, text.as_bytes())
}

fn vcpu_exits(line: &serde_json::Value) -> u64 {
    line["vcpus"]
        .as_array()
        .expect("vcpus")
        .iter()
        .map(|v| field(v, "exits"))
        .sum()
}

fn pager_field(line: &serde_json::Value, key: &str) -> u64 {
    line["pager"][key].as_u64().unwrap_or(0)
}

fn async_faults(lines: &[serde_json::Value]) -> u64 {
    lines
        .iter()
        .map(|l| pager_field(l, "faults_async"))
        .max()
        .unwrap_or(0)
}

/// Pause mid-workload through the socket: while paused no vCPU leaves KVM_RUN and the pager
/// copies no page; `GET /` says so; after resume the workload ends with every byte and token
/// right, and the socket is gone once apfvm has exited.
#[test]
fn pause_and_resume_through_the_api_hold_and_continue_the_guest() {
    if !kvm_available() {
        return;
    }
    let _heavy = exclusive();
    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("api.sock");
    let metrics = dir.as_path().join("metrics.jsonl");
    let vm = watch(&[
        "demo",
        "--vcpus",
        "2",
        "--pager",
        "uffd",
        "--fault-latency",
        "20ms",
        "--metrics-file",
        path_str(&metrics),
        "--metrics-interval",
        "20ms",
        "--api-socket",
        path_str(&socket),
        "--cmdline",
        "pages=1024 touchers=2 busy=1 passes=2 evict=1",
    ]);
    wait_for_api(&vm, &socket);
    let running = info(&socket);
    assert_eq!(running["state"], "Running", "{running}");
    vm.wait_for_metrics(&metrics, LIMIT, |lines| async_faults(lines) >= 20);

    assert_eq!(ctl_ok(&socket, &["pause"]), "");
    let paused = info(&socket);
    assert_eq!(paused["app_name"], "apfvm", "{paused}");
    assert_eq!(paused["state"], "Paused", "{paused}");
    assert_eq!(paused["vcpus"], 2, "{paused}");
    assert_eq!(paused["mem_size_mib"], 128, "{paused}");
    assert_eq!(paused["apf"], true, "{paused}");
    assert_eq!(paused["pager"], "uffd", "{paused}");
    assert!(paused.get("snapshot_id").is_none(), "{paused}");
    // Pausing a paused VM is no error (as in Firecracker).
    ctl_ok(&socket, &["pause"]);
    // Lines sampled after the pause (the first one after it may have been sampled before):
    // their counters stand still.
    let seen = metrics_lines(&metrics).len();
    vm.wait_for_metrics(&metrics, LIMIT, |lines| lines.len() >= seen + 6);
    let lines = metrics_lines(&metrics);
    let still = &lines[seen + 1..];
    for line in still {
        assert_eq!(vcpu_exits(line), vcpu_exits(&still[0]), "{still:?}");
        for key in ["served_from_store", "restored_from_swap", "pages_evicted"] {
            assert_eq!(
                pager_field(line, key),
                pager_field(&still[0], key),
                "{key}: {still:?}"
            );
        }
    }
    let exits_paused = vcpu_exits(&still[0]);

    assert_eq!(ctl_ok(&socket, &["resume"]), "");
    assert_eq!(info(&socket)["state"], "Running");
    vm.wait_for_metrics(&metrics, LIMIT, |lines| {
        lines.last().is_some_and(|l| vcpu_exits(l) > exits_paused)
    });
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    let result = guest_result(&run);
    assert_eq!(result["verdict"], "pass", "{}", run.describe());
    assert_guest_checks_clean(&result);
    assert_eq!(field(&result, "pages_touched"), 2048, "{result}");
    assert!(!socket.exists(), "the socket is removed at exit");
}

/// A snapshot taken through the API of a paused VM (whose pager holds evicted pages): the VM
/// resumes and finishes; an apfvm started with `--api-socket` and no kernel loads it
/// (`PUT /snapshot/load`, Firecracker's body), keeps it paused until resumed, and the copy
/// finishes with the guest's checks clean; so does `apfvm restore` of the same directory.
#[test]
fn a_snapshot_taken_through_the_api_loads_through_the_api_and_restores() {
    if !kvm_available() {
        return;
    }
    let _heavy = exclusive();
    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("api.sock");
    let snap = dir.as_path().join("snap");
    let metrics = dir.as_path().join("metrics.jsonl");
    let original = watch(&[
        "demo",
        "--vcpus",
        "2",
        "--pager",
        "uffd",
        "--fault-latency",
        "20ms",
        "--metrics-file",
        path_str(&metrics),
        "--metrics-interval",
        "20ms",
        "--api-socket",
        path_str(&socket),
        "--cmdline",
        "pages=256 touchers=2 busy=1 passes=2 evict=1",
    ]);
    wait_for_api(&original, &socket);
    original.wait_for_metrics(&metrics, LIMIT, |lines| async_faults(lines) >= 10);
    ctl_ok(&socket, &["pause"]);
    assert_eq!(ctl_ok(&socket, &["snapshot", path_str(&snap)]), "");
    ctl_ok(&socket, &["resume"]);
    let first = original.finish(LIMIT);
    assert_eq!(first.code(), Some(0), "{}", first.describe());
    let first_result = guest_result(&first);
    assert_guest_checks_clean(&first_result);
    let taken = test_support::apfvm::snapshots_taken(&first.stderr);
    assert_eq!(taken.len(), 1, "{}", first.describe());
    let id = taken[0]["id"].as_str().unwrap().to_string();
    let memory_file = taken[0]["memory_file"].as_str().unwrap().to_string();
    assert!(snap.join("state").is_file());
    assert!(!socket.exists());

    // Loaded through the API: nothing runs before the load, nor before the resume.
    let socket = dir.as_path().join("load.sock");
    let copy = watch(&["run", "--api-socket", path_str(&socket)]);
    wait_for_api(&copy, &socket);
    let waiting = info(&socket);
    assert_eq!(waiting["state"], "Not started", "{waiting}");
    assert!(waiting.get("vcpus").is_none(), "{waiting}");
    ctl_fails(&socket, &["pause"], "no VM yet");
    let missing = dir.as_path().join("missing");
    ctl_fails(&socket, &["load", path_str(&missing)], "missing");
    let other_file = dir.as_path().join("other");
    std::fs::write(&other_file, b"not guest memory").unwrap();
    let body = |backend: &str| {
        serde_json::json!({
            "snapshot_path": snap,
            "mem_backend": {"backend_path": backend, "backend_type": "File"},
            "resume_vm": false,
        })
        .to_string()
    };
    let wrong = request(
        &socket,
        "PUT",
        "/snapshot/load",
        &body(path_str(&other_file)),
    );
    assert_eq!(wrong.status, 400, "{}", wrong.head);
    assert!(
        wrong.fault().contains("is not the snapshot's memory file"),
        "{}",
        wrong.body
    );
    let loaded = request(&socket, "PUT", "/snapshot/load", &body(&memory_file));
    assert_eq!(loaded.status, 204, "{}\n{}", loaded.head, loaded.body);
    let paused = info(&socket);
    assert_eq!(paused["state"], "Paused", "{paused}");
    assert_eq!(paused["snapshot_id"], id.as_str(), "{paused}");
    assert_eq!(paused["vcpus"], 2, "{paused}");
    assert_eq!(paused["pager"], "none", "{paused}");
    ctl_fails(&socket, &["load", path_str(&snap)], "loaded already");
    let not_yet = dir.as_path().join("not-yet");
    ctl_fails(
        &socket,
        &["snapshot", path_str(&not_yet)],
        "has not run since",
    );
    assert!(!not_yet.exists());
    ctl_ok(&socket, &["resume"]);
    let second = copy.finish(LIMIT);
    assert_eq!(second.code(), Some(0), "{}", second.describe());
    let second_result = guest_result(&second);
    assert_eq!(second_result["verdict"], "pass", "{}", second.describe());
    assert_guest_checks_clean(&second_result);
    for key in ["pages_touched", "cpus"] {
        assert_eq!(first_result[key], second_result[key], "{key}");
    }
    assert!(!socket.exists());

    let restored = apfvm(&["restore", "--snapshot", path_str(&snap)], LIMIT);
    assert_eq!(restored.code(), Some(0), "{}", restored.describe());
    assert_guest_checks_clean(&guest_result(&restored));
}

/// The number of the newest `apfvm-ref: chatter N` line on the console.
fn newest_chatter(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_prefix("apfvm-ref: chatter "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Bad requests of every kind (and a snapshot that cannot be written) get an error with a
/// fault message naming the problem, and the VM runs on: its console keeps going, `GET /` says Running, it stops cleanly on SIGTERM,
/// and the socket is gone then.
#[test]
fn bad_requests_are_refused_and_the_vm_runs_on() {
    if !kvm_available() {
        return;
    }
    // A guest that prints without end keeps a host CPU busy.
    let _heavy = exclusive();
    let dir = TempDir::new().unwrap();
    let socket = dir.as_path().join("api.sock");
    let snap = dir.as_path().join("snap");
    let vm = watch(&[
        "demo",
        "--api-socket",
        path_str(&socket),
        "--cmdline",
        "hold chatter",
    ]);
    wait_for_api(&vm, &socket);
    vm.wait_for_stdout("apfvm-ref: chatter 10 ", LIMIT);
    let snap_body = serde_json::json!({ "snapshot_path": snap }).to_string();
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        (
            "PATCH",
            "/vm",
            "{\"state\": Paused}",
            400,
            "bad JSON body for PATCH /vm",
        ),
        (
            "PATCH",
            "/vm",
            r#"{"state": "Running"}"#,
            400,
            "unknown variant `Running`, expected `Paused` or `Resumed`",
        ),
        (
            "PATCH",
            "/vm",
            r#"{"state": "Paused", "now": true}"#,
            400,
            "unknown field `now`",
        ),
        ("PATCH", "/vm", "", 400, "PATCH /vm needs a JSON body"),
        (
            "PUT",
            "/snapshot/create",
            &snap_body,
            400,
            "a snapshot is taken of a paused VM",
        ),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#,
            400,
            "mem_file_path is not supported",
        ),
        (
            "PUT",
            "/snapshot/load",
            &snap_body,
            400,
            "a VM is already running",
        ),
        (
            "GET",
            "/machine-config",
            "",
            404,
            "no endpoint /machine-config",
        ),
        (
            "PUT",
            "/vm",
            r#"{"state": "Paused"}"#,
            405,
            "/vm takes PATCH, not PUT",
        ),
    ];
    for &(method, path, body, status, needle) in cases {
        let answer = request(&socket, method, path, body);
        assert_eq!(
            answer.status, status,
            "{method} {path} {body}: {}",
            answer.head
        );
        let fault = answer.fault();
        assert!(fault.contains(needle), "{method} {path} {body}: {fault}");
    }
    let answer = request(&socket, "PUT", "/vm", "{}");
    assert!(answer.head.contains("\r\nallow: PATCH"), "{}", answer.head);
    let big = format!(
        "{{\"state\": \"Paused\", \"x\": \"{}\"}}",
        "a".repeat(100 << 10)
    );
    let answer = request(&socket, "PATCH", "/vm", &big);
    assert_eq!(answer.status, 413, "{}", answer.head);
    assert!(answer.fault().contains("larger than"), "{}", answer.body);
    // Not HTTP at all: hyper's own 400.
    let answer = raw(&socket, b"HELLO APFVM\r\n\r\n");
    assert_eq!(answer.status, 400, "{}", answer.head);
    ctl_fails(
        &socket,
        &["snapshot", path_str(&snap)],
        "a snapshot is taken of a paused VM",
    );
    assert!(!snap.exists(), "no snapshot was written");
    // A snapshot that cannot be written: the error, and the VM stays paused until resumed.
    ctl_ok(&socket, &["pause"]);
    let file = dir.as_path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    ctl_fails(
        &socket,
        &["snapshot", path_str(&file.join("snap"))],
        "snapshot failed",
    );
    assert_eq!(info(&socket)["state"], "Paused");
    ctl_ok(&socket, &["resume"]);

    // The VM ran on through all of it: the guest keeps printing.
    assert_eq!(info(&socket)["state"], "Running");
    let before = std::cell::Cell::new(0);
    vm.wait_until("the console so far", LIMIT, |out, _| {
        before.set(newest_chatter(out));
        true
    });
    vm.wait_until("the guest to go on", LIMIT, |out, _| {
        newest_chatter(out) > before.get() + 20
    });
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), Some(143), "{}", run.describe());
    assert!(!socket.exists(), "the socket is removed at exit");
}

/// The socket never replaces anything: an existing file or socket at the path is refused
/// before any VM is built (and left as it was); flags a restore cannot take are refused
/// before `run --api-socket` without a kernel waits; a stop signal ends the wait, and the
/// socket goes with it; `ctl` on a path nobody serves says so.
#[test]
fn the_socket_path_is_never_replaced_and_goes_away() {
    let dir = TempDir::new().unwrap();
    let file = dir.as_path().join("a-file");
    std::fs::write(&file, b"keep me").unwrap();
    let theirs = dir.as_path().join("theirs.sock");
    let _listener = UnixListener::bind(&theirs).unwrap();
    for taken in [&file, &theirs] {
        let run = apfvm(&["demo", "--api-socket", path_str(taken)], LIMIT);
        assert_eq!(run.code(), Some(1), "{}", run.describe());
        assert!(
            run.stderr
                .contains(&format!("API socket {} already exists", taken.display())),
            "{}",
            run.describe()
        );
        assert!(run.stdout.is_empty(), "no guest ran: {}", run.describe());
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(
        std::fs::symlink_metadata(&theirs)
            .unwrap()
            .file_type()
            .is_socket()
    );

    let socket = dir.as_path().join("api.sock");
    let run = apfvm(
        &["run", "--api-socket", path_str(&socket), "--initrd", "/x"],
        LIMIT,
    );
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains("--initrd cannot be used with restore"),
        "{}",
        run.describe()
    );
    assert!(!socket.exists());

    let waiting = watch(&["run", "--api-socket", path_str(&socket)]);
    wait_for_api(&waiting, &socket);
    waiting.signal(libc::SIGTERM);
    let run = waiting.finish(LIMIT);
    assert_eq!(run.code(), Some(143), "{}", run.describe());
    assert!(!socket.exists(), "the socket is removed at exit");

    let run = ctl(&socket, &["info"]);
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains("cannot connect to the API socket"),
        "{}",
        run.describe()
    );
}

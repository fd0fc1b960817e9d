//! Snapshot and restore, end to end: the reference guest asks for a snapshot through its
//! port while tasks are parked on page-not-present, apfvm saves it, a new apfvm restores it,
//! and the guest's own checks (every byte, every token, nothing parked) say whether the
//! restored VM is the one that was saved.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use vmm_sys_util::tempdir::TempDir;

const LIMIT: Duration = Duration::from_secs(300);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// The one snapshot this run of apfvm took on the guest's request.
fn snapshot_taken(run: &Run) -> serde_json::Value {
    let taken = test_support::apfvm::snapshots_taken(&run.stderr);
    assert_eq!(taken.len(), 1, "one snapshot: {}", run.describe());
    taken.into_iter().next().unwrap()
}

/// Boots the reference guest with `cmdline` behind the pager and has it snapshot itself into
/// `dir`; `after` is `stop` or `resume`.
fn boot_and_snapshot(dir: &Path, vcpus: &str, latency: &str, cmdline: &str, after: &str) -> Run {
    apfvm(
        &[
            "demo",
            "--vcpus",
            vcpus,
            "--pager",
            "uffd",
            "--fault-latency",
            latency,
            "--snapshot-on-request",
            path_str(dir),
            "--after-snapshot",
            after,
            "--cmdline",
            cmdline,
        ],
        LIMIT,
    )
}

fn restore(dir: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["restore", "--snapshot", path_str(dir)];
    args.extend_from_slice(extra);
    apfvm(&args, LIMIT)
}

/// The scenario: 2 vCPUs, 1 s fetches, the snapshot taken in the second pass (after
/// the whole region was evicted, so the memory file gets pages from the pager's saved copies,
/// never through the guest mapping) with a task parked on each CPU. The restored guest's
/// parked tasks are freed by the wake-all that restoring MSR_KVM_ASYNC_PF_EN queues, and the
/// workload finishes with every byte and token right, whichever way guest RAM is restored.
#[test]
fn tasks_parked_at_snapshot_time_finish_after_restore() {
    if !kvm_available() {
        return;
    }
    let _heavy = exclusive();
    let dir = TempDir::new().unwrap();
    let snap = dir.as_path().join("snap");
    // 8 pages per CPU and pass: the 10th page-not-present of a CPU is in the second pass.
    let cmdline = "pages=16 touchers=1 passes=2 evict=1 snapshot_pfault=10 timeout_s=600";
    let saved = boot_and_snapshot(&snap, "2", "1s", cmdline, "stop");
    assert_eq!(saved.code(), Some(0), "{}", saved.describe());
    assert!(
        saved
            .stdout
            .contains("apfvm-ref: snapshot requested with 1 parked"),
        "{}",
        saved.describe()
    );
    assert!(
        !saved.stdout.contains("APFVM-RESULT"),
        "stopped at the snapshot: {}",
        saved.describe()
    );
    let info = snapshot_taken(&saved);
    let memory = PathBuf::from(info["memory_file"].as_str().unwrap());
    let meta = std::fs::metadata(&memory).unwrap();
    assert_eq!(meta.len(), 128 << 20, "{info}");
    assert!(
        meta.blocks() * 512 < meta.len() / 4,
        "the memory file is sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    assert!(field(&info, "data_pages") > 16, "{info}");

    // Guest RAM read in from the memory file, the file mapped privately (the host kernel pages
    // it in), or served lazily by the pager from the file, with async page faults.
    let lazy = ["--pager", "uffd", "--fault-latency", "2ms"];
    for (memory, extra) in [("anon", &[][..]), ("file", &[][..]), ("anon", &lazy[..])] {
        let mut flags = vec!["--memory", memory];
        flags.extend_from_slice(extra);
        let restored = restore(&snap, &flags);
        assert_eq!(
            restored.code(),
            Some(0),
            "{memory}: {}",
            restored.describe()
        );
        let result = guest_result(&restored);
        assert_eq!(
            result["verdict"],
            "pass",
            "{memory}: {}",
            restored.describe()
        );
        assert_guest_checks_clean(&result);
        assert_eq!(field(&result, "pages_touched"), 32, "{result}");
        assert_eq!(field(&result, "snapshot_requested"), 1, "{result}");
        assert!(
            restored
                .stdout
                .lines()
                .filter(|l| l.starts_with("apfvm-ref: cpu"))
                .any(|l| !l.contains("wakeall_woken=0 ")),
            "a task parked at snapshot time was freed by a wake-all: {}",
            restored.describe()
        );
        if !extra.is_empty() {
            let pager = pager_summary(&restored);
            assert!(field(&pager, "served_from_store") > 0, "{pager}");
            assert!(field(&pager, "faults_async") > 0, "{pager}");
        }
    }
    let meta_after = std::fs::metadata(&memory).unwrap();
    assert_eq!(
        meta_after.modified().unwrap(),
        meta.modified().unwrap(),
        "a restore never writes the memory file"
    );
}

/// `--after-snapshot resume`: the VM that was saved runs on and finishes, and so does the
/// copy restored from its snapshot; both see the same workload.
#[test]
fn the_saved_vm_and_its_restored_copy_both_finish() {
    if !kvm_available() {
        return;
    }
    let _heavy = exclusive();
    let dir = TempDir::new().unwrap();
    let snap = dir.as_path().join("snap");
    let cmdline = "pages=64 touchers=2 busy=1 snapshot_pfault=3";
    let original = boot_and_snapshot(&snap, "2", "20ms", cmdline, "resume");
    assert_eq!(original.code(), Some(0), "{}", original.describe());
    snapshot_taken(&original);
    let first = guest_result(&original);
    assert_guest_checks_clean(&first);

    let restored = restore(&snap, &["--vcpus", "2", "--apf", "on"]);
    assert_eq!(restored.code(), Some(0), "{}", restored.describe());
    let second = guest_result(&restored);
    assert_guest_checks_clean(&second);
    for key in ["pages_touched", "snapshot_requested", "cpus"] {
        assert_eq!(first[key], second[key], "{key}: {first} vs {second}");
    }
}

/// Without host paging, in a chain: the guest asks for two snapshots in a row as soon as its
/// CPUs are up. The first run stops at the first; a VM restored from it (RAM mapped from the
/// file) goes on from the guest's next line and stops at the second; a VM restored from that
/// one (RAM read in, or mapped) runs the workload to a clean finish. Never-written RAM is left
/// out of the memory file without being read.
#[test]
fn restore_snapshot_restore_chains_without_host_paging() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let (first, second) = (dir.as_path().join("first"), dir.as_path().join("second"));
    let saved = apfvm(
        &[
            "demo",
            "--vcpus",
            "2",
            "--mem",
            "1G",
            "--snapshot-on-request",
            path_str(&first),
            "--after-snapshot",
            "stop",
            "--cmdline",
            "snapshot_at_start=2 pages=512 touchers=2 passes=2",
        ],
        LIMIT,
    );
    assert_eq!(saved.code(), Some(0), "{}", saved.describe());
    assert!(!saved.stdout.contains("running after snapshot request"));
    let info = snapshot_taken(&saved);
    let pages = field(&info, "data_pages");
    assert!(
        pages > 0 && pages < 4096,
        "only what the guest wrote (its image, stacks, tables): {info}"
    );

    let middle = restore(
        &first,
        &[
            "--memory",
            "file",
            "--snapshot-on-request",
            path_str(&second),
            "--after-snapshot",
            "stop",
        ],
    );
    assert_eq!(middle.code(), Some(0), "{}", middle.describe());
    assert_eq!(
        middle.stdout.lines().next(),
        Some("apfvm-ref: running after snapshot request 1"),
        "{}",
        middle.describe()
    );
    assert!(!middle.stdout.contains("running after snapshot request 2"));
    let second_info = snapshot_taken(&middle);
    assert_ne!(second_info["id"], info["id"]);
    let restored = test_support::apfvm::restored(&middle.stderr).expect("restored line");
    assert_eq!(restored["id"], info["id"], "{restored}");

    for memory in ["anon", "file"] {
        let run = restore(&second, &["--memory", memory]);
        assert_eq!(run.code(), Some(0), "{memory}: {}", run.describe());
        assert_eq!(
            run.stdout.lines().next(),
            Some("apfvm-ref: running after snapshot request 2"),
            "{}",
            run.describe()
        );
        let result = guest_result(&run);
        assert_eq!(result["verdict"], "pass", "{}", run.describe());
        assert_guest_checks_clean(&result);
        assert_eq!(field(&result, "pages_touched"), 1024, "{result}");
        assert_eq!(field(&result, "snapshot_requested"), 2, "{result}");
    }
}

/// A snapshot that cannot be written (a directory where there cannot be one; a full disk) is
/// an error on stderr, and the VM resumes and finishes as if nothing had happened.
#[test]
fn a_snapshot_that_cannot_be_written_is_reported_and_the_vm_goes_on() {
    if !kvm_available() {
        return;
    }
    let _heavy = exclusive();
    let dir = TempDir::new().unwrap();
    let file = dir.as_path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let full = dir.as_path().join("full");
    std::fs::create_dir(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=16k",
            "apfvm-test",
            path_str(&full),
        ])
        .status()
        .expect("run mount");
    assert!(
        mounted.success(),
        "mounting a small tmpfs (a full disk) needs root, as the rest of these tests"
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&full);
    for (target, error) in [
        (file.join("snap"), "Not a directory"),
        (full.join("snap"), "No space left on device"),
    ] {
        let run = boot_and_snapshot(&target, "1", "5ms", "pages=32 snapshot_pfault=2", "stop");
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(
            run.stderr.contains("apfvm: error: snapshot failed") && run.stderr.contains(error),
            "{}",
            run.describe()
        );
        let result = guest_result(&run);
        assert_eq!(result["verdict"], "pass", "{}", run.describe());
        assert_guest_checks_clean(&result);
        assert!(test_support::apfvm::snapshots_taken(&run.stderr).is_empty());
    }
    let left: Vec<_> = std::fs::read_dir(full.join("snap"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "a failed snapshot leaves nothing: {left:?}"
    );
}

/// Damaged or mismatched snapshots and flags that contradict them: a clear error naming the
/// problem, exit 1, and no guest code runs.
#[test]
fn bad_snapshots_and_conflicting_flags_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let good = dir.as_path().join("good");
    let saved = boot_and_snapshot(&good, "1", "0", "pages=8 snapshot_pfault=1", "stop");
    assert_eq!(saved.code(), Some(0), "{}", saved.describe());
    let info = snapshot_taken(&saved);
    let memory_name = Path::new(info["memory_file"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_owned();
    let state = std::fs::read(good.join("state")).unwrap();

    let variant = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = dir.as_path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("state"), &state).unwrap();
        std::os::unix::fs::symlink(good.join(&memory_name), d.join(&memory_name)).unwrap();
        edit(&d);
        d
    };
    let truncated = variant("truncated", &|d| {
        std::fs::write(d.join("state"), &state[..state.len() / 2]).unwrap()
    });
    let corrupted = variant("corrupted", &|d| {
        let mut bytes = state.clone();
        let at = bytes.len() - 10;
        bytes[at] ^= 0x20;
        std::fs::write(d.join("state"), bytes).unwrap()
    });
    let newer = variant("newer", &|d| {
        let mut bytes = state.clone();
        bytes[8] = 99;
        std::fs::write(d.join("state"), bytes).unwrap()
    });
    let no_state = variant("no-state", &|d| {
        std::fs::remove_file(d.join("state")).unwrap()
    });
    let no_memory = variant("no-memory", &|d| {
        std::fs::remove_file(d.join(&memory_name)).unwrap()
    });
    let short_memory = variant("short-memory", &|d| {
        std::fs::remove_file(d.join(&memory_name)).unwrap();
        let f = std::fs::File::create(d.join(&memory_name)).unwrap();
        f.set_len(64 << 20).unwrap();
    });
    let missing = dir.as_path().join("missing");
    let memory_text = memory_name.to_str().unwrap().to_string();
    let cases: Vec<(&Path, Vec<&str>, Vec<&str>)> = vec![
        (&missing, vec![], vec!["missing", "not a directory"]),
        (&no_state, vec![], vec!["no-state/state", "No such file"]),
        (&truncated, vec![], vec!["truncated"]),
        (&corrupted, vec![], vec!["checksum mismatch"]),
        (&newer, vec![], vec!["format version 99 is newer"]),
        (&no_memory, vec![], vec![&memory_text, "No such file"]),
        (
            &short_memory,
            vec![],
            vec!["is 67108864 bytes", "134217728"],
        ),
        (
            &good,
            vec!["--vcpus", "2"],
            vec!["--vcpus 2 contradicts the snapshot"],
        ),
        (&good, vec!["--mem", "256M"], vec!["--mem 256M contradicts"]),
        (&good, vec!["--apf", "off"], vec!["--apf off contradicts"]),
        (
            &good,
            vec!["--cpu-features", "-x2apic"],
            vec!["--cpu-features -x2apic contradicts"],
        ),
        (
            &good,
            vec!["--kernel", "/dev/null"],
            vec!["--kernel cannot be used with restore"],
        ),
        (
            &good,
            vec!["--pager", "uffd", "--memory", "file"],
            vec!["--memory file cannot be used with restore: with --pager uffd"],
        ),
        (
            &good,
            vec!["--memory-image", "/dev/null"],
            vec!["--memory-image cannot be used with restore"],
        ),
        (
            &good,
            vec!["--fault-latency", "1ms"],
            vec!["--fault-latency needs --pager uffd"],
        ),
    ];
    for (snapshot, flags, expected) in cases {
        let run = restore(snapshot, &flags);
        assert_eq!(run.code(), Some(1), "{flags:?}: {}", run.describe());
        for needle in expected {
            assert!(
                run.stderr.contains(needle),
                "{needle:?}: {}",
                run.describe()
            );
        }
        assert!(run.stdout.is_empty(), "no guest ran: {}", run.describe());
    }
    let boot = apfvm(&["demo", "--memory", "file"], LIMIT);
    assert_eq!(boot.code(), Some(1), "{}", boot.describe());
    assert!(
        boot.stderr.contains("--memory file needs `apfvm restore`"),
        "{}",
        boot.describe()
    );
    // The good one restores (and the damaged copies did not touch it).
    let run = restore(&good, &[]);
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_guest_checks_clean(&guest_result(&run));
}

//! Lazy restore through the pager (`apfvm restore --pager uffd`): a snapshot taken in the
//! middle of the reference guest's workload, restored on demand (which records the working
//! set), with the working set prefetched (on a copy of the snapshot), and with every page
//! prefetched; bad working sets fall back to on demand; a memory file that goes away under a
//! running restore stops it with an error naming the page. The guest checks every byte and
//! token in each.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use vmm_sys_util::tempdir::TempDir;

const LIMIT: Duration = Duration::from_secs(300);

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Boots the reference guest behind the pager with `cmdline` and has it snapshot itself
/// into `dir` and stop.
fn snapshot(dir: &Path, mem: &str, cmdline: &str) {
    let run = apfvm(
        &[
            "demo",
            "--vcpus",
            "2",
            "--mem",
            mem,
            "--pager",
            "uffd",
            "--snapshot-on-request",
            path_str(dir),
            "--after-snapshot",
            "stop",
            "--cmdline",
            cmdline,
        ],
        LIMIT,
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(
        test_support::apfvm::snapshots_taken(&run.stderr).len(),
        1,
        "{}",
        run.describe()
    );
}

fn lazy_restore(dir: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["restore", "--snapshot", path_str(dir), "--pager", "uffd"];
    args.extend_from_slice(extra);
    let run = apfvm(&args, LIMIT);
    assert_eq!(run.code(), Some(0), "{extra:?}: {}", run.describe());
    let result = guest_result(&run);
    assert_eq!(result["verdict"], "pass", "{extra:?}: {}", run.describe());
    assert_guest_checks_clean(&result);
    assert_eq!(field(&result, "pages_touched"), 4096, "{result}");
    run
}

/// The pages of a working-set file (its JSON after the 24-byte container header).
fn working_set_pages(path: &Path) -> Vec<u64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_slice(&bytes[24..]).unwrap();
    json["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect()
}

/// A working-set file in the container format: magic, version, CRC, length, JSON.
fn craft_working_set(path: &Path, json: &serde_json::Value) {
    let payload = serde_json::to_vec(json).unwrap();
    let mut bytes = b"APFVMWSF".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    std::fs::write(path, bytes).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Snapshot in the second pass over the region (after the guest evicted it all, so every
/// region page is data in the memory file), 2 vCPUs; then on demand, working set, all.
#[test]
fn lazy_restores_on_demand_with_the_working_set_and_with_all_pages() {
    if !kvm_available() {
        return;
    }
    let _heavy = exclusive();
    let dir = TempDir::new().unwrap();
    let snap = dir.as_path().join("snap");
    // 1024 region pages per CPU and pass: the 1100th page-not-present is in the second pass.
    snapshot(
        &snap,
        "256M",
        "pages=2048 touchers=1 passes=2 evict=1 snapshot_pfault=1100",
    );
    let copy = dir.as_path().join("copy");
    copy_dir(&snap, &copy);

    // On demand: every first touch comes from the memory file and is recorded.
    let on_demand = lazy_restore(&snap, &["--fault-latency", "100us"]);
    let demand_pager = pager_summary(&on_demand);
    assert!(field(&demand_pager, "faults_async") > 0, "{demand_pager}");
    let recorded = working_set_pages(&snap.join("working-set"));
    let image_pages = (256u64 << 20) / 4096;
    assert!(
        recorded.len() > 500 && (recorded.len() as u64) < image_pages / 10,
        "the working set ({} pages) is far smaller than the image ({image_pages} pages)",
        recorded.len()
    );

    // The working set, recorded on the original, replayed on a copy of the snapshot.
    std::fs::copy(snap.join("working-set"), copy.join("working-set")).unwrap();
    let replayed = lazy_restore(
        &copy,
        &["--fault-latency", "100us", "--prefetch", "working-set"],
    );
    let ws_pager = pager_summary(&replayed);
    assert!(field(&ws_pager, "prefetched") > 0, "{ws_pager}");
    assert!(
        field(&ws_pager, "served_from_store") < field(&demand_pager, "served_from_store"),
        "fewer pages faulted in from the file: {ws_pager} vs {demand_pager}"
    );
    assert_eq!(
        working_set_pages(&copy.join("working-set")),
        recorded,
        "a prefetching restore leaves the working set as it was"
    );

    // Every page with data.
    let all = lazy_restore(&snap, &["--fault-latency", "100us", "--prefetch", "all"]);
    let all_pager = pager_summary(&all);
    let all_pages = field(&all_pager, "prefetched");
    assert!(all_pages > 0, "{all_pager}");
    eprintln!(
        "working set: {} pages; all: {all_pages} pages prefetched; on demand: {} faulted in",
        recorded.len(),
        field(&demand_pager, "served_from_store")
    );
    assert_ne!(
        all_pages,
        recorded.len() as u64,
        "all pages with data is not the working set"
    );
}

/// Working sets that cannot be used (truncated, from another snapshot, listing pages outside
/// RAM): a warning naming the problem, and a plain on-demand restore that is right.
#[test]
fn an_unusable_working_set_is_a_warning_and_an_on_demand_restore() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let snap = dir.as_path().join("snap");
    snapshot(
        &snap,
        "128M",
        "pages=2048 touchers=1 passes=2 snapshot_pfault=200",
    );
    let state = std::fs::read(snap.join("state")).unwrap();
    let state_json: serde_json::Value = serde_json::from_slice(&state[24..]).unwrap();
    let id = state_json["id"].as_str().unwrap().to_string();
    let ws = |name: &str| -> PathBuf { dir.as_path().join(name) };
    craft_working_set(
        &ws("other"),
        &serde_json::json!({"snapshot_id": "0123456789abcdef", "page_size": 4096,
            "ended_by": "test", "recorded_ms": 1, "pages": [1, 2, 3]}),
    );
    craft_working_set(
        &ws("outside"),
        &serde_json::json!({"snapshot_id": id, "page_size": 4096,
            "ended_by": "test", "recorded_ms": 1, "pages": [1, 1_000_000_000u64]}),
    );
    craft_working_set(
        &ws("truncated"),
        &serde_json::json!({"snapshot_id": id, "page_size": 4096,
            "ended_by": "test", "recorded_ms": 1, "pages": [1, 2, 3, 4, 5, 6, 7, 8]}),
    );
    let bytes = std::fs::read(ws("truncated")).unwrap();
    std::fs::write(ws("truncated"), &bytes[..bytes.len() - 5]).unwrap();
    for (name, warning) in [
        ("other", "recorded on snapshot 0123456789abcdef"),
        ("outside", "lists page 1000000000, outside"),
        ("truncated", "truncated"),
        ("missing", "No such file"),
    ] {
        let run = lazy_restore(
            &snap,
            &[
                "--prefetch",
                "working-set",
                "--working-set",
                path_str(&ws(name)),
            ],
        );
        assert!(
            run.stderr.contains(warning) && run.stderr.contains("restoring on demand"),
            "{name}: {}",
            run.describe()
        );
        assert_eq!(field(&pager_summary(&run), "prefetched"), 0);
    }
}

/// The memory file shrinks under a running lazy restore: the pager cannot read a page, and
/// the VM stops with an error naming it, exit 1.
#[test]
fn a_memory_file_truncated_under_a_lazy_restore_stops_it_with_an_error() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let snap = dir.as_path().join("snap");
    snapshot(
        &snap,
        "128M",
        "pages=2048 touchers=1 passes=2 evict=1 snapshot_pfault=1100",
    );
    let vm = watch(&[
        "restore",
        "--snapshot",
        path_str(&snap),
        "--pager",
        "uffd",
        "--fault-latency",
        "20ms",
    ]);
    vm.wait_until("the restored line", LIMIT, |_, err| {
        err.contains("apfvm: restored: ")
    });
    let memory = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("memory-")
        })
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&memory)
        .unwrap()
        .set_len(0)
        .unwrap();
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains("host paging failed")
            && run.stderr.contains("reading page at offset")
            && run.stderr.contains(path_str(&memory)),
        "{}",
        run.describe()
    );
}

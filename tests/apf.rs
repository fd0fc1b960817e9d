//! The async page fault protocol end to end: the real apfvm with `--pager uffd`, real KVM and
//! userfaultfd, and the reference guest's guest side (the same behaviour as Linux's), which
//! checks every token and every byte.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(180);

/// Runs the reference guest with a paging workload and returns (guest result, pager summary)
/// after checking the guest's own verdict: every byte right, every token accounted for,
/// nothing left parked.
fn workload(
    vcpus: &str,
    apfvm_flags: &[&str],
    guest_cmdline: &str,
) -> Option<(serde_json::Value, serde_json::Value)> {
    if !kvm_available() {
        return None;
    }
    let _one_at_a_time = exclusive();
    let mut args = vec!["demo", "--vcpus", vcpus, "--mem", "128M", "--pager", "uffd"];
    args.extend_from_slice(apfvm_flags);
    args.extend_from_slice(&["--cmdline", guest_cmdline]);
    let run = apfvm(&args, LIMIT);
    let result = guest_result(&run);
    assert_eq!(result["verdict"], "pass", "{args:?}: {}", run.describe());
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_guest_checks_clean(&result);
    Some((result, pager_summary(&run)))
}

/// Test 1: with async PF a busy task on the same vCPU keeps running while a toucher waits
/// for a 20 ms fetch; without it the whole vCPU stalls.
#[test]
fn busy_task_runs_while_toucher_waits_only_with_apf() {
    let cmdline = "pages=48 touchers=1 busy=1 passes=1 stall_us=5000";
    let flags = ["--fault-latency", "20ms", "--apf", "on"];
    let Some((on, _)) = workload("1", &flags, cmdline) else {
        return;
    };
    assert_eq!(field(&on, "apf"), 1, "{on}");
    assert!(
        field(&on, "pfaults") >= 48,
        "every first touch is a pfault: {on}"
    );
    assert!(field(&on, "stalls") > 0, "{on}");
    assert!(
        field(&on, "busy_ops_during_stalls") > 0,
        "busy ran during stalls: {on}"
    );
    assert_eq!(field(&on, "pages_touched"), 48, "{on}");

    let flags = ["--fault-latency", "20ms", "--apf", "off"];
    let (off, pager) = workload("1", &flags, cmdline).unwrap();
    assert_eq!(field(&off, "apf"), 0, "{off}");
    assert_eq!(field(&off, "pfaults"), 0, "{off}");
    assert!(
        field(&off, "stalls") >= 40,
        "each 20 ms fetch stalls the vCPU: {off}"
    );
    assert_eq!(
        field(&off, "busy_ops_during_stalls"),
        0,
        "nothing runs in a stall: {off}"
    );
    assert!(field(&pager, "faults_async") >= 48, "{pager}");
}

/// Test 2: a batch of faults completed in reverse order: every task wakes for its own token,
/// none lost or duplicated.
#[test]
fn reverse_order_completions_wake_the_right_tasks() {
    let flags = ["--fault-latency", "2ms", "--fault-order", "reverse:4"];
    let Some((r, pager)) = workload("1", &flags, "pages=256 touchers=4 busy=1 passes=1") else {
        return;
    };
    assert!(field(&r, "pfaults") >= 256, "{r}");
    assert!(
        field(&r, "out_of_order") > 0,
        "completions came out of order: {r}"
    );
    assert_eq!(
        field(&r, "completions"),
        field(&r, "pfaults"),
        "each pfault completed exactly once: {r}"
    );
    assert!(field(&r, "max_parked") >= 2, "{r}");
    assert!(field(&pager, "faults_async") >= 256, "{pager}");
}

/// Test 3: a completion that arrives before the guest parked the task leaves a dummy entry,
/// which the park then consumes. The guest holds each park back until the page-ready has
/// come (`dummy_us=0`), so every page-not-present is overtaken, whatever the host's timing.
#[test]
fn completion_before_pfault_uses_the_dummy_entry() {
    let cmdline = "pages=256 touchers=2 busy=1 passes=1 dummy=1 dummy_us=0";
    let Some((r, _)) = workload("1", &[], cmdline) else {
        return;
    };
    assert!(field(&r, "pfaults") > 0, "{r}");
    assert_eq!(field(&r, "dummies"), field(&r, "pfaults"), "{r}");
    assert_eq!(field(&r, "dummy_consumed"), field(&r, "dummies"), "{r}");
}

/// Test 4: CPU 1 goes offline with tasks parked on pending faults and comes back: all are
/// woken, the wake-all after re-enabling is seen, nothing stays parked.
#[test]
fn cpu_hotplug_with_parked_tasks_wakes_everything() {
    let flags = ["--fault-latency", "30ms"];
    let cmdline = "pages=512 touchers=2 busy=1 passes=1 hotplug=2";
    let Some((r, _)) = workload("2", &flags, cmdline) else {
        return;
    };
    assert_eq!(field(&r, "offline_cycles"), 2, "{r}");
    assert!(
        field(&r, "parked_at_offline") > 0,
        "tasks were parked when CPU 1 left: {r}"
    );
    assert!(field(&r, "wakealls_after_online") >= 2, "{r}");
    assert_eq!(field(&r, "pages_touched"), 512, "{r}");
}

/// Test 5: per-page fingerprints over 65,536+ faults in random order on 2 vCPUs, with the
/// whole region evicted between passes; the guest checks every byte.
#[test]
fn every_byte_survives_65536_faults_and_eviction_cycles() {
    let cmdline = "pages=16384 passes=4 touchers=2 busy=0 evict=1 seed=7";
    let Some((r, pager)) = workload("2", &[], cmdline) else {
        return;
    };
    assert_eq!(field(&r, "pages_touched"), 4 * 16384, "{r}");
    assert!(field(&r, "evictions_requested") >= 3, "{r}");
    assert!(field(&pager, "faults_async") >= 65_536, "{pager}");
    assert!(field(&pager, "restored_from_swap") >= 3 * 16384, "{pager}");
}

/// Test 6: periodic eviction racing fault-in of the same pages, random latencies, both
/// memory backends: no corruption, no hang.
#[test]
fn eviction_racing_fault_in_under_stress_keeps_data() {
    for memory in ["anon", "memfd"] {
        let flags = [
            "--memory",
            memory,
            "--evict",
            "3ms:30%",
            "--fault-latency",
            "0ms-3ms",
            "--pager-workers",
            "4",
        ];
        let Some((r, pager)) = workload("2", &flags, "pages=2048 passes=6 touchers=2 busy=1")
        else {
            return;
        };
        assert_eq!(field(&r, "pages_touched"), 6 * 2048, "{memory}: {r}");
        assert!(field(&pager, "pages_evicted") > 0, "{memory}: {pager}");
        assert!(field(&pager, "restored_from_swap") > 0, "{memory}: {pager}");
    }
}

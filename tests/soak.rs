//! Soak: at least 1,000,000 host faults on 2 vCPUs with eviction cycles (the guest evicts its
//! whole region between passes, and apfvm evicts at random on top) and completions in random
//! order, ending with the reference guest's full fingerprint check, and apfvm's memory
//! watched from outside all along. Minutes long, so not part of `cargo test`: run it with
//! `cargo soak` (an alias in .cargo/config.toml). APFVM_SOAK_PASSES sets the passes over the
//! 64 MiB region (default 62: 16,384 pages × 62 = 1,015,808 faults).

mod common;

use std::time::{Duration, Instant};

use common::*;

const PAGES: u64 = 16_384;

/// Resident set of a process, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
#[ignore = "minutes long: run with `cargo soak`"]
fn soak_a_million_faults_with_eviction_and_random_order_loses_nothing() {
    if !kvm_available() {
        return;
    }
    let passes: u64 = std::env::var("APFVM_SOAK_PASSES")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(62);
    // ~2,400 faults/s on hosts that emulate guest kernel mode: give the guest's watchdog room.
    let cmdline =
        format!("pages={PAGES} passes={passes} touchers=4 busy=1 evict=1 seed=11 timeout_s=3000");
    let started = Instant::now();
    let child = spawn(&[
        "demo",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--pager",
        "uffd",
        // Random fetch times reorder completions; the periodic evictor races fault-ins.
        "--fault-latency",
        "0us-400us",
        "--pager-workers",
        "4",
        "--evict",
        "500ms:2%",
        "--cmdline",
        &cmdline,
    ]);
    let pid = child.id();
    let sampler = std::thread::spawn(move || {
        let mut samples = Vec::new();
        while let Some(kib) = rss_kib(pid) {
            samples.push((started.elapsed(), kib));
            std::thread::sleep(Duration::from_secs(1));
        }
        samples
    });
    let run = wait(child, Duration::from_secs(3600));
    let samples = sampler.join().unwrap();
    let result = guest_result(&run);
    let pager = pager_summary(&run);
    eprintln!(
        "soak: {:?}, {} faults, {} evicted; guest {result}",
        run.elapsed,
        field(&pager, "faults"),
        field(&pager, "pages_evicted")
    );
    assert_eq!(result["verdict"], "pass", "{}", run.describe());
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_guest_checks_clean(&result);
    assert_eq!(field(&result, "pages_touched"), passes * PAGES, "{result}");
    assert!(
        field(&pager, "faults_async") + field(&pager, "faults_sync") >= passes * PAGES,
        "{pager}"
    );
    assert!(
        field(&pager, "restored_from_swap") >= (passes - 1) * PAGES,
        "{pager}"
    );

    // Stable memory: once the region has been through the first eviction cycles (guest RAM
    // resident plus the pager's copies of evicted pages), apfvm's RSS must not keep growing.
    // The peak of the last quarter of the run may exceed the peak of the second quarter only
    // by allocator noise.
    let quarter = samples.len() / 4;
    assert!(quarter >= 2, "too few RSS samples: {samples:?}");
    let peak = |s: &[(Duration, u64)]| s.iter().map(|(_, k)| *k).max().unwrap_or(0);
    let (early, late) = (
        peak(&samples[quarter..2 * quarter]),
        peak(&samples[3 * quarter..]),
    );
    eprintln!("soak: RSS peak {early} KiB (2nd quarter), {late} KiB (last quarter)");
    assert!(
        late <= early + 16 * 1024,
        "apfvm's RSS grew from {early} KiB to {late} KiB: {samples:?}"
    );
}

//! Host paging and async page faults, end to end: the real apfvm with `--pager uffd`, real
//! KVM and userfaultfd, and the reference guest checking every token and every byte.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

fn field(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric '{key}' in {v}"))
}

/// All guest RAM behind the pager, with pages evicted every 2 ms while the guest boots its
/// CPUs: kernel-mode touches are served synchronously, evicted pages come back intact.
#[test]
fn guest_boots_with_all_ram_paged_and_evicted_under_it() {
    if !kvm_available() {
        return;
    }
    for memory in ["anon", "memfd"] {
        let run = apfvm(
            &[
                "demo",
                "--vcpus",
                "2",
                "--memory",
                memory,
                "--pager",
                "uffd",
                "--evict",
                "2ms:50%",
                "--fault-latency",
                "20ms",
            ],
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{memory}: {}", run.describe());
        assert!(
            run.stdout.contains("apfvm-ref: all 2 cpus up"),
            "{}",
            run.describe()
        );
        let pager = pager_summary(&run);
        assert!(field(&pager, "faults_sync") > 0, "{pager}");
        assert!(field(&pager, "served_from_store") > 0, "{pager}");
        assert!(field(&pager, "pages_evicted") > 0, "{pager}");
        // Synchronous (guest kernel-mode) faults skip the 20 ms latency model.
        assert!(field(&pager, "service_us_mean") < 10_000, "{pager}");
    }
}

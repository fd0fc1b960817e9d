//! Host paging and async page faults, end to end: the real apfvm with `--pager uffd`, real
//! KVM and userfaultfd, and the reference guest checking every token and every byte.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

/// All guest RAM behind the pager, with pages evicted every 2 ms while the guest boots its
/// CPUs: kernel-mode touches are served synchronously (that they skip the latency model is
/// the pager's unit tests' business), evicted pages come back intact.
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
    }
}

/// `--metrics-file` writes interval lines and a final summary a user can trust: per-vCPU
/// KVM_RUN time and synchronous-fault stalls, and the pager's latency histograms; the final
/// line is written even when apfvm is stopped by a signal.
#[test]
fn metrics_file_has_interval_lines_and_a_consistent_final_summary() {
    if !kvm_available() {
        return;
    }
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let path = file.as_path().to_str().unwrap();
    let vm = watch(&[
        "demo",
        "--vcpus",
        "2",
        "--pager",
        "uffd",
        "--cmdline",
        "hold",
        "--metrics-file",
        path,
        "--metrics-interval",
        "20ms",
    ]);
    vm.wait_for_stdout("apfvm-ref: holding", LIMIT);
    // Two interval lines written after the guest is up, so that they cover a running guest.
    let written = metrics_lines(file.as_path()).len();
    vm.wait_for_metrics(file.as_path(), LIMIT, |lines| lines.len() >= written + 2);
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), Some(143), "{}", run.describe());

    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let (last, intervals) = lines.split_last().expect("metrics lines");
    assert!(intervals.len() >= 2, "{text}");
    assert!(intervals.iter().all(|l| l["type"] == "interval"));
    assert!(
        intervals
            .windows(2)
            .all(|w| w[0]["t_ms"].as_u64() <= w[1]["t_ms"].as_u64()),
        "{text}"
    );
    assert_eq!(last["type"], "final");
    let vcpus = last["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    assert!(
        vcpus.iter().all(|v| v["run_ms"].as_f64().unwrap() > 0.0),
        "{last}"
    );
    let sync_faults: u64 = vcpus.iter().map(|v| field(v, "sync_faults")).sum();
    let pager = &last["pager"];
    assert!(sync_faults > 0, "{last}");
    assert_eq!(sync_faults, field(pager, "faults_sync"), "{last}");
    assert_eq!(
        field(&pager["service_sync"], "count"),
        sync_faults,
        "{last}"
    );
}

/// `--kvm-trace` (root: KVM's tracepoints) tells, per vCPU, the faults the guest was told
/// about from the ones KVM waited out by halting the vCPU, and times those halts. With async
/// PF on, every page-not-present the guest counted was delivered; with it off, every async
/// fault is an APF halt that lasted at least the 2 ms fetch.
#[test]
fn kvm_trace_tells_delivered_pfaults_from_timed_apf_halts() {
    if !kvm_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: --kvm-trace needs root (tracefs)");
        return;
    }
    let _one_at_a_time = exclusive();
    for apf in ["on", "off"] {
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let path = file.as_path().to_str().unwrap();
        let run = apfvm(
            &[
                "demo",
                "--pager",
                "uffd",
                "--fault-latency",
                "2ms",
                "--apf",
                apf,
                "--kvm-trace",
                "--metrics-file",
                path,
                "--cmdline",
                "pages=64 touchers=2 busy=1",
            ],
            LIMIT,
        );
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        let guest = guest_result(&run);
        let text = std::fs::read_to_string(path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let trace = &last["kvm_trace"];
        let vcpu = &last["vcpus"][0];
        let context = format!("apf {apf}: {last}\n{guest}");
        let ms = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap();
        assert_eq!(
            field(&trace["vcpus"][0], "async_faults"),
            field(trace, "async_faults")
        );
        assert!(field(trace, "async_faults") >= 64, "{context}");
        assert_eq!(field(trace, "lost_events"), 0, "{context}");
        // The guest counts the page-not-presents it got; with async PF off it gets none.
        assert_eq!(
            field(trace, "pfaults_delivered"),
            field(&guest, "pfaults"),
            "{context}"
        );
        if apf == "off" {
            assert_eq!(field(&guest, "pfaults"), 0, "{context}");
        }
        // Every async fault KVM could not tell the guest about was waited out in a halt, and
        // no halt ended before the 2 ms fetch did.
        assert_eq!(
            field(trace, "apf_halts") + field(trace, "apf_halts_open"),
            field(trace, "async_faults") - field(trace, "pfaults_delivered"),
            "{context}"
        );
        assert!(
            ms(vcpu, "apf_halt_ms") >= 2.0 * field(trace, "apf_halts") as f64,
            "each halt lasts at least the 2 ms fetch: {context}"
        );
        assert_eq!(
            field(vcpu, "apf_halts"),
            field(trace, "apf_halts"),
            "{context}"
        );
        assert!(
            ms(vcpu, "host_fault_stall_ms")
                >= ms(vcpu, "apf_halt_ms") + ms(vcpu, "sync_fault_stall_ms") - 1e-6,
            "{context}"
        );
    }
}

/// `apfvm bench` runs its cases on the real guest and writes a JSON report and an SVG chart
/// a user can read: every case present, the baseline at ratio 1, async PF delivered only
/// in the apf-on case, and the floor measured in the same run.
#[test]
fn bench_writes_a_report_and_chart_for_every_case() {
    if !kvm_available() {
        return;
    }
    let _one_at_a_time = exclusive();
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let out = dir.as_path().to_str().unwrap();
    let run = apfvm(
        &[
            "bench",
            "--output",
            out,
            "--vcpus-list",
            "1",
            "--latencies",
            "1ms",
            "--pages-per-vcpu",
            "32",
            "--floor-pages",
            "500",
        ],
        LIMIT,
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.as_path().join("bench.json")).unwrap())
            .unwrap();
    let cases = report["cases"].as_array().unwrap();
    let labels: Vec<&str> = cases.iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        ["1vcpu baseline", "1vcpu apf-off 1ms", "1vcpu apf-on 1ms"]
    );
    assert_eq!(cases[0]["busy_ops_ratio_to_baseline"], 1.0);
    assert_eq!(field(&cases[1], "pfaults"), 0, "{}", cases[1]);
    assert!(field(&cases[2], "pfaults") > 0, "{}", cases[2]);
    assert!(
        field(&cases[2]["service"], "p50_us") >= 1000,
        "{}",
        cases[2]
    );
    assert_eq!(field(&report["floor"]["touch"], "count"), 500);
    let svg = std::fs::read_to_string(dir.as_path().join("bench.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("1vcpu apf-on 1ms"),
        "chart labels"
    );
}

/// A memory image that cannot be read any more (here: truncated under the running VM) stops
/// the VM with an error naming the file and the page, and a non-zero exit; no hang, and no
/// silent zero page handed to the guest.
#[test]
fn an_unreadable_memory_image_stops_the_vm_with_an_error_naming_file_and_page() {
    if !kvm_available() {
        return;
    }
    let _one_at_a_time = exclusive();
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    // Zeros written as data: a hole would be served as a zero page without a read (the
    // pager knows the image's holes from when it opened it).
    let zeros = vec![0u8; 1 << 20];
    for mib in 0..128u64 {
        use std::os::unix::fs::FileExt;
        image.as_file().write_all_at(&zeros, mib << 20).unwrap();
    }
    let path = image.as_path().to_str().unwrap().to_string();
    let metrics = vmm_sys_util::tempfile::TempFile::new().unwrap();
    // 20,000 first touches, each read from the image after 20 ms: the guest needs well over
    // a minute for them, so it is still faulting pages in when the file shrinks, soon after
    // the first 100 pages came from it.
    let vm = watch(&[
        "demo",
        "--mem",
        "128M",
        "--pager",
        "uffd",
        "--memory-image",
        &path,
        "--fault-latency",
        "20ms",
        "--metrics-file",
        metrics.as_path().to_str().unwrap(),
        "--metrics-interval",
        "20ms",
        "--cmdline",
        "pages=20000 touchers=4 busy=1 passes=1 timeout_s=3000",
    ]);
    vm.wait_for_metrics(metrics.as_path(), LIMIT, |lines| {
        lines
            .iter()
            .any(|l| l["pager"]["served_from_store"].as_u64() >= Some(100))
    });
    image.as_file().set_len(0).unwrap();
    let run = vm.finish(LIMIT);
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains("host paging failed")
            && run.stderr.contains(&format!("of memory image {path}"))
            && run.stderr.contains("reading page at offset 0x"),
        "{}",
        run.describe()
    );
    assert!(
        !run.stdout.contains("APFVM-RESULT"),
        "the guest must not finish on zero pages: {}",
        run.describe()
    );
}

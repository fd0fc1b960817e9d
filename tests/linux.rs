//! Linux under apfvm: the project's own kernel (Debian's linux-source-6.1 + the patch series
//! in guest-kernel-patches/, built by resources/linux/build.sh), an initramfs with busybox and
//! the static `apfvm-workload`, booted by the real apfvm binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use test_support::linux_guest;

const LIMIT: Duration = Duration::from_secs(300);

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Builds the kernel and the initramfs with busybox and the static apfvm-workload (once per
/// test run; build.sh's stamps cache it across runs); returns build.sh's output directory.
fn linux_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = cache_dir().join("linux");
        let status = Command::new("bash")
            .arg(repo().join("resources/linux/build.sh"))
            .arg(&out)
            .status()
            .expect("run resources/linux/build.sh");
        assert!(status.success(), "building the Linux guest failed");
        out
    })
}

/// Boots Linux with `flags`, runs `command` as its /init payload, and checks it reached
/// userspace on `vcpus` CPUs, ran the command with exit status 0 and rebooted (apfvm 0).
fn boot_linux(vcpus: u8, flags: &[&str], command: &str) -> Option<Run> {
    if !kvm_available() {
        return None;
    }
    let dir = linux_guest();
    let (vmlinux, initramfs) = (linux_guest::vmlinux(dir), linux_guest::initramfs(dir));
    let _one_at_a_time = exclusive();
    let cmdline = linux_guest::cmdline_running(command).unwrap();
    let vcpus = vcpus.to_string();
    let mut args = vec![
        "run",
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--initrd",
        initramfs.to_str().unwrap(),
        "--vcpus",
        &vcpus,
        "--mem",
        "128M",
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(flags);
    let run = apfvm(&args, LIMIT);
    let up = format!("{}{vcpus}", linux_guest::USERSPACE_UP);
    assert!(run.stdout.contains(&up), "{}", run.describe());
    assert_eq!(
        linux_guest::command_status(&run.stdout),
        Some(0),
        "{}",
        run.describe()
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    Some(run)
}

#[test]
fn linux_boots_runs_a_command_and_powers_off_on_one_and_two_vcpus() {
    for vcpus in [1, 2] {
        let Some(run) = boot_linux(vcpus, &[], "cat /sys/devices/system/cpu/online") else {
            return;
        };
        let online = if vcpus == 1 { "0" } else { "0-1" };
        assert!(
            run.stdout.lines().any(|l| l.trim() == online),
            "{}",
            run.describe()
        );
    }
}

/// The workload's `APFVM-WORKLOAD {json}` line as JSON.
fn workload_result(run: &Run) -> serde_json::Value {
    linux_guest::workload_result(&run.stdout)
        .unwrap_or_else(|| panic!("no APFVM-WORKLOAD line: {}", run.describe()))
}

fn number(value: &serde_json::Value, key: &str) -> f64 {
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {value}"))
}

/// No task is still parked, and every park was ended by its page-ready or by a wake-all
/// (a page-ready that found no sleeper left a dummy entry instead).
fn assert_every_park_ended(counters: &serde_json::Value, context: &str) {
    assert_eq!(number(counters, "apf_parked_now"), 0.0, "{context}");
    assert_eq!(
        number(counters, "apf_ready") + number(counters, "apf_wake_all_tasks"),
        number(counters, "apf_parked") + number(counters, "apf_dummy"),
        "page-ready + tasks woken by wake-all = parks + dummies: {context}"
    );
}

/// One toucher and one busy thread on CPU 0, the toucher at nice -20 (it keeps the CPU
/// whenever it can run, so the busy thread runs only while the toucher is parked). Before each
/// pass the toucher has apfvm evict its 512 pages, so each first touch is a user-mode fault
/// the host serves after 5 ms.
const TOUCH_WORKLOAD: &str =
    "apfvm-workload --evict --cpu 0 --pages 256 --passes 2 --toucher-nice -20";

#[test]
fn linux_async_page_faults_keep_busy_tasks_running_and_data_intact() {
    let paging = ["--pager", "uffd", "--fault-latency", "5ms"];
    let Some(on) = boot_linux(2, &[&paging[..], &["--apf", "on"]].concat(), TOUCH_WORKLOAD) else {
        return;
    };
    let with = workload_result(&on);
    let counters = &with["counters"];
    let describe = || format!("{with}\n{}", on.describe());
    assert_eq!(with["verdict"], "pass", "{}", describe());
    assert_eq!(number(&with, "pages_touched"), 512.0, "{}", describe());
    assert_eq!(number(&with, "pages_evicted"), 512.0, "{}", describe());
    assert_eq!(number(counters, "apf_enabled_cpus"), 2.0, "{}", describe());
    // Re-touches of evicted pages are page-not-presents the guest handled by parking the
    // toucher (KVM halts the vCPU instead only when it cannot inject one at that moment).
    assert!(number(counters, "apf_not_present") > 0.0, "{}", describe());
    assert!(number(counters, "apf_parked") > 0.0, "{}", describe());
    assert_every_park_ended(counters, &describe());
    let pager = pager_summary(&on);
    assert!(pager["faults_async"].as_u64().unwrap() >= 512, "{pager}");
    assert_eq!(
        pager["restored_from_swap"].as_u64().unwrap(),
        512,
        "{pager}"
    );
    // How much the busy thread got done while the toucher waited is the bench's measure
    // (`apfvm bench --guest linux`); that it ran at all is this test's.
    assert!(
        number(&with, "busy_ops_during_stalls") > 0.0,
        "with async PF the busy thread runs while the toucher waits for its pages: {}",
        describe()
    );

    let off = boot_linux(
        2,
        &[&paging[..], &["--apf", "off"]].concat(),
        TOUCH_WORKLOAD,
    )
    .unwrap();
    let without = workload_result(&off);
    let describe = || format!("{without}\n{}", off.describe());
    assert_eq!(without["verdict"], "pass", "{}", describe());
    assert_eq!(number(&without, "pages_evicted"), 512.0, "{}", describe());
    for (name, value) in without["counters"].as_object().unwrap() {
        assert_eq!(
            value.as_f64(),
            Some(0.0),
            "{name} with --apf off: {}",
            describe()
        );
    }
    eprintln!(
        "busy_share_during_stalls: {} with async PF, {} without",
        number(&with, "busy_share_during_stalls"),
        number(&without, "busy_share_during_stalls")
    );
}

#[test]
fn linux_cpu_hotplug_with_faults_pending_wakes_every_parked_task() {
    // 1 s per fault: the toucher (pinned to CPU 1) is parked on CPU 1 through the whole
    // offline sequence, so the guest's own wake-all on the way down must release it.
    let Some(run) = boot_linux(
        2,
        &["--pager", "uffd", "--fault-latency", "1s", "--apf", "on"],
        "apfvm-workload --evict --cpu 1 --pages 8 --passes 2 --toucher-nice -20 \
         --hotplug-cpu 1 --hotplug-cycles 2",
    ) else {
        return;
    };
    let result = workload_result(&run);
    let counters = &result["counters"];
    let describe = || format!("{result}\n{}", run.describe());
    assert_eq!(result["verdict"], "pass", "{}", describe());
    assert_eq!(number(&result, "hotplug_cycles"), 2.0, "{}", describe());
    assert_eq!(number(&result, "pages_touched"), 16.0, "{}", describe());
    assert_eq!(
        result["blocked_tasks"].as_array().map(Vec::len),
        Some(0),
        "{}",
        describe()
    );
    assert_every_park_ended(counters, &describe());
    // Two offlines (the guest wakes CPU 1's sleepers) and two onlines (KVM's wake-all after
    // the enabling MSR write).
    assert!(number(counters, "apf_wake_all") >= 4.0, "{}", describe());
    assert!(
        number(counters, "apf_wake_all_tasks") >= 1.0,
        "a task parked on the CPU going offline was woken by the wake-all: {}",
        describe()
    );
    assert_eq!(
        counters["apf_enabled_cpus"], 2,
        "CPU 1 is back with async PF on"
    );
}

/// `apfvm bench --guest linux`: the same cases on Linux, with apfvm-workload as the guest's
/// toucher and busy work; async PF shows in the guest's own counters only in the apf-on case.
#[test]
fn bench_on_the_linux_guest_reports_every_case() {
    if !kvm_available() {
        return;
    }
    let dir = linux_guest();
    let _one_at_a_time = exclusive();
    let out = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let run = apfvm(
        &[
            "bench",
            "--guest",
            "linux",
            "--linux-dir",
            dir.to_str().unwrap(),
            "--output",
            out.as_path().to_str().unwrap(),
            "--vcpus-list",
            "1",
            "--latencies",
            "5ms",
            "--pages-per-vcpu",
            "64",
            "--floor-pages",
            "500",
        ],
        Duration::from_secs(600),
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.as_path().join("bench.json")).unwrap())
            .unwrap();
    assert_eq!(report["workload"]["guest"], "linux", "{report}");
    let cases = report["cases"].as_array().unwrap();
    let labels: Vec<&str> = cases.iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        ["1vcpu baseline", "1vcpu apf-off 5ms", "1vcpu apf-on 5ms"]
    );
    assert_eq!(cases[0]["busy_ops_ratio_to_baseline"], 1.0);
    assert_eq!(cases[1]["pfaults"], 0, "{}", cases[1]);
    assert!(number(&cases[2], "pfaults") > 0.0, "{}", cases[2]);
    assert!(
        number(&cases[2]["service"], "p50_us") >= 5000.0,
        "no fault is served before its 5 ms fetch: {}",
        cases[2]
    );
    assert!(
        std::fs::read_to_string(out.as_path().join("bench.svg"))
            .unwrap()
            .contains("1vcpu apf-on 5ms")
    );
}

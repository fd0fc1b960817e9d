//! Hostile guests: the reference guest abuses the async PF ABI on purpose (`hostile=<mode>`,
//! resources/guest/README.md) while it pages through apfvm's uffd pager. apfvm must keep
//! working or stop with a clear error and a non-zero exit: never hang, never panic.

mod common;

use std::time::Duration;

use common::*;
use test_support::reference_guest;

const LIMIT: Duration = Duration::from_secs(120);

/// The apfvm flags of every case: 2 vCPUs whose user-mode touches of the paged region take
/// 5 ms each, so faults are pending whenever the guest misbehaves.
fn args(guest_cmdline: &str) -> Vec<&str> {
    vec![
        "demo",
        "--vcpus",
        "2",
        "--mem",
        "128M",
        "--pager",
        "uffd",
        "--fault-latency",
        "5ms",
        "--cmdline",
        guest_cmdline,
    ]
}

/// The guest's `apfvm-ref: hostile {json}` line: what it did to KVM.
fn hostile_report(run: &Run) -> serde_json::Value {
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("apfvm-ref: hostile {"))
        .unwrap_or_else(|| panic!("no hostile report line: {}", run.describe()));
    serde_json::from_str(&format!("{{{line}")).expect("hostile report is JSON")
}

/// apfvm ended by itself (not by the test's limit, which `wait` enforces), without a panic.
fn assert_no_panic(run: &Run) {
    assert!(
        !run.stderr.contains("panicked"),
        "apfvm panicked: {}",
        run.describe()
    );
}

/// Whatever the verdict, the guest's checks of what it did see must hold: no wrong byte, no
/// wrong or duplicate token.
fn assert_data_and_tokens_intact(r: &serde_json::Value, run: &Run) {
    for key in ["bad_bytes", "wrong_tokens", "dup_wakes", "dummies_left"] {
        assert_eq!(field(r, key), 0, "{key}: {}", run.describe());
    }
}

/// Runs a guest that has to finish by itself; returns (run, guest result, hostile report).
fn run_guest(guest_cmdline: &str) -> Option<(Run, serde_json::Value, serde_json::Value)> {
    if !kvm_available() {
        return None;
    }
    let _one_at_a_time = exclusive();
    let run = apfvm(&args(guest_cmdline), LIMIT);
    assert_no_panic(&run);
    let result = guest_result(&run);
    let report = hostile_report(&run);
    assert_data_and_tokens_intact(&result, &run);
    Some((run, result, report))
}

/// When a guest that will not finish is misbehaving.
enum Ready<'a> {
    /// Its console shows this.
    Console(&'a str),
    /// The pager has evicted pages at its request.
    PagesEvicted,
}

/// Spawns a guest that will not finish by itself, waits until it is misbehaving (`ready`),
/// then stops apfvm with SIGTERM: it must exit 143 within its stop budget (apfvm's own: a
/// stop it cannot finish in time is an error, exit 1) and still write the pager's summary.
/// Returns the run.
fn stop_with_sigterm(guest_cmdline: &str, ready: Ready) -> Option<Run> {
    if !kvm_available() {
        return None;
    }
    let _one_at_a_time = exclusive();
    let metrics = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let mut args = args(guest_cmdline);
    let metrics_path = metrics.as_path().to_str().unwrap();
    args.extend_from_slice(&["--metrics-file", metrics_path, "--metrics-interval", "20ms"]);
    let vm = watch(&args);
    match ready {
        Ready::Console(line) => vm.wait_for_stdout(line, LIMIT),
        Ready::PagesEvicted => vm.wait_for_metrics(metrics.as_path(), LIMIT, |lines| {
            lines
                .iter()
                .any(|l| l["pager"]["pages_evicted"].as_u64() > Some(0))
        }),
    }
    vm.signal(libc::SIGTERM);
    let run = vm.finish(LIMIT);
    assert_no_panic(&run);
    assert_eq!(run.code(), Some(143), "{}", run.describe());
    assert!(
        run.stderr.contains(test_support::apfvm::PAGER_SUMMARY),
        "the pager summary is still written: {}",
        run.describe()
    );
    Some(run)
}

/// Case 1: every CPU writes MSR_KVM_ASYNC_PF_EN with an area 64 GiB up (far outside the
/// 128 MiB of RAM), with reserved bits 5:4, unaligned, and above MAXPHYADDR, and leaves the
/// outside-RAM value in place. KVM refuses them all with #GP (the guest's wrmsr_safe catches
/// it) yet keeps the last value; the paging workload still completes, without async PF.
#[test]
fn apf_area_outside_ram_is_refused_and_paging_still_completes() {
    let cmdline = "hostile=apf-outside-ram pages=256 touchers=2 busy=1 timeout_s=60";
    let Some((run, r, h)) = run_guest(cmdline) else {
        return;
    };
    assert_eq!(r["verdict"], "pass", "{}", run.describe());
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(
        field(&h, "wrmsr_tried"),
        10,
        "5 bad values on each of 2 CPUs: {h}"
    );
    assert_eq!(
        field(&h, "wrmsr_gp"),
        field(&h, "wrmsr_tried"),
        "KVM refuses every bad value with #GP: {}",
        run.describe()
    );
    // The guest's last write (resources/guest/README.md, hostile=apf-outside-ram): an area
    // at 0xfff000000, enabled, page-ready by interrupt.
    const OUTSIDE_RAM_AREA: u64 = 0xf_ff00_0000;
    const ENABLE: u64 = 1 << 0;
    const DELIVERY_AS_INT: u64 = 1 << 3;
    assert_eq!(
        field(&h, "apf_en_readback"),
        OUTSIDE_RAM_AREA | ENABLE | DELIVERY_AS_INT,
        "KVM keeps the refused outside-RAM value as the MSR's value: {h}"
    );
    assert_eq!(field(&r, "apf"), 0, "{r}");
    assert_eq!(
        field(&r, "pfaults"),
        0,
        "no page-not-present without a usable area: {r}"
    );
    assert_eq!(field(&r, "pages_touched"), 256, "{r}");
    let pager = pager_summary(&run);
    assert!(
        field(&pager, "faults_async") + field(&pager, "faults_sync") >= 256,
        "every page was served: {pager}"
    );
}

/// Case 2: page-readys are EOI'd but never acknowledged (MSR_KVM_ASYNC_PF_ACK). KVM then
/// looks at its queue of completions again only when a completion arrives at an empty queue
/// (or on an ACK). With one toucher and nothing else per CPU, at most one fault is pending
/// per CPU, so every completion arrives at an empty queue and is delivered: the workload
/// finishes although not one page-ready was acknowledged. (With more touchers, completions that queue up behind an unacknowledged one
/// stay there until the next completion: the last ones never come, and only the guest's
/// watchdog ends the run; `page_ready_never_eoid_guest_is_stopped_by_sigterm` below covers a
/// guest that wedges its own page-readys.)
#[test]
fn page_ready_never_acknowledged_still_completes_one_fault_at_a_time() {
    let cmdline = "hostile=no-ack pages=256 touchers=1 busy=0 timeout_s=600";
    let Some((run, r, h)) = run_guest(cmdline) else {
        return;
    };
    assert_eq!(r["verdict"], "pass", "{}", run.describe());
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(field(&r, "pages_touched"), 256, "{r}");
    assert!(field(&r, "completions") > 0, "{r}");
    assert_eq!(
        field(&h, "acks_skipped"),
        field(&r, "completions") + field(&r, "wakealls") + field(&r, "dummies"),
        "no page-ready was acknowledged: {h} {r}"
    );
}

/// Case 2, worse: page-readys are neither acknowledged nor EOI'd, so the LAPIC holds back
/// every later one and the guest never finishes its workload (its watchdog runs on a higher
/// vector but is set to 10 minutes here). apfvm, stopped by SIGTERM, exits 143 at once.
#[test]
fn page_ready_never_eoid_guest_is_stopped_by_sigterm() {
    let cmdline = "hostile=no-eoi pages=512 touchers=2 busy=1 timeout_s=600";
    stop_with_sigterm(cmdline, Ready::Console("apfvm-ref: workload "));
}

/// Case 3: 10,000 disable + enable pairs of MSR_KVM_ASYNC_PF_EN, in bursts of 100 right
/// after a task was parked on a pending fault. Disabling drops that fault's completion;
/// the wake-all KVM queues on enabling wakes the task, which touches the page again. Every
/// byte and token checks out.
#[test]
fn toggling_async_pf_10000_times_with_faults_pending_keeps_data() {
    let cmdline = "hostile=toggle toggles=10000 toggle_burst=100 pages=512 touchers=2 busy=1";
    let Some((run, r, h)) = run_guest(cmdline) else {
        return;
    };
    assert_eq!(r["verdict"], "pass", "{}", run.describe());
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(field(&h, "toggles"), 10_000, "{h}");
    assert_eq!(field(&r, "pages_touched"), 512, "{r}");
    assert_eq!(field(&r, "parked_at_exit"), 0, "{r}");
    assert!(
        field(&r, "pfaults") - field(&r, "completions") >= 100,
        "each of the 100 bursts dropped its parked fault's completion: {r}"
    );
    assert!(
        field(&r, "wakealls") > 2,
        "wake-alls after the toggles, not only the 2 at boot: {r}"
    );
}

/// Case 4: each vCPU, with a task parked on a pending fault, spins 3 s with IF=0 (CPU 1 at
/// its 33rd fault, so the other may keep faulting meanwhile), then goes on: the page-ready
/// waits in the LAPIC until STI, nothing is lost.
#[test]
fn vcpu_spinning_with_interrupts_off_while_faults_pend_loses_nothing() {
    let cmdline = "hostile=cli-spin spin_ms=3000 pages=512 touchers=2 busy=1";
    let Some((run, r, h)) = run_guest(cmdline) else {
        return;
    };
    assert_eq!(r["verdict"], "pass", "{}", run.describe());
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    assert_eq!(field(&h, "spins"), 2, "{h}");
    assert!(field(&h, "spin_ms") >= 6000, "{h}");
    assert!(field(&h, "parked_during_spin") >= 2, "{h}");
    assert_eq!(field(&r, "pages_touched"), 512, "{r}");
    assert_eq!(
        field(&r, "completions"),
        field(&r, "pfaults"),
        "every parked fault completed: {r}"
    );
    assert!(
        field(&r, "max_parked_cycles") >= 3 * 1000 * field(&r, "tsc_khz"),
        "a task stayed parked through a 3 s spin: {r}"
    );
}

/// Case 4, stopped: a 100 s spin with IF=0 in guest kernel mode (emulated on PVM hosts)
/// must not keep apfvm from stopping on SIGTERM.
#[test]
fn vcpu_spinning_with_interrupts_off_is_stopped_by_sigterm() {
    let cmdline = "hostile=cli-spin spin_ms=100000 pages=512 touchers=2 busy=1 timeout_s=600";
    stop_with_sigterm(cmdline, Ready::Console("spinning with IF=0"));
}

/// Case 5, the fuzz target's seeds (fuzz/corpus/apf_msrs: outside-RAM and reserved-bit
/// areas, vectors below 32, moved areas, enable/disable loops, ACK floods): the guest writes
/// the async PF MSRs with those values while faults are pending (`hostile=msr-script`,
/// exactly as the `apf_msrs` fuzz target runs them). Whatever KVM makes of each write, the
/// workload finishes with every byte intact and no task left parked, and apfvm exits 0.
#[test]
fn async_pf_msr_writes_of_the_fuzz_seeds_keep_data_and_finish() {
    if !kvm_available() {
        return;
    }
    let corpus = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/apf_msrs"
    ));
    let mut seeds: Vec<_> = std::fs::read_dir(corpus)
        .expect("the apf_msrs seed corpus")
        .map(|e| e.unwrap().path())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "{seeds:?}");
    let _one_at_a_time = exclusive();
    for seed in seeds {
        let script = std::fs::read(&seed).unwrap();
        let cmdline = reference_guest::msr_script_cmdline(&script).unwrap();
        let mut args = vec!["demo"];
        args.extend_from_slice(&reference_guest::MSR_SCRIPT_FLAGS);
        args.extend_from_slice(&["--cmdline", &cmdline]);
        let run = apfvm(&args, LIMIT);
        let name = seed.file_name().unwrap().to_string_lossy().into_owned();
        assert_no_panic(&run);
        let r = guest_result(&run);
        let h = hostile_report(&run);
        assert_eq!(r["verdict"], "pass", "{name}: {}", run.describe());
        assert_eq!(run.code(), Some(0), "{name}: {}", run.describe());
        assert_eq!(field(&r, "bad_bytes"), 0, "{name}: {r}");
        assert_eq!(field(&r, "pages_touched"), 128, "{name}: {r}");
        assert_eq!(field(&r, "parked_at_exit"), 0, "{name}: {r}");
        let writes = (script.len() / reference_guest::MSR_WRITE_BYTES)
            .min(reference_guest::MAX_MSR_WRITES) as u64;
        assert_eq!(field(&h, "msr_ops"), writes, "{name}: {h}");
        assert!(field(&h, "msr_writes") > 0, "{name}: {h}");
        eprintln!("{name}: {h}");
    }
}

/// Case 5, stopped: an enable with an area outside RAM, refused by KVM while a fault is
/// pending and then left in place (`msr_refused=keep`), leaves KVM's MSR enabled on an area it
/// cannot write: that fault's completion can never be delivered, and once the page is evicted
/// (between the two passes) the next touch makes KVM retry it forever inside KVM_RUN, a
/// livelock of that vCPU found by the `apf_msrs` fuzz target. The guest never finishes (the
/// same script without `msr_refused=keep` does: the seed outside-ram.bin above); apfvm must
/// still stop on SIGTERM.
#[test]
fn vcpu_livelocked_inside_kvm_run_is_stopped_by_sigterm() {
    let script: Vec<u8> = [0x01u8, 0, 0, 0, 0x0f, 0xff, 0, 0, 0x09].repeat(2);
    let cmdline = reference_guest::msr_script_cmdline(&script).unwrap();
    let cmdline = format!("{cmdline} msr_refused=keep timeout_s=600");
    // The eviction between the passes: the next touch of the region livelocks the vCPU.
    let Some(run) = stop_with_sigterm(&cmdline, Ready::PagesEvicted) else {
        return;
    };
    assert!(
        !run.stdout.contains("APFVM-RESULT"),
        "the livelocked guest cannot have finished: {}",
        run.describe()
    );
}

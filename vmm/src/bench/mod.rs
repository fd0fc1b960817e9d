//! `apfvm bench`: how much guest work host page faults cost, with and without async page
//! faults, against a no-fault baseline measured in the same run.
//!
//! Each case boots a guest (a child apfvm: the reference guest by `apfvm demo`, or the
//! project's Linux guest with apfvm-workload) with toucher tasks that fault pages in and busy
//! tasks that count work on the same vCPUs:
//! - baseline: no host paging (no faults);
//! - apf off: host paging with a fetch latency, async PF hidden (a fault stalls the vCPU);
//! - apf on: the same with async PF (the guest runs busy tasks while a toucher waits).
//!
//! The guest stall shows as the busy tasks' ops rate relative to the baseline. The pager's
//! fault service latency is compared with the floor: a host thread faulting pages through
//! the same pager with no KVM in the way.

mod floor;
mod report;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use test_support::child::wait_with_limit;
use test_support::{apfvm, linux_guest, reference_guest};
use vmm::pager::parse_duration;

/// The guest the cases boot.
#[derive(Debug, Clone)]
pub enum BenchGuest {
    /// The built-in reference guest.
    Reference,
    /// The project's Linux guest from resources/linux/build.sh's output directory.
    Linux { dir: PathBuf },
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub guest: BenchGuest,
    pub output: PathBuf,
    pub vcpus: Vec<u8>,
    pub latencies: Vec<String>,
    /// Pages each vCPU's touchers fault in per case.
    pub pages_per_vcpu: u32,
    pub floor_pages: u64,
    pub kvm_device: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad --latencies entry '{0}': use durations like 100us,1ms,10ms")]
    BadLatency(String),
    #[error("--floor-pages must be at least 1")]
    BadFloorPages,
    #[error("--vcpus-list must name 1 to 8 vCPU counts between 1 and 8")]
    BadVcpus,
    #[error("cannot write the report to {path}: {source}")]
    Output {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the Linux guest is not built: {0} is missing (run resources/linux/build.sh, or pass \
         --linux-dir with its output directory)"
    )]
    LinuxGuestMissing(String),
    #[error("running case {case}: {message}")]
    Case { case: String, message: String },
    #[error("floor measurement: {0}")]
    Floor(#[from] vmm::pager::PagerError),
    #[error("drawing the chart: {0}")]
    Chart(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Baseline,
    ApfOff,
    ApfOn,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::ApfOff => "apf-off",
            Mode::ApfOn => "apf-on",
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    vcpus: u8,
    mode: Mode,
    latency: Option<String>,
}

impl Case {
    fn label(&self) -> String {
        match &self.latency {
            Some(l) => format!("{}vcpu {} {l}", self.vcpus, self.mode.name()),
            None => format!("{}vcpu {}", self.vcpus, self.mode.name()),
        }
    }
}

/// What one case measured.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub label: String,
    pub vcpus: u8,
    pub mode: &'static str,
    pub latency: Option<String>,
    pub busy_ops_per_sec: f64,
    pub ratio_to_baseline: f64,
    pub pfaults: u64,
    pub pages_per_sec: f64,
    pub service: Value,
    pub guest: Value,
}

fn cases(opts: &BenchOptions) -> Vec<Case> {
    let mut all = Vec::new();
    for &vcpus in &opts.vcpus {
        all.push(Case {
            vcpus,
            mode: Mode::Baseline,
            latency: None,
        });
        for latency in &opts.latencies {
            for mode in [Mode::ApfOff, Mode::ApfOn] {
                all.push(Case {
                    vcpus,
                    mode,
                    latency: Some(latency.clone()),
                });
            }
        }
    }
    all
}

/// What a case's guest reported, in the terms every guest shares.
struct Measured {
    busy_ops: f64,
    seconds: f64,
    pfaults: u64,
    pages_touched: f64,
    /// The guest's own result line.
    guest: Value,
    /// The pager's summary line (paging cases).
    pager: Option<Value>,
}

/// The reference guest's workload: per vCPU two touchers share `pages_per_vcpu` pages, and
/// one busy task counts.
fn reference_cmdline(opts: &BenchOptions, vcpus: u8) -> String {
    format!(
        "pages={} touchers=2 busy=1 passes=1 stall_us=50",
        opts.pages_per_vcpu * u32::from(vcpus)
    )
}

/// The Linux guest's workload: per vCPU one toucher (at nice -20, so that it has the CPU
/// whenever it can run) that evicts its `pages_per_vcpu` pages and touches them again, and one
/// busy thread on the same CPU. The baseline runs the busy threads alone.
fn linux_workload(opts: &BenchOptions, case: &Case) -> String {
    let cpus = (0..case.vcpus)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let v = case.vcpus;
    match case.mode {
        Mode::Baseline => {
            format!("apfvm-workload --touchers 0 --busy {v} --cpu {cpus} --seconds 3")
        }
        Mode::ApfOff | Mode::ApfOn => format!(
            "apfvm-workload --evict --touchers {v} --busy {v} --cpu {cpus} --pages {} --passes 1 \
             --toucher-nice -20",
            opts.pages_per_vcpu
        ),
    }
}

fn run_case(opts: &BenchOptions, case: &Case) -> Result<Measured, BenchError> {
    let err = |message: String| BenchError::Case {
        case: case.label(),
        message,
    };
    let exe = std::env::current_exe().map_err(|e| err(e.to_string()))?;
    let mut cmd = Command::new(exe);
    match &opts.guest {
        BenchGuest::Reference => {
            cmd.args(["demo", "--cmdline", &reference_cmdline(opts, case.vcpus)]);
        }
        BenchGuest::Linux { dir } => {
            let cmdline = linux_guest::cmdline_running(&linux_workload(opts, case)).map_err(err)?;
            cmd.arg("run")
                .arg("--kernel")
                .arg(linux_guest::vmlinux(dir))
                .arg("--initrd")
                .arg(linux_guest::initramfs(dir))
                .args(["--cmdline", &cmdline]);
        }
    }
    cmd.args(["--mem", "128M", "--kvm-device", &opts.kvm_device]);
    cmd.args(["--vcpus", &case.vcpus.to_string()]);
    if let Some(latency) = &case.latency {
        cmd.args(["--pager", "uffd", "--fault-latency", latency]);
        cmd.args([
            "--apf",
            if case.mode == Mode::ApfOn {
                "on"
            } else {
                "off"
            },
        ]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    let out = wait_with_limit(child, CASE_LIMIT).map_err(|e| err(e.to_string()))?;
    if out.timed_out {
        return Err(err(format!("no result within {CASE_LIMIT:?}")));
    }
    let (stdout, stderr) = (&out.stdout, &out.stderr);
    let pager = apfvm::pager_summary(stderr);
    let no_result = || err(format!("no guest result (exit {:?}): {stderr}", out.status));
    let measured = match &opts.guest {
        BenchGuest::Reference => {
            let result = reference_guest::result(stdout).ok_or_else(no_result)?;
            Measured {
                busy_ops: num(&result, "busy_ops"),
                seconds: num(&result, "elapsed_ms") / 1e3,
                pfaults: result["pfaults"].as_u64().unwrap_or(0),
                pages_touched: num(&result, "pages_touched"),
                guest: result,
                pager,
            }
        }
        BenchGuest::Linux { .. } => {
            let result = linux_guest::workload_result(stdout).ok_or_else(no_result)?;
            if linux_guest::command_status(stdout) != Some(0) {
                return Err(err(format!("apfvm-workload failed: {result} {stderr}")));
            }
            Measured {
                busy_ops: num(&result, "busy_ops"),
                seconds: num(&result, "seconds"),
                pfaults: result["counters"]["apf_not_present"].as_u64().unwrap_or(0),
                pages_touched: num(&result, "pages_touched"),
                guest: result,
                pager,
            }
        }
    };
    if measured.guest["verdict"] != "pass" || !out.status.success() {
        return Err(err(format!("guest failed: {} {stderr}", measured.guest)));
    }
    Ok(measured)
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

/// Runs every case and the floor, writes `bench.json` and `bench.svg` into the output
/// directory, and returns the report.
pub fn run(opts: &BenchOptions) -> Result<Value, BenchError> {
    for l in &opts.latencies {
        parse_duration(l).ok_or_else(|| BenchError::BadLatency(l.clone()))?;
    }
    if opts.vcpus.is_empty()
        || opts.vcpus.len() > 8
        || opts.vcpus.iter().any(|v| !(1..=8).contains(v))
    {
        return Err(BenchError::BadVcpus);
    }
    if let BenchGuest::Linux { dir } = &opts.guest {
        for file in [linux_guest::vmlinux(dir), linux_guest::initramfs(dir)] {
            if !file.is_file() {
                return Err(BenchError::LinuxGuestMissing(file.display().to_string()));
            }
        }
    }
    let mut results: Vec<CaseResult> = Vec::new();
    for case in cases(opts) {
        eprintln!("apfvm bench: {} ...", case.label());
        let measured = run_case(opts, &case)?;
        let seconds = measured.seconds;
        let busy_rate = measured.busy_ops / seconds.max(1e-9);
        let baseline = results
            .iter()
            .find(|r| r.vcpus == case.vcpus && r.mode == Mode::Baseline.name())
            .map_or(busy_rate, |r| r.busy_ops_per_sec);
        results.push(CaseResult {
            label: case.label(),
            vcpus: case.vcpus,
            mode: case.mode.name(),
            latency: case.latency.clone(),
            busy_ops_per_sec: busy_rate,
            ratio_to_baseline: busy_rate / baseline.max(1e-9),
            pfaults: measured.pfaults,
            pages_per_sec: measured.pages_touched / seconds.max(1e-9),
            service: measured
                .pager
                .as_ref()
                .map_or(Value::Null, |p| p["service_async"].clone()),
            guest: measured.guest,
        });
    }
    eprintln!("apfvm bench: floor (host thread, same pager, no KVM) ...");
    let floor = floor::measure_floor(opts.floor_pages, 2)?;
    // The floor's own service latency (fault message to page mapped), the same measure as a
    // case's `service`.
    let floor_p50 = floor.service["p50_us"].as_f64().unwrap_or(0.0);
    let report = json!({
        "machine": machine_description(),
        "workload": match &opts.guest {
            BenchGuest::Reference => json!({
                "guest": "reference",
                "per_vcpu": { "touchers": 2, "busy": 1, "pages": opts.pages_per_vcpu },
            }),
            BenchGuest::Linux { dir } => json!({
                "guest": "linux",
                "kernel": linux_guest::vmlinux(dir),
                "per_vcpu": {
                    "touchers": 1, "toucher_nice": -20, "busy": 1, "pages": opts.pages_per_vcpu,
                },
            }),
        },
        "floor": {
            "touch": floor.touch.summary(),
            "service": floor.service,
            "pages_per_sec": floor.pages_per_sec,
        },
        "cases": results.iter().map(|r| {
            let p50 = r.service["p50_us"].as_f64();
            // What the pager and KVM add on top of the configured fetch latency.
            let latency_us = r
                .latency
                .as_deref()
                .and_then(parse_duration)
                .map_or(0.0, |d| d.as_secs_f64() * 1e6);
            let overhead = p50.map(|p| (p - latency_us).max(0.0));
            json!({
                "label": r.label,
                "vcpus": r.vcpus,
                "mode": r.mode,
                "latency": r.latency,
                "busy_ops_per_sec": r.busy_ops_per_sec,
                "busy_ops_ratio_to_baseline": r.ratio_to_baseline,
                "pfaults": r.pfaults,
                "pages_per_sec": r.pages_per_sec,
                "service": r.service,
                "service_p50_ratio_to_floor": p50.map(|p| p / floor_p50.max(1.0)),
                "service_p50_overhead_us": overhead,
                "service_p50_overhead_ratio_to_floor": overhead.map(|o| o / floor_p50.max(1.0)),
                "guest": r.guest,
            })
        }).collect::<Vec<_>>(),
    });
    write_outputs(&opts.output, &report, &results)?;
    Ok(report)
}

fn write_outputs(dir: &Path, report: &Value, results: &[CaseResult]) -> Result<(), BenchError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| BenchError::Output { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json_path = dir.join("bench.json");
    let text = serde_json::to_string_pretty(report).expect("report serializes");
    std::fs::write(&json_path, text).map_err(io(&json_path))?;
    report::draw_chart(&dir.join("bench.svg"), results).map_err(BenchError::Chart)
}

pub(crate) fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// For the CLI: `100us,1ms,10ms`.
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Default sizes keep a full run (14 guest boots) to a few minutes on hosts that emulate guest
/// kernel mode.
pub const DEFAULT_PAGES_PER_VCPU: u32 = 400;
pub const DEFAULT_FLOOR_PAGES: u64 = 20_000;
pub const DEFAULT_LATENCIES: &str = "100us,1ms,10ms";
pub const CASE_LIMIT: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    /// apfvm prints its final lines with the library's prefixes; the bench (and the tests)
    /// read them with the support crate's.
    #[test]
    fn result_lines_are_read_with_the_prefixes_they_are_printed_with() {
        assert_eq!(vmm::vm::PAGER_SUMMARY, test_support::apfvm::PAGER_SUMMARY);
        assert_eq!(vmm::vm::SNAPSHOT_DONE, test_support::apfvm::SNAPSHOT_DONE);
        assert_eq!(vmm::vm::RESTORED, test_support::apfvm::RESTORED);
    }
}

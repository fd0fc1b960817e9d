//! `apfvm bench snapshot`: how long a snapshot takes to create and to restore, against
//! copying its memory file with `cp` in the same run (the baseline a user compares with).
//!
//! For each guest RAM size, each run boots the reference guest, which asks for a snapshot as
//! soon as its CPUs are up (`snapshot_at_start=1`) and is stopped after it; then `cp` copies
//! the memory file, and `apfvm restore` brings the VM back, once reading RAM in (anon) and
//! once mapping the file (`--memory file`). Measured:
//! - create: apfvm's own time from the paused VM to the fsynced snapshot (`apfvm: snapshot:`);
//! - restore: apfvm's time from its runner's start to running vCPUs (`apfvm: restored:`), and
//!   from spawning `apfvm restore` to the guest's next console line;
//! - cp: `cp --sparse=always` of the memory file.
//!
//! Medians over the runs; ratios are time / cp time of the same run's median.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use test_support::apfvm as lines;

use super::BenchError;

/// The first line the reference guest prints after a restore (`snapshot_at_start=1`).
const NEXT_LINE: &str = "apfvm-ref: running after snapshot request 1";
const LIMIT: Duration = Duration::from_secs(120);

pub struct SnapshotBenchOptions {
    pub sizes: Vec<String>,
    pub runs: usize,
    pub output: PathBuf,
    pub kvm_device: String,
}

#[derive(Debug, Serialize)]
pub struct SnapshotBenchReport {
    pub machine: String,
    pub runs: usize,
    pub sizes: Vec<SizeResult>,
}

#[derive(Debug, Serialize)]
pub struct SizeResult {
    pub mem: String,
    pub mem_bytes: u64,
    pub data_pages: u64,
    pub create_ms: f64,
    pub cp_ms: f64,
    pub create_per_cp: f64,
    pub restore_anon: RestoreResult,
    pub restore_file: RestoreResult,
}

#[derive(Debug, Serialize)]
pub struct RestoreResult {
    /// apfvm's runner start → vCPUs running.
    pub to_vcpus_ms: f64,
    /// Spawning `apfvm restore` → the guest's next console line.
    pub to_next_line_ms: f64,
    pub to_next_line_per_cp: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn fail(what: &str, message: impl std::fmt::Display) -> BenchError {
    BenchError::Case {
        case: what.to_string(),
        message: message.to_string(),
    }
}

fn apfvm() -> Result<Command, BenchError> {
    let exe = std::env::current_exe().map_err(|e| fail("apfvm", e))?;
    Ok(Command::new(exe))
}

/// Boots the reference guest with `mem` of RAM, `flags` and `cmdline` and has it snapshot
/// itself into `dir`; returns (create ms, data pages, memory file).
fn create(
    kvm_device: &str,
    mem: &str,
    flags: &[&str],
    cmdline: &str,
    dir: &Path,
) -> Result<(f64, u64, PathBuf), BenchError> {
    let what = format!("snapshot of {mem}");
    let child = apfvm()?
        .args(["demo", "--mem", mem, "--kvm-device", kvm_device])
        .args(flags)
        .arg("--snapshot-on-request")
        .arg(dir)
        .args(["--after-snapshot", "stop", "--cmdline", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(&what, e))?;
    let done = test_support::child::wait_with_limit(child, LIMIT).map_err(|e| fail(&what, e))?;
    let taken = lines::snapshots_taken(&done.stderr);
    let info = match (done.status.success(), taken.first()) {
        (true, Some(info)) => info.clone(),
        _ => {
            return Err(fail(
                &what,
                format!("no snapshot ({}): {}", done.status, done.stderr),
            ));
        }
    };
    let num = |k: &str| {
        info[k]
            .as_f64()
            .ok_or_else(|| fail(&what, format!("no {k} in {info}")))
    };
    let file = info["memory_file"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| fail(&what, format!("no memory_file in {info}")))?;
    Ok((num("millis")?, num("data_pages")? as u64, file))
}

fn copy(file: &Path, to: &Path) -> Result<f64, BenchError> {
    let started = Instant::now();
    let status = Command::new("cp")
        .arg("--sparse=always")
        .arg(file)
        .arg(to)
        .status()
        .map_err(|e| fail("cp", e))?;
    if !status.success() {
        return Err(fail("cp", status));
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(to);
    Ok(ms)
}

/// One `apfvm restore`: its timings and what it printed.
struct Restored {
    /// apfvm's runner start → vCPUs running.
    to_vcpus_ms: f64,
    /// Spawning `apfvm restore` → the first console line starting with the awaited prefix.
    to_line_ms: f64,
    stdout: String,
    stderr: String,
}

/// Restores `dir` with `flags`, timing the first console line that starts with `line`.
fn restore(
    kvm_device: &str,
    dir: &Path,
    flags: &[&str],
    line: &str,
) -> Result<Restored, BenchError> {
    let what = format!("restore {}", flags.join(" "));
    let started = Instant::now();
    let mut child = apfvm()?
        .args(["restore", "--kvm-device", kvm_device])
        .args(flags)
        .arg("--snapshot")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(&what, e))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let line = line.to_string();
    let reader = std::thread::spawn(move || {
        let mut seen = None;
        let mut text = String::new();
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if seen.is_none() && l.starts_with(&line) {
                seen = Some(started.elapsed());
            }
            text.push_str(&l);
            text.push('\n');
        }
        (seen, text)
    });
    let done = test_support::child::wait_with_limit(child, LIMIT).map_err(|e| fail(&what, e))?;
    let (seen, stdout) = reader.join().unwrap_or_default();
    let restored = lines::restored(&done.stderr);
    match (done.status.success(), seen, restored) {
        (true, Some(seen), Some(info)) => Ok(Restored {
            to_vcpus_ms: info["millis"]
                .as_f64()
                .ok_or_else(|| fail(&what, format!("no millis in {info}")))?,
            to_line_ms: seen.as_secs_f64() * 1e3,
            stdout,
            stderr: done.stderr,
        }),
        _ => Err(fail(&what, format!("{}: {}", done.status, done.stderr))),
    }
}

pub fn run(opts: &SnapshotBenchOptions) -> Result<SnapshotBenchReport, BenchError> {
    let work = opts.output.join("snapshot-work");
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| BenchError::Output { path, source }
    };
    let mut sizes = Vec::new();
    for mem in &opts.sizes {
        let mem_bytes = vmm::config::parse_size(mem).map_err(|e| fail(mem, e))?;
        let (mut creates, mut cps) = (Vec::new(), Vec::new());
        let (mut anon_vcpus, mut anon_line, mut file_vcpus, mut file_line) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut data_pages = 0;
        for run in 0..opts.runs {
            eprintln!(
                "apfvm bench snapshot: {mem}, run {} of {}",
                run + 1,
                opts.runs
            );
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).map_err(io(&work))?;
            let dir = work.join("snap");
            let (create_ms, pages, file) =
                create(&opts.kvm_device, mem, &[], "snapshot_at_start=1", &dir)?;
            creates.push(create_ms);
            data_pages = pages;
            cps.push(copy(&file, &work.join("copy"))?);
            let anon = restore(&opts.kvm_device, &dir, &["--memory", "anon"], NEXT_LINE)?;
            anon_vcpus.push(anon.to_vcpus_ms);
            anon_line.push(anon.to_line_ms);
            let file = restore(&opts.kvm_device, &dir, &["--memory", "file"], NEXT_LINE)?;
            file_vcpus.push(file.to_vcpus_ms);
            file_line.push(file.to_line_ms);
        }
        let _ = std::fs::remove_dir_all(&work);
        let cp_ms = median(cps);
        let restore = |vcpus: Vec<f64>, line: Vec<f64>| {
            let to_next_line_ms = median(line);
            RestoreResult {
                to_vcpus_ms: median(vcpus),
                to_next_line_ms,
                to_next_line_per_cp: to_next_line_ms / cp_ms,
            }
        };
        let create_ms = median(creates);
        sizes.push(SizeResult {
            mem: mem.clone(),
            mem_bytes,
            data_pages,
            create_ms,
            cp_ms,
            create_per_cp: create_ms / cp_ms,
            restore_anon: restore(anon_vcpus, anon_line),
            restore_file: restore(file_vcpus, file_line),
        });
    }
    let report = SnapshotBenchReport {
        machine: super::machine_description(),
        runs: opts.runs,
        sizes,
    };
    std::fs::create_dir_all(&opts.output).map_err(io(&opts.output))?;
    let path = opts.output.join("snapshot.json");
    let text = serde_json::to_string_pretty(&report).expect("report serializes");
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(report)
}

/// The report as a table a person reads.
pub fn table(report: &SnapshotBenchReport) -> String {
    let mut out = format!(
        "{:>6} {:>10} {:>10} {:>8} {:>22} {:>22}\n",
        "RAM", "data MiB", "create ms", "cp ms", "restore anon ms", "restore file ms"
    );
    out.push_str(&format!(
        "{:>6} {:>10} {:>10} {:>8} {:>22} {:>22}\n",
        "", "", "(/cp)", "", "vCPUs | next line", "vCPUs | next line"
    ));
    for s in &report.sizes {
        let r = |r: &RestoreResult| format!("{:.1} | {:.1}", r.to_vcpus_ms, r.to_next_line_ms);
        out.push_str(&format!(
            "{:>6} {:>10.1} {:>10} {:>8.1} {:>22} {:>22}\n",
            s.mem,
            (s.data_pages * 4096) as f64 / f64::from(1 << 20),
            format!("{:.1} ({:.2})", s.create_ms, s.create_per_cp),
            s.cp_ms,
            r(&s.restore_anon),
            r(&s.restore_file),
        ));
    }
    out
}

/// `apfvm bench restore`: the ways to bring one snapshot back, against reading RAM in
/// eagerly, in the same run.
///
/// For each RAM size, the reference guest is snapshotted halfway through the second pass of
/// its workload (2 vCPUs, one toucher and one busy task each, the region evicted between
/// passes, so the memory file holds the region); each restore then runs the rest of the
/// workload. Modes: eager (`--memory anon`), file mapping (`--memory file`), and through the
/// pager at each fetch latency: on demand (records the working set), the working set
/// prefetched, everything prefetched. Measured per mode (medians over the runs): apfvm's
/// time to running vCPUs, the time from spawning `apfvm restore` to the guest's result line
/// (the end of its workload), faults after resume (sync, async), prefetched pages and their
/// rate, and the busy tasks' work during the touchers' stalls.
pub struct RestoreBenchOptions {
    pub sizes: Vec<String>,
    pub latencies: Vec<String>,
    pub runs: usize,
    pub pages: u32,
    pub output: PathBuf,
    pub kvm_device: String,
}

#[derive(Debug, Serialize)]
pub struct RestoreBenchReport {
    pub machine: String,
    pub runs: usize,
    pub pages: u32,
    pub sizes: Vec<RestoreSize>,
}

#[derive(Debug, Serialize)]
pub struct RestoreSize {
    pub mem: String,
    pub data_pages: u64,
    pub modes: Vec<RestoreMode>,
}

#[derive(Debug, Serialize)]
pub struct RestoreMode {
    pub mode: String,
    pub latency: Option<String>,
    pub to_vcpus_ms: f64,
    pub to_result_ms: f64,
    /// `to_result_ms` / eager's.
    pub to_result_per_eager: f64,
    pub faults_sync: u64,
    pub faults_async: u64,
    pub prefetched: u64,
    pub prefetch_pages_per_sec: f64,
    pub busy_ops_during_stalls: u64,
}

const RESULT_LINE: &str = "APFVM-RESULT";

fn count(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Runs one mode `runs` times; medians.
fn restore_mode(
    opts: &RestoreBenchOptions,
    dir: &Path,
    mode: &str,
    latency: Option<&str>,
    flags: &[&str],
) -> Result<RestoreMode, BenchError> {
    let (mut vcpus, mut result_ms) = (Vec::new(), Vec::new());
    let mut last = None;
    for run in 0..opts.runs {
        eprintln!(
            "apfvm bench restore: {mode} {} run {} of {}",
            latency.unwrap_or(""),
            run + 1,
            opts.runs
        );
        let mut all_flags = flags.to_vec();
        if let Some(l) = latency {
            all_flags.extend_from_slice(&["--fault-latency", l]);
        }
        let r = restore(&opts.kvm_device, dir, &all_flags, RESULT_LINE)?;
        let result = test_support::reference_guest::result(&r.stdout)
            .ok_or_else(|| fail(mode, format!("no result line: {}", r.stdout)))?;
        if result["verdict"] != "pass" {
            return Err(fail(mode, format!("the guest failed: {result}")));
        }
        vcpus.push(r.to_vcpus_ms);
        result_ms.push(r.to_line_ms);
        last = Some((lines::pager_summary(&r.stderr), result));
    }
    let (pager, result) = last.expect("at least one run");
    let pager = pager.unwrap_or_default();
    Ok(RestoreMode {
        mode: mode.to_string(),
        latency: latency.map(str::to_string),
        to_vcpus_ms: median(vcpus),
        to_result_ms: median(result_ms),
        to_result_per_eager: f64::NAN,
        faults_sync: count(&pager, "faults_sync"),
        faults_async: count(&pager, "faults_async"),
        prefetched: count(&pager, "prefetched"),
        prefetch_pages_per_sec: pager["prefetch_pages_per_sec"].as_f64().unwrap_or(0.0),
        busy_ops_during_stalls: count(&result, "busy_ops_during_stalls"),
    })
}

pub fn run_restore(opts: &RestoreBenchOptions) -> Result<RestoreBenchReport, BenchError> {
    let work = opts.output.join("restore-work");
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| BenchError::Output { path, source }
    };
    let mut sizes = Vec::new();
    for mem in &opts.sizes {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(io(&work))?;
        let dir = work.join("snap");
        // Per CPU, pages/2 region pages per pass: the snapshot is halfway through pass 2.
        let per_cpu = opts.pages / 2;
        let cmdline = format!(
            "pages={} touchers=1 busy=1 passes=2 evict=1 snapshot_pfault={} timeout_s=600",
            opts.pages,
            per_cpu + per_cpu / 2
        );
        eprintln!("apfvm bench restore: {mem}: taking the snapshot");
        let flags = ["--vcpus", "2", "--pager", "uffd"];
        let (_, data_pages, _) = create(&opts.kvm_device, mem, &flags, &cmdline, &dir)?;
        let mut modes = vec![
            restore_mode(opts, &dir, "eager", None, &["--memory", "anon"])?,
            restore_mode(opts, &dir, "file", None, &["--memory", "file"])?,
        ];
        for latency in &opts.latencies {
            let l = Some(latency.as_str());
            let uffd = ["--pager", "uffd"];
            modes.push(restore_mode(opts, &dir, "on-demand", l, &uffd)?);
            for prefetch in ["working-set", "all"] {
                let flags = ["--pager", "uffd", "--prefetch", prefetch];
                modes.push(restore_mode(opts, &dir, prefetch, l, &flags)?);
            }
        }
        let eager = modes[0].to_result_ms;
        for m in &mut modes {
            m.to_result_per_eager = m.to_result_ms / eager;
        }
        sizes.push(RestoreSize {
            mem: mem.clone(),
            data_pages,
            modes,
        });
    }
    let _ = std::fs::remove_dir_all(&work);
    let report = RestoreBenchReport {
        machine: super::machine_description(),
        runs: opts.runs,
        pages: opts.pages,
        sizes,
    };
    std::fs::create_dir_all(&opts.output).map_err(io(&opts.output))?;
    let path = opts.output.join("restore.json");
    let text = serde_json::to_string_pretty(&report).expect("report serializes");
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(report)
}

/// The restore report as a table a person reads.
pub fn restore_table(report: &RestoreBenchReport) -> String {
    let mut out = format!(
        "{:>5} {:>12} {:>8} {:>9} {:>10} {:>7} {:>6} {:>6} {:>10} {:>9} {:>10}\n",
        "RAM",
        "mode",
        "latency",
        "vCPUs ms",
        "result ms",
        "/eager",
        "sync",
        "async",
        "prefetched",
        "pages/s",
        "busy ops"
    );
    for s in &report.sizes {
        for m in &s.modes {
            out.push_str(&format!(
                "{:>5} {:>12} {:>8} {:>9.1} {:>10.1} {:>7.2} {:>6} {:>6} {:>10} {:>9.0} {:>10}\n",
                s.mem,
                m.mode,
                m.latency.as_deref().unwrap_or("-"),
                m.to_vcpus_ms,
                m.to_result_ms,
                m.to_result_per_eager,
                m.faults_sync,
                m.faults_async,
                m.prefetched,
                m.prefetch_pages_per_sec,
                m.busy_ops_during_stalls
            ));
        }
    }
    out
}

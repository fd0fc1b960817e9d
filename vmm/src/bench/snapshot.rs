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

/// Boots the reference guest with `mem` of RAM and has it snapshot itself into `dir`;
/// returns (create ms, data pages, memory file).
fn create(
    opts: &SnapshotBenchOptions,
    mem: &str,
    dir: &Path,
) -> Result<(f64, u64, PathBuf), BenchError> {
    let what = format!("snapshot of {mem}");
    let child = apfvm()?
        .args(["demo", "--mem", mem, "--kvm-device", &opts.kvm_device])
        .arg("--snapshot-on-request")
        .arg(dir)
        .args([
            "--after-snapshot",
            "stop",
            "--cmdline",
            "snapshot_at_start=1",
        ])
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

/// Restores `dir` with `--memory memory`; returns (runner → vCPUs ms, spawn → next line ms).
fn restore(
    opts: &SnapshotBenchOptions,
    dir: &Path,
    memory: &str,
) -> Result<(f64, f64), BenchError> {
    let what = format!("restore --memory {memory}");
    let started = Instant::now();
    let mut child = apfvm()?
        .args([
            "restore",
            "--memory",
            memory,
            "--kvm-device",
            &opts.kvm_device,
        ])
        .arg("--snapshot")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(&what, e))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let next_line = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with(NEXT_LINE))
            .map(|_| started.elapsed())
    });
    let done = test_support::child::wait_with_limit(child, LIMIT).map_err(|e| fail(&what, e))?;
    let seen = next_line.join().ok().flatten();
    let restored = lines::restored(&done.stderr);
    match (done.status.success(), seen, restored) {
        (true, Some(seen), Some(info)) => {
            let to_vcpus = info["millis"]
                .as_f64()
                .ok_or_else(|| fail(&what, format!("no millis in {info}")))?;
            Ok((to_vcpus, seen.as_secs_f64() * 1e3))
        }
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
            let (create_ms, pages, file) = create(opts, mem, &dir)?;
            creates.push(create_ms);
            data_pages = pages;
            cps.push(copy(&file, &work.join("copy"))?);
            let (v, l) = restore(opts, &dir, "anon")?;
            anon_vcpus.push(v);
            anon_line.push(l);
            let (v, l) = restore(opts, &dir, "file")?;
            file_vcpus.push(v);
            file_line.push(l);
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

//! Guest stall metrics: per vCPU, time spent in KVM_RUN and the part of it the vCPU was
//! stalled on host page faults it took itself (synchronous faults, served by the pager and
//! attributed to the faulting vCPU thread); per fault class, the pager's service latency
//! (fault message to UFFDIO_COPY done) as HDR histograms. `MetricsWriter` writes JSON lines
//! at an interval and a final summary (fields: docs/metrics.md).
//!
//! With `--kvm-trace`, also how long a vCPU sat in KVM's "APF halt" for async faults the guest
//! could not take (from KVM's tracepoints, `kvm_trace`). What the host cannot see: what the
//! guest did meanwhile (the guest's own counters: the reference guest's result line, the
//! Linux patches).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::kvm_trace::VcpuFaults;

/// Latencies in microseconds, 1 µs to 1 hour, 3 significant digits.
pub struct LatencyHistogram(Mutex<Histogram<u64>>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(Mutex::new(
            Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
        ))
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let us = (latency.as_micros() as u64).max(1);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us);
    }

    pub fn count(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn summary(&self) -> Value {
        let h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if h.is_empty() {
            return json!({ "count": 0 });
        }
        json!({
            "count": h.len(),
            "mean_us": (h.mean() * 10.0).round() / 10.0,
            "p50_us": h.value_at_quantile(0.50),
            "p90_us": h.value_at_quantile(0.90),
            "p99_us": h.value_at_quantile(0.99),
            "max_us": h.max(),
        })
    }
}

/// Synchronous faults of one thread: how many, and how long it waited in total.
#[derive(Debug, Default)]
pub struct StallCounter {
    pub faults: AtomicU64,
    pub ns: AtomicU64,
}

impl StallCounter {
    pub fn add(&self, waited: Duration) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        self.ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct VcpuMetrics {
    pub run_ns: AtomicU64,
    pub exits: AtomicU64,
    pub sync_faults: Arc<StallCounter>,
}

impl VcpuMetrics {
    /// This vCPU's line; with `--kvm-trace`, also what KVM's tracepoints said about it, and
    /// the two stalls together: the time the vCPU could not run the guest because of host
    /// faults, as far as the host sees it.
    pub fn line(&self, index: usize, trace: Option<VcpuFaults>) -> VcpuLine {
        let run_ns = self.run_ns.load(Ordering::Relaxed) as f64;
        let stall_ns = self.sync_faults.ns.load(Ordering::Relaxed) as f64;
        let share = |ns: f64| if run_ns == 0.0 { 0.0 } else { ns / run_ns };
        VcpuLine {
            vcpu: index,
            run_ms: run_ns / 1e6,
            exits: self.exits.load(Ordering::Relaxed),
            sync_faults: self.sync_faults.faults.load(Ordering::Relaxed),
            sync_fault_stall_ms: stall_ns / 1e6,
            sync_fault_stall_share: share(stall_ns),
            trace: trace.map(|faults| {
                let host_ns = stall_ns + faults.apf_halt_seconds * 1e9;
                VcpuTraceLine {
                    faults,
                    host_fault_stall_ms: host_ns / 1e6,
                    host_fault_stall_share: share(host_ns),
                }
            }),
        }
    }
}

/// One vCPU in a metrics line (fields: docs/metrics.md).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VcpuLine {
    pub vcpu: usize,
    pub run_ms: f64,
    pub exits: u64,
    pub sync_faults: u64,
    pub sync_fault_stall_ms: f64,
    pub sync_fault_stall_share: f64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub trace: Option<VcpuTraceLine>,
}

/// A vCPU's fields that come with `--kvm-trace`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VcpuTraceLine {
    #[serde(flatten)]
    pub faults: VcpuFaults,
    pub host_fault_stall_ms: f64,
    pub host_fault_stall_share: f64,
}

/// Seconds written as milliseconds.
pub fn seconds_as_ms<S: serde::Serializer>(seconds: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(seconds * 1e3)
}

/// A source of metrics, sampled by the writer.
pub type Sampler = Box<dyn Fn() -> Value + Send>;

struct WriterState {
    stop: Mutex<bool>,
    wake: Condvar,
}

/// Writes `{"type":"interval",...}` lines every `interval` and a `{"type":"final",...}`
/// summary when stopped.
pub struct MetricsWriter {
    state: Arc<WriterState>,
    thread: Option<JoinHandle<Option<std::io::Result<()>>>>,
    failed: Arc<AtomicBool>,
}

/// Opens (creating or truncating) the metrics file. Only a regular file will do: a FIFO
/// nobody reads, a socket or a device would block the writer, or the open itself.
pub fn open_metrics_file(path: &Path) -> std::io::Result<File> {
    use crate::config::not_a_regular_file;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && let Some(err) = not_a_regular_file(meta.file_type())
    {
        return Err(err);
    }
    // O_NONBLOCK: should a FIFO appear between the check and the open, the open fails
    // instead of waiting for a reader.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    match not_a_regular_file(file.metadata()?.file_type()) {
        Some(err) => Err(err),
        None => Ok(file),
    }
}

impl MetricsWriter {
    /// Starts writing to `file` (see `open_metrics_file`); a writer that fails reports to
    /// `on_failure`.
    pub fn start(
        mut file: File,
        interval: Duration,
        sample: Sampler,
        on_failure: crate::thread::FailureReport,
    ) -> std::io::Result<MetricsWriter> {
        let state = Arc::new(WriterState {
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let failed = Arc::new(AtomicBool::new(false));
        let (st, fl) = (state.clone(), failed.clone());
        let start = Instant::now();
        let thread = crate::thread::spawn(
            "metrics",
            crate::seccomp::ThreadKind::Metrics,
            on_failure,
            move || {
                let mut stopped = st.stop.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let (guard, _) = st
                        .wake
                        .wait_timeout(stopped, interval)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = guard;
                    let kind = if *stopped { "final" } else { "interval" };
                    let mut line = sample();
                    line["type"] = json!(kind);
                    line["t_ms"] = json!(start.elapsed().as_millis() as u64);
                    if let Err(e) = writeln!(file, "{line}").and_then(|_| file.flush()) {
                        fl.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                    if *stopped {
                        return Ok(());
                    }
                }
            },
        )?;
        Ok(MetricsWriter {
            state,
            thread: Some(thread),
            failed,
        })
    }

    /// Writes the final summary and waits for it to be written.
    pub fn finish(mut self) -> std::io::Result<()> {
        *self.state.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.state.wake.notify_all();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Some(result))) => result,
            Some(_) => Err(std::io::Error::other("the metrics thread failed")),
            None => Ok(()),
        }
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_summary_has_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.summary()["count"], 0);
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s["count"], 100);
        assert_eq!(s["p50_us"], 50);
        assert_eq!(s["max_us"], 100);
        assert_eq!(s["p99_us"], 99);
    }

    #[test]
    fn a_vcpu_line_has_trace_fields_only_with_a_trace() {
        let m = VcpuMetrics::default();
        m.run_ns.store(10_000_000, Ordering::Relaxed);
        m.sync_faults.add(Duration::from_millis(2));
        let plain = serde_json::to_value(m.line(1, None)).unwrap();
        assert_eq!(plain["vcpu"], 1);
        assert_eq!(plain["sync_fault_stall_ms"], 2.0);
        assert!(plain.get("apf_halt_ms").is_none(), "{plain}");
        let faults = VcpuFaults {
            async_faults: 3,
            apf_halts: 1,
            apf_halt_seconds: 0.003,
            ..Default::default()
        };
        let traced = serde_json::to_value(m.line(1, Some(faults))).unwrap();
        assert_eq!(traced["async_faults"], 3, "{traced}");
        assert!(
            (traced["apf_halt_ms"].as_f64().unwrap() - 3.0).abs() < 1e-9,
            "{traced}"
        );
        assert!((traced["host_fault_stall_ms"].as_f64().unwrap() - 5.0).abs() < 1e-9);
        assert!((traced["host_fault_stall_share"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn writer_emits_interval_lines_and_a_final_summary() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let w = MetricsWriter::start(
            open_metrics_file(f.as_path()).unwrap(),
            Duration::from_millis(10),
            Box::new(move || json!({ "n": n2.fetch_add(1, Ordering::Relaxed) })),
            Arc::new(|m| panic!("{m}")),
        )
        .unwrap();
        // Three samples taken: at least two interval lines are on their way.
        while n.load(Ordering::Relaxed) < 3 {
            std::thread::yield_now();
        }
        w.finish().unwrap();
        let text = std::fs::read_to_string(f.as_path()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.len() >= 3, "{text}");
        assert!(
            open_metrics_file(Path::new("/dev/null"))
                .unwrap_err()
                .to_string()
                .contains("a device, not a regular file")
        );
        assert!(
            lines[..lines.len() - 1]
                .iter()
                .all(|l| l["type"] == "interval")
        );
        assert_eq!(lines.last().unwrap()["type"], "final");
        assert!(
            lines
                .windows(2)
                .all(|w| w[0]["t_ms"].as_u64() <= w[1]["t_ms"].as_u64())
        );
    }
}

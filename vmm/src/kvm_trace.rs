//! How KVM handled each host page fault, per vCPU, from its own tracepoints (`--kvm-trace`,
//! root only).
//!
//! For every guest fault on a missing page that KVM turns into async work (a kworker waits for
//! the page) it logs `kvm_async_pf_not_present`, whether or not it can tell the guest; when it
//! can, the "page not present" #PF it injects (error code 0) follows at once
//! (`kvm_inj_exception`, filtered to exactly those). Otherwise the vCPU sits in KVM's "APF
//! halt" until the page is there (`kvm_async_pf_ready` for the same address); a guest that
//! touches a page still on its way again (`kvm_async_pf_repeated_fault`) halts too. So per
//! vCPU: async faults, pfaults delivered, APF halts and how long they kept the vCPU from the
//! guest. Synchronous faults never reach these tracepoints; the pager times them
//! (`sync_faults`).
//!
//! The events are enabled in a private tracefs instance, so the global trace buffer is left
//! alone; a thread reads the instance's `trace_pipe` and keeps the events raised by this
//! process's vCPU threads (named `vcpuN`), so other VMs on the host do not count.
//!
//! Two things make a busy host lie if left alone. The instance's clock is `global`: with the
//! default per-CPU `local` clock, events of a vCPU thread that migrated between host CPUs
//! come out of `trace_pipe` in the wrong order (an injection before its "not present"), and
//! a delivered fault looks like a halt. And a full ring buffer drops events: the per-CPU
//! `stats` files say how many (`overrun`, `dropped events`), and a trace that lost any says
//! so (`lost_events`) and reports no classification rather than a wrong one.
//! `kvm_async_pf_completed` runs in a kworker and cannot be told apart; it is counted for all
//! VMs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{Value, json};

const TRACEFS: &str = "/sys/kernel/tracing";
const NOT_PRESENT: &str = "kvm_async_pf_not_present";
const READY: &str = "kvm_async_pf_ready";
const REPEATED: &str = "kvm_async_pf_repeated_fault";
const COMPLETED: &str = "kvm_async_pf_completed";
const TRY_ASYNC: &str = "kvm_try_async_get_page";
const INJECT: &str = "kvm_inj_exception";
pub const EVENTS: [&str; 6] = [TRY_ASYNC, NOT_PRESENT, INJECT, READY, COMPLETED, REPEATED];
/// Only the #PF KVM injects for "page not present": vector 14, error code 0.
const INJECT_FILTER: &str = "exception == 14 && has_error == 1 && error_code == 0";
/// A clock that orders events of different host CPUs (see the module docs).
const TRACE_CLOCK: &str = "global";
/// Per host CPU; the default (1.4 MiB) is enough for a quiet host, this leaves room for a
/// reader that a loaded host keeps off the CPU for a while.
const BUFFER_SIZE_KB: &str = "8192";
/// The token of a page-ready that wakes every task parked on the vCPU.
const WAKE_ALL_TOKEN: u64 = 0xffff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--kvm-trace needs root (tracefs)")]
    NotRoot,
    #[error("--kvm-trace: cannot mount tracefs at {TRACEFS}: {0}")]
    Mount(std::io::Error),
    #[error("--kvm-trace: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TraceError {
    let path = path.display().to_string();
    move |source| TraceError::Io { what, path, source }
}

/// One vCPU's host faults as the trace saw them, up to some moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct VcpuFaults {
    pub async_faults: u64,
    pub pfaults_delivered: u64,
    /// APF halts that ended (the page came).
    pub apf_halts: u64,
    /// APF halts still going on (the page has not come).
    pub apf_halts_open: u64,
    /// Time the vCPU sat in APF halts, open ones included.
    #[serde(
        rename = "apf_halt_ms",
        serialize_with = "crate::metrics::seconds_as_ms"
    )]
    pub apf_halt_seconds: f64,
}

impl VcpuFaults {
    pub fn json(&self) -> Value {
        serde_json::to_value(self).expect("plain numbers serialize")
    }
}

/// What the trace said about one vCPU, and what it needs to classify the next events.
#[derive(Debug, Default, Clone)]
struct VcpuTrace {
    async_faults: u64,
    pfaults_delivered: u64,
    apf_halts: u64,
    /// Time with at least one halt open, up to `last_event`: the vCPU waits for one page at a
    /// time, so overlapping halts count once.
    halted_seconds: f64,
    last_event: f64,
    /// Pending async faults by guest address: is the vCPU halted on it (not told the guest)?
    pending: HashMap<u64, bool>,
    open: u64,
    /// The fault KVM just logged as "not present" (address, time), until its #PF injection
    /// shows or the vCPU takes another fault.
    awaiting_injection: Option<(u64, f64)>,
    /// The awaited fault's page came before its injection showed (the vCPU thread was off the
    /// host CPU in between: KVM completes pages before it injects events on the next entry).
    /// It was taken for an ended halt of this many seconds; an injection right after turns it
    /// back into a delivered pfault.
    ready_before_injection: Option<f64>,
}

impl VcpuTrace {
    fn set_halted(&mut self, gva: u64, halted: bool) {
        if let Some(h) = self.pending.get_mut(&gva)
            && *h != halted
        {
            *h = halted;
            if halted {
                self.open += 1;
            } else {
                self.open -= 1;
            }
        }
    }

    fn record(&mut self, event: &str, time: f64, gva: Option<u64>, token: Option<u64>) {
        if self.open > 0 {
            self.halted_seconds += (time - self.last_event).max(0.0);
        }
        self.last_event = self.last_event.max(time);
        match (event, gva) {
            (TRY_ASYNC, _) => {
                self.awaiting_injection = None;
                self.ready_before_injection = None;
            }
            (NOT_PRESENT, Some(gva)) => {
                self.async_faults += 1;
                if self.pending.insert(gva, true) != Some(true) {
                    self.open += 1;
                }
                self.awaiting_injection = Some((gva, time));
                self.ready_before_injection = None;
            }
            (INJECT, _) => {
                if let Some((gva, _)) = self.awaiting_injection.take() {
                    if let Some(halt) = self.ready_before_injection.take() {
                        self.apf_halts -= 1;
                        self.halted_seconds = (self.halted_seconds - halt).max(0.0);
                        self.pfaults_delivered += 1;
                    } else if self.pending.get(&gva) == Some(&true) {
                        self.set_halted(gva, false);
                        self.pfaults_delivered += 1;
                    }
                }
            }
            (REPEATED, Some(gva)) => self.set_halted(gva, true),
            // KVM sends a wake-all after every enabling write of MSR_KVM_ASYNC_PF_EN; the
            // disable before it dropped the completions of every fault still pending, so those
            // faults are over (a halted one ends its halt).
            (READY, _) if token == Some(WAKE_ALL_TOKEN) => {
                self.apf_halts += self.open;
                self.open = 0;
                self.pending.clear();
            }
            // The fault is done either way; only a halted one ends a halt.
            (READY, Some(gva)) if self.pending.remove(&gva) == Some(true) => {
                self.open -= 1;
                self.apf_halts += 1;
                if let Some((awaited, since)) = self.awaiting_injection
                    && awaited == gva
                {
                    self.ready_before_injection = Some((time - since).max(0.0));
                }
            }
            _ => {}
        }
    }

    /// The faults up to `now`: halts still open count until then.
    fn faults(&self, now: f64) -> VcpuFaults {
        let open_for = if self.open > 0 {
            (now - self.last_event).max(0.0)
        } else {
            0.0
        };
        VcpuFaults {
            async_faults: self.async_faults,
            pfaults_delivered: self.pfaults_delivered,
            apf_halts: self.apf_halts,
            apf_halts_open: self.open,
            apf_halt_seconds: self.halted_seconds + open_for,
        }
    }
}

/// Raw event counts and the per-vCPU classification.
#[derive(Debug, Default, Clone)]
pub struct TraceCounts {
    events: BTreeMap<&'static str, u64>,
    vcpus: BTreeMap<usize, VcpuTrace>,
    /// The newest event's time (trace clock, seconds): "now" for halts still going on.
    last_seen: f64,
    /// Events the ring buffer dropped (overwritten before they were read, or not recorded).
    lost_events: u64,
}

/// "<comm>-<pid> [cpu] flags seconds: event: details" → (comm, pid, seconds, event, details).
fn parse_line(line: &str) -> Option<(&str, i32, f64, &str, &str)> {
    let (head, rest) = line.split_once(": ")?;
    let (event, details) = rest.split_once(": ").unwrap_or((rest, ""));
    let mut fields = head.split_whitespace();
    let (comm, pid) = fields.next()?.rsplit_once('-')?;
    let seconds = fields.last()?.parse().ok()?;
    Some((comm, pid.parse().ok()?, seconds, event, details))
}

/// The hex value of `key` in an event's details (`gva 0x..`, `gva = 0x..`, `token 0x..`).
fn hex_field(details: &str, key: &str) -> Option<u64> {
    let after = details.split_once(key)?.1.trim_start_matches([' ', '=']);
    let hex = after.split([' ', ',']).next()?.strip_prefix("0x")?;
    u64::from_str_radix(hex, 16).ok()
}

impl TraceCounts {
    /// Takes in `line` if it is one of our events and `ours` accepts the pid that raised it.
    fn count_line(&mut self, line: &str, ours: &mut dyn FnMut(i32) -> bool) {
        let Some((comm, pid, time, event, details)) = parse_line(line) else {
            return;
        };
        let Some(event) = EVENTS.into_iter().find(|e| *e == event) else {
            return;
        };
        if event == COMPLETED {
            *self.events.entry(event).or_default() += 1;
            return;
        }
        let Some(vcpu) = comm.strip_prefix("vcpu").and_then(|n| n.parse().ok()) else {
            return;
        };
        if !ours(pid) {
            return;
        }
        self.last_seen = self.last_seen.max(time);
        *self.events.entry(event).or_default() += 1;
        self.vcpus.entry(vcpu).or_default().record(
            event,
            time,
            hex_field(details, "gva"),
            hex_field(details, "token"),
        );
    }

    pub fn get(&self, event: &str) -> u64 {
        self.events.get(event).copied().unwrap_or(0)
    }

    /// Events the trace lost: while this is above 0 its classification cannot be trusted.
    pub fn lost_events(&self) -> u64 {
        self.lost_events
    }

    /// What the trace said about vCPU `index`, up to the newest event; None once events were
    /// lost (the classification would be wrong).
    pub fn vcpu(&self, index: usize) -> Option<VcpuFaults> {
        if self.lost_events > 0 {
            return None;
        }
        Some(
            self.vcpus
                .get(&index)
                .map(|v| v.faults(self.last_seen))
                .unwrap_or_default(),
        )
    }

    /// The raw counts, the totals and one entry per vCPU seen; with lost events, only the raw
    /// counts and how many were lost.
    pub fn json(&self) -> Value {
        let mut events = serde_json::Map::new();
        for e in EVENTS {
            events.insert(e.to_string(), json!(self.get(e)));
        }
        if self.lost_events > 0 {
            return json!({
                "lost_events": self.lost_events,
                "events": Value::Object(events),
            });
        }
        let mut total = VcpuFaults::default();
        let mut vcpus = Vec::new();
        for (&index, trace) in &self.vcpus {
            let f = trace.faults(self.last_seen);
            total.async_faults += f.async_faults;
            total.pfaults_delivered += f.pfaults_delivered;
            total.apf_halts += f.apf_halts;
            total.apf_halts_open += f.apf_halts_open;
            total.apf_halt_seconds += f.apf_halt_seconds;
            let mut line = f.json();
            line["vcpu"] = json!(index);
            vcpus.push(line);
        }
        let mut all = total.json();
        all["lost_events"] = json!(0);
        all["events"] = Value::Object(events);
        all["vcpus"] = Value::Array(vcpus);
        all
    }
}

/// A running trace; `finish` stops it and removes the instance.
pub struct KvmTrace {
    instance: PathBuf,
    counts: Arc<Mutex<TraceCounts>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Option<()>>>,
}

fn ensure_tracefs() -> Result<(), TraceError> {
    if Path::new(TRACEFS).join("instances").is_dir() {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dst, fs) = (c("nodev"), c(TRACEFS), c("tracefs"));
    // SAFETY: valid NUL-terminated strings; null data is allowed for tracefs.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(TraceError::Mount(std::io::Error::last_os_error()));
    }
    Ok(())
}

impl KvmTrace {
    /// Starts tracing; a reader thread that fails reports to `on_failure`.
    pub fn start(on_failure: crate::thread::FailureReport) -> Result<KvmTrace, TraceError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(TraceError::NotRoot);
        }
        ensure_tracefs()?;
        let instance = Path::new(TRACEFS)
            .join("instances")
            .join(format!("apfvm-{}", std::process::id()));
        std::fs::create_dir(&instance).map_err(io_err("creating trace instance", &instance))?;
        let mut trace = KvmTrace {
            instance: instance.clone(),
            counts: Arc::new(Mutex::new(TraceCounts::default())),
            stop: Arc::new(AtomicBool::new(false)),
            reader: None,
        };
        for (file, value) in [
            ("trace_clock", TRACE_CLOCK),
            ("buffer_size_kb", BUFFER_SIZE_KB),
        ] {
            let path = instance.join(file);
            std::fs::write(&path, value).map_err(io_err("setting", &path))?;
        }
        let filter = instance.join("events/kvm").join(INJECT).join("filter");
        std::fs::write(&filter, INJECT_FILTER).map_err(io_err("filtering", &filter))?;
        for event in EVENTS {
            let enable = instance.join("events/kvm").join(event).join("enable");
            std::fs::write(&enable, "1").map_err(io_err("enabling", &enable))?;
        }
        let pipe_path = instance.join("trace_pipe");
        let pipe = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe_path)
            .map_err(io_err("opening", &pipe_path))?;
        let (counts, stop) = (trace.counts.clone(), trace.stop.clone());
        let per_cpu = instance.join("per_cpu");
        trace.reader = Some(
            crate::thread::spawn(
                "kvm-trace",
                crate::seccomp::ThreadKind::KvmTrace,
                on_failure,
                move || read_pipe(pipe, &per_cpu, &counts, &stop),
            )
            .map_err(io_err("starting reader for", &pipe_path))?,
        );
        Ok(trace)
    }

    pub fn counts(&self) -> TraceCounts {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops tracing, removes the instance and returns the final counts.
    pub fn finish(mut self) -> TraceCounts {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.counts()
    }
}

impl Drop for KvmTrace {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        for event in EVENTS {
            let _ = std::fs::write(
                self.instance.join("events/kvm").join(event).join("enable"),
                "0",
            );
        }
        if let Err(e) = std::fs::remove_dir(&self.instance) {
            log::warn!("kvm trace: cannot remove {}: {e}", self.instance.display());
        }
    }
}

/// The thread ids of this process.
fn our_threads() -> HashSet<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Events the instance's ring buffers lost so far, from each host CPU's `stats`.
fn lost_events(per_cpu: &Path) -> u64 {
    let Ok(cpus) = std::fs::read_dir(per_cpu) else {
        return 0;
    };
    cpus.filter_map(|cpu| std::fs::read_to_string(cpu.ok()?.path().join("stats")).ok())
        .map(|stats| lost_in_stats(&stats))
        .sum()
}

/// `overrun` (overwritten before read) plus `dropped events` (not recorded) of one `stats`.
fn lost_in_stats(stats: &str) -> u64 {
    stats
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            matches!(key.trim(), "overrun" | "dropped events")
                .then(|| value.trim().parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

fn read_pipe(mut pipe: File, per_cpu: &Path, counts: &Mutex<TraceCounts>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut partial = String::new();
    let mut threads = our_threads();
    // A pid not seen before may be a thread started since: look again, once per pid.
    let mut foreign: HashSet<i32> = HashSet::new();
    let mut ours = |pid: i32| {
        if threads.contains(&pid) {
            return true;
        }
        if foreign.contains(&pid) {
            return false;
        }
        threads = our_threads();
        if threads.contains(&pid) {
            return true;
        }
        foreign.insert(pid);
        false
    };
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut fds = [libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) };
        // Drain what is there (also after a stop, so the final counts are complete).
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    partial.push_str(&String::from_utf8_lossy(&buf[..n]));
                    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                    while let Some(end) = partial.find('\n') {
                        c.count_line(&partial[..end], &mut ours);
                        partial.drain(..=end);
                    }
                }
                Err(_) => break,
            }
        }
        let lost = lost_events(per_cpu);
        counts.lock().unwrap_or_else(|e| e.into_inner()).lost_events = lost;
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts of `lines`, keeping the events of the threads `ours` accepts.
    fn counted(lines: &[&str], mut ours: impl FnMut(i32) -> bool) -> TraceCounts {
        let mut c = TraceCounts::default();
        for line in lines {
            c.count_line(line, &mut ours);
        }
        c
    }

    /// A delivered fault, an APF halt (no injection) that lasts 4 ms, a repeated touch of a
    /// delivered page (a halt of 1 ms), a page-ready for a wake-all, and lines of other
    /// threads and events.
    #[test]
    fn faults_are_classified_per_vcpu_and_halts_timed() {
        let c = counted(
            &[
                "  vcpu0-999 [001] d..1. 9.0: kvm_async_pf_not_present: token 0x1000 gva 0x1000",
                "  vcpu0-123 [001] d..1. 10.000: kvm_try_async_get_page: gva = 0x1000, gfn = 0x1",
                "  vcpu0-123 [001] d..1. 10.000: kvm_async_pf_not_present: token 0x1000 gva 0x1000",
                "  vcpu0-123 [001] d..1. 10.000: kvm_inj_exception: #PF (0x0)",
                "  vcpu1-124 [000] d..1. 10.001: kvm_try_async_get_page: gva = 0x3000, gfn = 0x3",
                "  vcpu1-124 [000] d..1. 10.001: kvm_async_pf_not_present: token 0x1001 gva 0x3000",
                "  kworker/1:0-9 [001] ..... 10.002: kvm_async_pf_completed: gva 0x1000 address 0x7f",
                "  vcpu0-123 [001] d..1. 10.003: kvm_async_pf_ready: token 0x1000 gva 0x1000",
                "  vcpu1-124 [000] d..1. 10.005: kvm_async_pf_ready: token 0x1001 gva 0x3000",
                "  vcpu0-123 [001] d..1. 10.010: kvm_try_async_get_page: gva = 0x5000, gfn = 0x5",
                "  vcpu0-123 [001] d..1. 10.010: kvm_async_pf_not_present: token 0x2000 gva 0x5000",
                "  vcpu0-123 [001] d..1. 10.010: kvm_inj_exception: #PF (0x0)",
                "  vcpu0-123 [001] d..1. 10.011: kvm_try_async_get_page: gva = 0x5000, gfn = 0x5",
                "  vcpu0-123 [001] d..1. 10.011: kvm_async_pf_repeated_fault: gva = 0x5000, gfn = 0x5",
                "  vcpu0-123 [001] d..1. 10.012: kvm_async_pf_ready: token 0x2000 gva 0x5000",
                "  vcpu0-123 [001] d..1. 10.020: kvm_async_pf_ready: token 0xffffffff gva 0x0",
                "  vcpu1-124 [000] d..1. 10.030: kvm_try_async_get_page: gva = 0x7000, gfn = 0x7",
                "  vcpu1-124 [000] d..1. 10.030: kvm_async_pf_not_present: token 0x2001 gva 0x7000",
                "  vcpu1-124 [000] d..1. 10.032: kvm_try_async_get_page: gva = 0x7000, gfn = 0x7",
                "  vcpu1-124 [000] d..1. 10.032: kvm_async_pf_repeated_fault: gva = 0x7000, gfn = 0x7",
                "  vcpu0-123 [001] d..1. 10.3: kvm_exit: reason IO",
            ],
            |pid| pid == 123 || pid == 124,
        );
        let j = c.json();
        assert_eq!(j["async_faults"], 4, "{j}");
        assert_eq!(j["pfaults_delivered"], 2, "{j}");
        assert_eq!(j["apf_halts"], 2, "{j}");
        assert_eq!(j["events"]["kvm_async_pf_completed"], 1);
        assert_eq!(j["events"]["kvm_async_pf_ready"], 4);
        let (v0, v1) = (c.vcpu(0).unwrap(), c.vcpu(1).unwrap());
        assert_eq!(
            (v0.async_faults, v0.pfaults_delivered, v0.apf_halts),
            (2, 2, 1)
        );
        assert!((v0.apf_halt_seconds - 0.001).abs() < 1e-9, "{v0:?}");
        // 4 ms halted on 0x3000, then 2 ms so far on 0x7000, whose page has not come: it
        // counts up to the newest event (10.032 s), and again up to a later `now`.
        assert_eq!(
            (v1.async_faults, v1.pfaults_delivered, v1.apf_halts),
            (2, 0, 1)
        );
        assert_eq!(j["apf_halts_open"], 1, "{j}");
        assert_eq!(v1.apf_halts_open, 1);
        assert!((v1.apf_halt_seconds - 0.006).abs() < 1e-9, "{v1:?}");
        let later = c.vcpus[&1].faults(c.last_seen + 0.5);
        assert!((later.apf_halt_seconds - 0.506).abs() < 1e-9, "{later:?}");
        assert!(
            (j["apf_halt_ms"].as_f64().unwrap() - 7.0).abs() < 1e-6,
            "{j}"
        );
        assert_eq!(j["vcpus"][1]["vcpu"], 1);
    }

    /// A wake-all ends every fault still pending on its vCPU: KVM dropped their completions
    /// when the guest disabled async PF before enabling it again.
    #[test]
    fn a_wake_all_clears_the_faults_pending_on_its_vcpu() {
        let c = counted(
            &[
                "  vcpu0-1 [001] d..1. 1.000: kvm_try_async_get_page: gva = 0x1000, gfn = 0x1",
                "  vcpu0-1 [001] d..1. 1.000: kvm_async_pf_not_present: token 0x1000 gva 0x1000",
                "  vcpu0-1 [001] d..1. 1.000: kvm_inj_exception: #PF (0x0)",
                "  vcpu0-1 [001] d..1. 1.001: kvm_try_async_get_page: gva = 0x2000, gfn = 0x2",
                "  vcpu0-1 [001] d..1. 1.001: kvm_async_pf_not_present: token 0x2000 gva 0x2000",
                "  vcpu0-1 [001] d..1. 1.003: kvm_async_pf_ready: token 0xffffffff gva 0x0",
                "  vcpu0-1 [001] d..1. 1.500: kvm_exit: reason IO",
            ],
            |_| true,
        );
        let v0 = c.vcpu(0).unwrap();
        assert_eq!(
            (v0.pfaults_delivered, v0.apf_halts, v0.apf_halts_open),
            (1, 1, 0)
        );
        assert!((v0.apf_halt_seconds - 0.002).abs() < 1e-9, "{v0:?}");
    }

    /// A trace that lost events reports how many and no classification.
    #[test]
    fn lost_events_are_counted_from_stats_and_withhold_the_classification() {
        let stats = "entries: 12\noverrun: 3\ncommit overrun: 0\nbytes: 900\n\
                     oldest event ts: 1.0\nnow ts: 2.0\ndropped events: 2\nread events: 40\n";
        assert_eq!(lost_in_stats(stats), 5);
        let mut c = counted(
            &["  vcpu0-1 [001] d..1. 1.000: kvm_async_pf_not_present: token 0x1000 gva 0x1000"],
            |_| true,
        );
        assert!(c.vcpu(0).is_some());
        assert_eq!(c.json()["lost_events"], 0);
        c.lost_events = 5;
        assert!(c.vcpu(0).is_none());
        let j = c.json();
        assert_eq!(j["lost_events"], 5);
        assert!(j.get("pfaults_delivered").is_none(), "{j}");
        assert_eq!(j["events"][NOT_PRESENT], 1);
    }

    /// A vCPU thread that lost its host CPU right after KVM queued the "not present" #PF: on
    /// the next entry KVM first completes the page (ready), then injects the #PF. The guest
    /// still got a pfault.
    #[test]
    fn an_injection_after_its_page_came_is_still_a_delivered_pfault() {
        let c = counted(
            &[
                "  vcpu0-1 [000] ..... 923.010438: kvm_try_async_get_page: gva = 0x2002000, gfn = 0x2002",
                "  vcpu0-1 [000] ..... 923.010439: kvm_async_pf_not_present: token 0x9000 gva 0x2002000",
                "  vcpu0-1 [000] ..... 923.012713: kvm_async_pf_ready: token 0x9000 gva 0x2002000",
                "  vcpu0-1 [000] ..... 923.012715: kvm_inj_exception: #PF (0x0)",
                "  vcpu0-1 [000] ..... 923.012943: kvm_try_async_get_page: gva = 0x202f000, gfn = 0x202f",
                "  vcpu0-1 [000] ..... 923.012943: kvm_async_pf_not_present: token 0xa000 gva 0x202f000",
                "  vcpu0-1 [000] ..... 923.013000: kvm_async_pf_ready: token 0xa000 gva 0x202f000",
                "  vcpu0-1 [000] ..... 923.014000: kvm_try_async_get_page: gva = 0x2030000, gfn = 0x2030",
            ],
            |_| true,
        );
        let v0 = c.vcpu(0).unwrap();
        // The second fault was never injected: a halt that its page ended.
        assert_eq!(
            (v0.async_faults, v0.pfaults_delivered, v0.apf_halts),
            (2, 1, 1)
        );
        assert!((v0.apf_halt_seconds - 0.000057).abs() < 1e-9, "{v0:?}");
    }
}

//! How KVM handled each host page fault, from its own tracepoints (`--kvm-trace`, root only).
//!
//! KVM logs `kvm_try_async_get_page` when it turns a guest fault on a missing page into async
//! work (a kworker waits for the page), `kvm_async_pf_not_present` when it could tell the
//! guest "page not present" (a pfault delivered), `kvm_async_pf_ready` / `_completed` when
//! the page is there, and `kvm_async_pf_repeated_fault` when the guest touched a page that was
//! already being fetched. An async fault that was not delivered as "not present" was waited
//! out by KVM halting the vCPU ("APF halt"). Synchronous faults never reach these tracepoints;
//! the pager counts them (`faults_sync`).
//!
//! The events are enabled in a private tracefs instance, so the global trace buffer is left
//! alone; a thread reads the instance's `trace_pipe` and counts the events raised by this
//! process's own threads (the vCPU threads: all but `_completed` run in vCPU context), so
//! other VMs on the host do not count. `kvm_async_pf_completed` runs in a kworker and cannot
//! be told apart; it is counted for all VMs.

use std::collections::{BTreeMap, HashSet};
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
pub const EVENTS: [&str; 5] = [
    "kvm_try_async_get_page",
    "kvm_async_pf_not_present",
    "kvm_async_pf_ready",
    "kvm_async_pf_completed",
    "kvm_async_pf_repeated_fault",
];

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

/// Counts of each event.
#[derive(Debug, Default, Clone)]
pub struct TraceCounts(BTreeMap<&'static str, u64>);

impl TraceCounts {
    /// Counts `line` if it is one of our events and `ours` accepts the pid that raised it.
    fn count_line(&mut self, line: &str, ours: &mut dyn FnMut(i32) -> bool) {
        let Some(event) = EVENTS.iter().find(|e| line.contains(&format!(" {e}:"))) else {
            return;
        };
        // "<comm>-<pid> [cpu] flags timestamp: event: ..."
        let pid = line
            .split_whitespace()
            .next()
            .and_then(|task| task.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<i32>().ok());
        let kworker_event = *event == "kvm_async_pf_completed";
        if kworker_event || pid.is_some_and(&mut *ours) {
            *self.0.entry(event).or_default() += 1;
        }
    }

    pub fn get(&self, event: &str) -> u64 {
        self.0.get(event).copied().unwrap_or(0)
    }

    /// The counts plus the per-fault classification.
    pub fn json(&self) -> Value {
        let queued = self.get("kvm_try_async_get_page");
        let delivered = self.get("kvm_async_pf_not_present");
        let mut events = serde_json::Map::new();
        for e in EVENTS {
            events.insert(e.to_string(), json!(self.get(e)));
        }
        json!({
            "events": events,
            "async_faults": queued,
            "pfaults_delivered": delivered,
            "apf_halts": queued.saturating_sub(delivered),
        })
    }
}

/// A running trace; `finish` stops it and removes the instance.
pub struct KvmTrace {
    instance: PathBuf,
    counts: Arc<Mutex<TraceCounts>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
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
    pub fn start() -> Result<KvmTrace, TraceError> {
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
        trace.reader = Some(
            std::thread::Builder::new()
                .name("kvm-trace".into())
                .spawn(move || {
                    match crate::seccomp::confine(crate::seccomp::ThreadKind::KvmTrace) {
                        Ok(()) => read_pipe(pipe, &counts, &stop),
                        Err(e) => log::error!("kvm-trace: {e}; no trace counts"),
                    }
                })
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

fn read_pipe(mut pipe: File, counts: &Mutex<TraceCounts>, stop: &AtomicBool) {
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
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_by_event_and_classified() {
        let mut c = TraceCounts::default();
        let mut ours = |pid: i32| pid == 123;
        for line in [
            "  vcpu0-999 [001] d..1. 10.0: kvm_async_pf_not_present: token 0x1000 gva 0x1000",
            "  vcpu0-123 [001] d..1. 10.0: kvm_try_async_get_page: gva = 0x1000, gfn = 0x2000",
            "  vcpu0-123 [001] d..1. 10.0: kvm_async_pf_not_present: token 0x1000 gva 0x1000",
            "  vcpu0-123 [001] d..1. 10.1: kvm_try_async_get_page: gva = 0x3000, gfn = 0x4000",
            "  kworker/1:0-9 [001] ..... 10.2: kvm_async_pf_completed: gva 0x1000 address 0x7f",
            "  vcpu0-123 [001] d..1. 10.3: kvm_async_pf_ready: token 0x1000 gva 0x1000",
            "  vcpu0-123 [001] d..1. 10.3: kvm_exit: reason IO",
        ] {
            c.count_line(line, &mut ours);
        }
        let j = c.json();
        assert_eq!(j["async_faults"], 2);
        assert_eq!(j["pfaults_delivered"], 1);
        assert_eq!(j["apf_halts"], 1);
        assert_eq!(j["events"]["kvm_async_pf_ready"], 1);
        assert_eq!(j["events"]["kvm_async_pf_repeated_fault"], 0);
    }
}

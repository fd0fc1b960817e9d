//! The one way apfvm starts a thread: named, confined by its seccomp kind, and with one
//! failure policy. A thread that panics, or cannot confine itself, reports to its owner
//! (`on_failure`, with a message naming the thread), so that the VM stops with an error
//! instead of waiting forever for a thread that is gone.
//!
//! Panics are reported by apfvm's own panic hook: the default one captures a backtrace when
//! RUST_BACKTRACE is set, which opens files a confined thread may not open (the kernel would
//! then end apfvm with SIGSYS). Ours formats the message and writes it to stderr, nothing
//! else.

use std::io::Write;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use crate::seccomp::{self, ThreadKind};

/// Receives a failed thread's message.
pub type FailureReport = Arc<dyn Fn(String) + Send + Sync>;

/// Starts `body` on a new thread named `name`, confined as `kind`. The handle yields `None` if
/// the thread failed (it has then called `on_failure`).
pub fn spawn<T: Send + 'static>(
    name: &str,
    kind: ThreadKind,
    on_failure: FailureReport,
    body: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<Option<T>>> {
    install_panic_hook();
    let thread = name.to_string();
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            if let Err(e) = seccomp::confine(kind) {
                on_failure(format!("thread {thread}: {e}"));
                return None;
            }
            match std::panic::catch_unwind(AssertUnwindSafe(body)) {
                Ok(value) => Some(value),
                Err(panic) => {
                    on_failure(format!(
                        "thread {thread} panicked: {}",
                        panic_message(&*panic)
                    ));
                    None
                }
            }
        })
}

/// The text a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn report_panic(info: &PanicHookInfo<'_>) {
    let thread = std::thread::current();
    let location = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    let line = format!(
        "apfvm: thread {} panicked{location}: {}\n",
        thread.name().unwrap_or("?"),
        panic_message(info.payload())
    );
    // One write of the whole line; a stderr nobody reads must not hold the thread.
    let _ = crate::console::stderr().write_all(line.as_bytes());
}

/// Replaces the default panic hook with `report_panic`, once per process.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(report_panic)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_panicking_thread_is_reported_by_name_and_yields_none() {
        let failures = Arc::new(Mutex::new(Vec::new()));
        let sink = failures.clone();
        let report: FailureReport = Arc::new(move |m| sink.lock().unwrap().push(m));
        let ok = spawn("worker-ok", ThreadKind::Metrics, report.clone(), || 7).unwrap();
        assert_eq!(ok.join().unwrap(), Some(7));
        let bad = spawn("worker-bad", ThreadKind::Metrics, report, || -> u8 {
            panic!("lost the page table")
        })
        .unwrap();
        assert_eq!(bad.join().unwrap(), None);
        assert_eq!(
            *failures.lock().unwrap(),
            vec!["thread worker-bad panicked: lost the page table".to_string()]
        );
    }
}

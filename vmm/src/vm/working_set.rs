//! Recording a lazy restore's working set: the pager records its first touches from the start
//! of the restore; this thread decides when the recording ends (`RecordEnd`: the guest's
//! first touches fall below a rate for a second, since HLT is handled inside KVM and apfvm
//! cannot see "idle" otherwise; or a fixed time) and writes the file. If the VM stops first,
//! what was recorded until then is written.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::RecordEnd;
use crate::pager::{PAGE_SIZE, Pager};
use crate::seccomp::ThreadKind;
use crate::snapshot::working_set::{self, WorkingSet};
use crate::thread::FailureReport;

/// How often the first-touch count is sampled.
const TICK: Duration = Duration::from_millis(100);
/// The window an idle rate is measured over.
const IDLE_WINDOW: usize = 10;

pub struct WorkingSetRecorder {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl WorkingSetRecorder {
    /// Starts deciding when the recording (already running in `pager`) ends; `started` is
    /// when the restore began.
    pub fn start(
        pager: Arc<Pager>,
        path: PathBuf,
        snapshot_id: String,
        end: RecordEnd,
        started: Instant,
        on_failure: FailureReport,
    ) -> std::io::Result<WorkingSetRecorder> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        let thread = crate::thread::spawn(
            "working-set",
            ThreadKind::WorkingSet,
            on_failure,
            move || {
                let ended_by = wait_for_end(&pager, end, &stopped);
                let set = WorkingSet {
                    snapshot_id,
                    page_size: PAGE_SIZE as u64,
                    ended_by,
                    recorded_ms: started.elapsed().as_millis() as u64,
                    pages: pager.take_first_touches(),
                };
                match working_set::write(&path, &set) {
                    Ok(()) => log::info!(
                        "working set: {} pages ({}) written to {}",
                        set.pages.len(),
                        set.ended_by,
                        path.display()
                    ),
                    // Not fatal: the VM runs as well without it; the next restore is on demand.
                    Err(e) => log::warn!("{e}"),
                }
            },
        )?;
        Ok(WorkingSetRecorder {
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the recording now (if it has not ended) and waits for the file to be written.
    pub fn finish(&mut self) {
        let (lock, changed) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WorkingSetRecorder {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Samples the first-touch count every `TICK` until `end` holds or the VM stops; says which.
fn wait_for_end(pager: &Pager, end: RecordEnd, stop: &(Mutex<bool>, Condvar)) -> String {
    let started = Instant::now();
    let mut counts = vec![pager.first_touch_count()];
    let (lock, changed) = stop;
    let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        stopped = changed
            .wait_timeout_while(stopped, TICK, |s| !*s)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if *stopped {
            return "the VM stopped".to_string();
        }
        counts.push(pager.first_touch_count());
        match end {
            RecordEnd::After(after) if started.elapsed() >= after => {
                return format!("after {after:?}");
            }
            RecordEnd::Idle { pages_per_sec } if counts.len() > IDLE_WINDOW => {
                let recent = counts[counts.len() - 1] - counts[counts.len() - 1 - IDLE_WINDOW];
                if recent < pages_per_sec as usize {
                    return format!("idle: under {pages_per_sec} first touches/s for 1 s");
                }
            }
            _ => {}
        }
    }
}

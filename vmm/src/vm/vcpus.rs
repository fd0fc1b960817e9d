//! The vCPU threads of a VM and how their owner steers them: run, pause (every vCPU out of
//! KVM_RUN and parked), stop. A vCPU thread reports what its vCPU did (`VcpuAction`); the VM
//! decides what follows.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_device::device_manager::IoManager;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use super::snapshot::SnapshotRequests;
use super::stop::{StopReason, StopRequests};
use crate::metrics::VcpuMetrics;
use crate::pager::Pager;
use crate::seccomp::ThreadKind;
use crate::snapshot::state::VcpuState;
use crate::vcpu::{self, Vcpu, VcpuAction, VcpuError};

/// What the owner wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct Control {
    desired: Desired,
    /// Threads parked (out of KVM_RUN, waiting for Run or Stop).
    parked: usize,
    /// Threads that left their loop.
    exited: usize,
    /// A state save the owner asked the parked vCPUs for.
    save: Option<SaveJob>,
}

/// Each parked vCPU saves its own state on its own thread (vCPU ioctls belong there).
#[derive(Debug)]
struct SaveJob {
    msr_indices: Arc<[u32]>,
    /// By vCPU index; filled in by each vCPU's thread.
    results: Vec<Option<Result<VcpuState, VcpuError>>>,
}

struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
}

/// The running vCPU threads.
pub struct VcpuThreads {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Option<()>>>,
}

/// How often a kick is repeated while waiting for vCPUs to park or leave: covers a thread
/// that was between its check and KVM_RUN when the previous kick came.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// What a vCPU thread needs besides its vCPU.
pub struct VcpuContext {
    pub io: Arc<IoManager>,
    pub mem: GuestMemoryMmap,
    pub stop: Arc<StopRequests>,
    pub pager: Option<Arc<Pager>>,
    /// Where a guest's snapshot request parks its vCPU (set before any vCPU runs, so that
    /// even a request right at the start is taken exactly where it was made).
    pub snapshot_requests: Option<Arc<SnapshotRequests>>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU, running.
    pub fn start(
        vcpus: Vec<Vcpu>,
        context: &VcpuContext,
        metrics: &[Arc<VcpuMetrics>],
    ) -> std::io::Result<VcpuThreads> {
        vcpu::register_kick_handler().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                desired: Desired::Run,
                parked: 0,
                exited: 0,
                save: None,
            }),
            changed: Condvar::new(),
        });
        let mut threads = VcpuThreads {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        if let Some(requests) = &context.snapshot_requests {
            requests.set_pauser(threads.pauser());
        }
        for vcpu in vcpus {
            let name = format!("vcpu{}", vcpu.index);
            let stop = context.stop.clone();
            let on_failure = context.stop.failure_report();
            let (io, mem, pager) = (
                context.io.clone(),
                context.mem.clone(),
                context.pager.clone(),
            );
            let metrics = metrics[usize::from(vcpu.index)].clone();
            let shared = shared.clone();
            let body = move || {
                let _exited = ExitGuard(shared.clone());
                if let Some(pager) = pager {
                    // Faults raised by this thread stall the vCPU itself (guest kernel mode).
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    pager.add_sync_thread(tid, metrics.sync_faults.clone());
                }
                run_vcpu(vcpu, &shared, &io, &mem, &metrics, &stop);
            };
            match crate::thread::spawn(&name, ThreadKind::Vcpu, on_failure, body) {
                Ok(handle) => threads.threads.push(handle),
                Err(e) => {
                    threads.stop(Instant::now() + super::STOP_BUDGET);
                    return Err(e);
                }
            }
        }
        Ok(threads)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.shared
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, desired: Desired) {
        let mut control = self.lock();
        // A stop is final.
        if control.desired != Desired::Stop {
            control.desired = desired;
        }
        drop(control);
        self.shared.changed.notify_all();
    }

    fn kick_all(&self) {
        for t in &self.threads {
            if !t.is_finished() {
                let _ = t.kill(vcpu::kick_signal());
            }
        }
    }

    /// Waits, kicking, until `done` holds or `deadline` passes; returns whether it held.
    fn kick_until(&self, deadline: Instant, done: impl Fn(&Control, usize) -> bool) -> bool {
        let total = self.threads.len();
        loop {
            self.kick_all();
            let control = self.lock();
            if done(&control, total) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = KICK_INTERVAL.min(deadline - now);
            drop(
                self.shared
                    .changed
                    .wait_timeout(control, wait)
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
    }

    /// Takes every vCPU out of KVM_RUN and parks it; returns false if some did not park by
    /// `deadline` (a vCPU stuck in a synchronous fault the pager has not served).
    pub fn pause(&self, deadline: Instant) -> bool {
        self.set(Desired::Pause);
        self.kick_until(deadline, |c, total| c.parked + c.exited >= total)
    }

    pub fn resume(&self) {
        self.set(Desired::Run);
    }

    /// A way for a vCPU thread to stop the vCPUs at the instruction after its current exit:
    /// the calling vCPU parks before it enters KVM_RUN again (the others once the owner's
    /// `pause` kicks them). The owner must then pause and resume as usual.
    pub fn pauser(&self) -> Box<dyn Fn() + Send + Sync> {
        let shared = self.shared.clone();
        Box::new(move || {
            let mut control = shared.control.lock().unwrap_or_else(|e| e.into_inner());
            if control.desired == Desired::Run {
                control.desired = Desired::Pause;
            }
        })
    }

    /// Every vCPU's state, saved by its own parked thread (the vCPUs must be paused); None
    /// when some vCPU did not answer by `deadline` (it left its loop: the VM is stopping).
    pub fn save_states(
        &self,
        msr_indices: Arc<[u32]>,
        deadline: Instant,
    ) -> Option<Result<Vec<VcpuState>, VcpuError>> {
        let total = self.threads.len();
        let mut control = self.lock();
        control.save = Some(SaveJob {
            msr_indices,
            results: (0..total).map(|_| None).collect(),
        });
        self.shared.changed.notify_all();
        loop {
            let job = control.save.as_ref().expect("the owner's save job");
            if job.results.iter().all(Option::is_some) {
                let job = control.save.take().expect("the owner's save job");
                return Some(job.results.into_iter().flatten().collect());
            }
            let now = Instant::now();
            if now >= deadline || control.exited > 0 {
                control.save = None;
                return None;
            }
            control = self
                .shared
                .changed
                .wait_timeout(control, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops every vCPU thread and joins it; returns the names of threads that had not left
    /// by `deadline` (they are left running: what they use must then outlive the process).
    pub fn stop(&mut self, deadline: Instant) -> Vec<String> {
        self.set(Desired::Stop);
        // Every thread past its loop is as good as finished (it only returns from there).
        let all_left = self.kick_until(deadline, |c, total| c.exited >= total);
        let mut stuck = Vec::new();
        for t in self.threads.drain(..) {
            if all_left || t.is_finished() {
                let _ = t.join();
            } else {
                stuck.push(t.thread().name().unwrap_or("vcpu?").to_string());
            }
        }
        stuck
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop(Instant::now() + super::STOP_BUDGET);
        }
    }
}

/// Counts the thread as exited however it leaves (also by a panic), so that nobody waits for
/// a vCPU that is gone.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut control = self.0.control.lock().unwrap_or_else(|e| e.into_inner());
        control.exited += 1;
        drop(control);
        self.0.changed.notify_all();
    }
}

/// Parks while the owner wants a pause; returns false when the vCPU is to stop.
fn wait_for_run(vcpu: &mut Vcpu, shared: &Shared) -> bool {
    let mut control = shared.control.lock().unwrap_or_else(|e| e.into_inner());
    if control.desired == Desired::Pause {
        drop(control);
        vcpu.complete_pending_io();
        vcpu.notify_paused();
        control = shared.control.lock().unwrap_or_else(|e| e.into_inner());
        control.parked += 1;
        shared.changed.notify_all();
        while control.desired == Desired::Pause {
            let index = usize::from(vcpu.index);
            let msrs = match &control.save {
                Some(job) if job.results.get(index).is_some_and(Option::is_none) => {
                    Some(job.msr_indices.clone())
                }
                _ => None,
            };
            if let Some(msrs) = msrs {
                drop(control);
                let saved = vcpu.save_state(&msrs);
                control = shared.control.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(job) = control.save.as_mut() {
                    job.results[index] = Some(saved);
                }
                shared.changed.notify_all();
                continue;
            }
            control = shared
                .changed
                .wait(control)
                .unwrap_or_else(|e| e.into_inner());
        }
        control.parked -= 1;
    }
    control.desired == Desired::Run
}

fn run_vcpu(
    mut vcpu: Vcpu,
    shared: &Shared,
    io: &IoManager,
    mem: &GuestMemoryMmap,
    metrics: &VcpuMetrics,
    stop: &StopRequests,
) {
    vcpu.bind_kick();
    while wait_for_run(&mut vcpu, shared) {
        match vcpu.run_once(io, mem, metrics) {
            VcpuAction::Continue => {}
            VcpuAction::GuestReset => {
                stop.request(StopReason::Guest(devices::GuestStop::Reset));
                break;
            }
            VcpuAction::Fault(fault) => {
                stop.request(StopReason::Fault(fault));
                break;
            }
        }
    }
    vcpu.unbind_kick();
}

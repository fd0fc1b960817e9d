//! A VM and its lifecycle: built from a `VmConfig`, then running, paused, resumed, stopped.
//!
//! ```text
//! Built ──start──▶ Running ◀──resume── Paused
//!                     └──────pause───────┘
//!  any state ──stop (guest exit, vCPU fault, failed thread, signal, owner)──▶ Stopped
//! ```
//!
//! One `Vm` owns everything with a lifetime: the vCPU threads, the metrics and trace threads,
//! the pager, the devices, the KVM VM and guest memory. Its fields are declared in teardown
//! order, and `shutdown` (also run by `Drop`, so on every path, errors included) keeps it:
//! the pager first releases every fault it holds (no vCPU or KVM kworker may wait on it any
//! more), the vCPU threads are stopped and joined, the pager stops (its userfaultfd closes
//! before the VM's fd: KVM's teardown waits for async-PF kworkers that could be blocked on
//! it), the final metrics line is written, and guest memory goes last (KVM maps it until the
//! VM is gone). The whole stop fits in `STOP_BUDGET`.
//!
//! `run` (run.rs) is what the CLI does with a VM: signals, the console, the event loop, and
//! the control API's requests (api.rs carries them out).

mod api;
mod build;
mod run;
mod snapshot;
mod stop;
mod vcpus;
mod working_set;

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::SerialConsole;
use kvm_ioctls::{Cap, VmFd};
use vm_device::device_manager::IoManager;
use vm_memory::GuestMemoryMmap;

pub use build::open_kvm;
pub use run::{PAGER_SUMMARY, RESTORED, SNAPSHOT_DONE, run, run_awaiting_snapshot};
pub use snapshot::SnapshotRequests;
pub use stop::{StopReason, StopRequests};

use crate::arch::x86_64::boot;
use crate::arch::x86_64::loader::LoaderError;
use crate::arch::x86_64::mptable::MptableError;
use crate::config::VmConfig;
use crate::console::{ConsoleOutput, InputGate};
use crate::kvm_trace::{KvmTrace, TraceError};
use crate::memory::MemoryError;
use crate::metrics::{MetricsWriter, VcpuMetrics};
use crate::pager::{Pager, PagerError, PagerSummary, StoreError};
use crate::vcpu::{Vcpu, VcpuError, VcpuFault};
use vcpus::{VcpuContext, VcpuThreads};

/// How long stopping a VM may take, from any state.
pub const STOP_BUDGET: Duration = Duration::from_secs(5);

/// How a VM ended when nothing went wrong in apfvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest rebooted or powered off.
    GuestReset,
    /// A test guest wrote this code to the debug-exit port.
    GuestExit(u8),
    /// apfvm was asked to stop by this signal.
    Signal(i32),
    /// The VM's owner stopped it.
    Stopped,
}

/// Where a VM is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Built,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "{path} does not exist: this host has no KVM (load kvm_intel or kvm_amd, or use a \
         host with hardware virtualization)"
    )]
    NoKvm { path: String },
    #[error("no permission to open {path}: run as root or add your user to the 'kvm' group")]
    KvmPermission { path: String },
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("the KVM device does not answer KVM_GET_API_VERSION: it is not a KVM device")]
    NotKvm,
    #[error("KVM API version {0} is not supported (apfvm needs 12)")]
    KvmApiVersion(i32),
    #[error("this host's KVM lacks {0:?}, which apfvm needs")]
    KvmCapability(Cap),
    #[error("{asked} vCPUs requested, but this host's KVM allows at most {max}")]
    TooManyVcpus { asked: u8, max: usize },
    #[error("KVM setup failed: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Kernel(#[from] LoaderError),
    #[error("initrd {path}: {message}")]
    Initrd { path: String, message: String },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Pager(#[from] PagerError),
    #[error(transparent)]
    PageStore(#[from] StoreError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("setting up the event loop: {0}")]
    Events(String),
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot write metrics to {path}: {source}")]
    Metrics {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot {action} a VM that is {state:?}")]
    BadState {
        action: &'static str,
        state: VmState,
    },
    #[error("pausing: vCPU threads did not leave KVM_RUN within {0:?}; the VM runs on")]
    PauseTimeout(Duration),
    #[error("vCPU thread(s) {0} did not stop within the stop budget")]
    StopTimeout(String),
    #[error("restoring: {0}")]
    Restore(crate::snapshot::SnapshotError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error("{0}")]
    Fault(VcpuFault),
    #[error("{0}")]
    Vmm(String),
}

/// A VM. Fields in teardown order (see the module docs); `Drop` runs `shutdown`.
pub struct Vm {
    vcpu_threads: Option<VcpuThreads>,
    /// A lazy restore's working-set recording (ends before the pager stops).
    working_set: Option<working_set::WorkingSetRecorder>,
    /// vCPUs built but not started yet (state Built).
    unstarted: Vec<Vcpu>,
    metrics_writer: Option<MetricsWriter>,
    /// `config.metrics`' file until `start` hands it to the writer.
    metrics_file: Option<File>,
    trace: Option<Arc<KvmTrace>>,
    pager: Option<Arc<Pager>>,
    io: Arc<IoManager>,
    serial: Arc<Mutex<SerialConsole>>,
    /// Holds stdin → UART while paused.
    input_gate: Arc<InputGate>,
    console: Arc<ConsoleOutput>,
    vcpu_metrics: Vec<Arc<VcpuMetrics>>,
    /// Held, not used after the build: the KVM VM lives as long as this fd.
    #[allow(dead_code)]
    vm_fd: VmFd,
    memory: GuestMemoryMmap,
    stop: Arc<StopRequests>,
    snapshot_requests: Arc<SnapshotRequests>,
    /// What KVM_GET_MSR_INDEX_LIST said at build: the MSRs a snapshot saves.
    msr_indices: Arc<[u32]>,
    state: VmState,
    config: VmConfig,
    /// What the pager said when it stopped, and the trace's last word.
    pager_summary: Option<PagerSummary>,
    trace_summary: Option<serde_json::Value>,
}

impl Vm {
    /// Builds the VM `config` describes, ready to start: KVM VM, guest memory with the kernel
    /// and boot data loaded, the pager serving (with `--pager uffd`), devices, configured
    /// vCPUs. `metrics_file` is `config.metrics`' file, opened by the caller (before it masks
    /// any signal: an open can block).
    pub fn build(
        config: VmConfig,
        kvm_path: &str,
        metrics_file: Option<File>,
    ) -> Result<Vm, VmError> {
        build::build(config, kvm_path, metrics_file)
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Where stop requests (guest exits, faults, failed threads) arrive; the VM's owner
    /// waits on its event.
    pub fn stop_requests(&self) -> &Arc<StopRequests> {
        &self.stop
    }

    /// Where the guest's snapshot requests arrive; the VM's owner waits on its event.
    pub fn snapshot_requests(&self) -> &Arc<SnapshotRequests> {
        &self.snapshot_requests
    }

    /// The guest's console output, for the owner to drain.
    pub fn console(&self) -> &Arc<ConsoleOutput> {
        &self.console
    }

    /// Held while the VM is paused: the owner feeds the UART no input meanwhile.
    pub fn input_gate(&self) -> &Arc<InputGate> {
        &self.input_gate
    }

    /// The UART, for the owner to feed input to.
    pub fn serial(&self) -> &Arc<Mutex<SerialConsole>> {
        &self.serial
    }

    pub fn vcpu_metrics(&self) -> &[Arc<VcpuMetrics>] {
        &self.vcpu_metrics
    }

    pub fn pager(&self) -> Option<&Arc<Pager>> {
        self.pager.as_ref()
    }

    /// Registers one more port I/O device (before `start`).
    pub fn register_pio_device(
        &mut self,
        range: vm_device::bus::PioRange,
        device: Arc<dyn vm_device::DevicePio + Send + Sync>,
    ) -> Result<(), VmError> {
        use vm_device::device_manager::PioManager;
        let io = Arc::get_mut(&mut self.io).ok_or(VmError::BadState {
            action: "add a device to",
            state: self.state,
        })?;
        io.register_pio(range, device)
            .map_err(|e| VmError::Vmm(format!("registering a device: {e}")))
    }

    /// Starts the vCPU threads (and the metrics writer).
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Built {
            return Err(VmError::BadState {
                action: "start",
                state: self.state,
            });
        }
        if let (Some(file), Some(config)) = (self.metrics_file.take(), &self.config.metrics) {
            let sample = run::metrics_sampler(
                self.vcpu_metrics.clone(),
                self.pager.clone(),
                self.trace.clone(),
                self.console.clone(),
            );
            self.metrics_writer = Some(
                MetricsWriter::start(file, config.interval, sample, self.stop.failure_report())
                    .map_err(|source| VmError::Metrics {
                        path: config.path.display().to_string(),
                        source,
                    })?,
            );
        }
        let context = VcpuContext {
            io: self.io.clone(),
            mem: self.memory.clone(),
            stop: self.stop.clone(),
            pager: self.pager.clone(),
            snapshot_requests: self
                .config
                .snapshot_on_request
                .is_some()
                .then(|| self.snapshot_requests.clone()),
        };
        let vcpus = std::mem::take(&mut self.unstarted);
        self.vcpu_threads =
            Some(VcpuThreads::start(vcpus, &context, &self.vcpu_metrics).map_err(VmError::Thread)?);
        self.input_gate.release();
        self.state = VmState::Running;
        Ok(())
    }

    /// Every vCPU out of KVM_RUN and parked (its pending I/O completed, kvmclock told), then
    /// the pager held: no page is copied and none evicted until `resume`.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Running {
            return Err(VmError::BadState {
                action: "pause",
                state: self.state,
            });
        }
        let threads = self
            .vcpu_threads
            .as_ref()
            .expect("running VM has vCPU threads");
        if !threads.pause(Instant::now() + STOP_BUDGET) {
            threads.resume();
            return Err(VmError::PauseTimeout(STOP_BUDGET));
        }
        if let Some(pager) = &self.pager {
            pager.pause();
        }
        self.input_gate.hold();
        self.state = VmState::Paused;
        Ok(())
    }

    /// Continues a paused VM exactly where it stopped: fetches that fell due meanwhile
    /// complete first.
    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::BadState {
                action: "resume",
                state: self.state,
            });
        }
        if let Some(pager) = &self.pager {
            pager.resume();
        }
        if let Some(threads) = &self.vcpu_threads {
            threads.resume();
        }
        self.input_gate.release();
        self.state = VmState::Running;
        Ok(())
    }

    /// Stops the VM from any state (see the module docs for the order); idempotent. After it,
    /// the pager's and the trace's final words are in `pager_summary` and `trace_summary`.
    pub fn shutdown(&mut self) -> Result<(), VmError> {
        if self.state == VmState::Stopped {
            return Ok(());
        }
        self.state = VmState::Stopped;
        self.stop.request(StopReason::Owner);
        let deadline = Instant::now() + STOP_BUDGET;
        if let Some(pager) = &self.pager {
            pager.release_all();
        }
        let stuck = self
            .vcpu_threads
            .take()
            .map(|mut threads| threads.stop(deadline))
            .unwrap_or_default();
        self.unstarted.clear();
        if let Some(mut recorder) = self.working_set.take() {
            recorder.finish();
        }
        if let Some(pager) = &self.pager {
            pager.stop();
            self.pager_summary = Some(pager.stats().summary());
        }
        let metrics = self.metrics_writer.take().map(MetricsWriter::finish);
        if let Some(trace) = self.trace.take().and_then(Arc::into_inner) {
            self.trace_summary = Some(trace.finish().json());
        }
        if !stuck.is_empty() {
            return Err(VmError::StopTimeout(stuck.join(", ")));
        }
        match metrics {
            Some(Err(e)) => Err(VmError::Vmm(format!("writing metrics: {e}"))),
            _ => Ok(()),
        }
    }

    pub fn pager_summary(&self) -> Option<&PagerSummary> {
        self.pager_summary.as_ref()
    }

    pub fn trace_summary(&self) -> Option<&serde_json::Value> {
        self.trace_summary.as_ref()
    }

    /// How the VM ended (or why it is stopping), from the first stop request.
    pub fn outcome(&self) -> Result<VmOutcome, VmError> {
        match self.stop.reason() {
            Some(StopReason::Guest(devices::GuestStop::Reset)) => Ok(VmOutcome::GuestReset),
            Some(StopReason::Guest(devices::GuestStop::ExitCode(code))) => {
                Ok(VmOutcome::GuestExit(code))
            }
            Some(StopReason::Signal(sig)) => Ok(VmOutcome::Signal(sig)),
            Some(StopReason::Owner) => Ok(VmOutcome::Stopped),
            Some(StopReason::Fault(fault)) => Err(VmError::Fault(fault)),
            Some(StopReason::Vmm(message)) => Err(VmError::Vmm(message)),
            None => Err(VmError::Vmm("the VM stopped without a reason".into())),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("stopping the VM: {e}");
        }
    }
}

//! What `apfvm run` does with a VM: stop signals through a signalfd, the guest's console on
//! the terminal, the control API's calls (`--api-socket`), and the main thread's event loop
//! until the VM stops; then the VM's teardown and the final lines on stderr, none of which
//! may wait on a stalled terminal or pipe past the stop budget.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use super::api::AwaitLoad;
use super::{
    STOP_BUDGET, SnapshotRequests, StopReason, StopRequests, Vm, VmError, VmOutcome, VmState,
};
use crate::api::{ApiServer, ApiShared, ApiSocket};
use crate::config::{AfterSnapshot, KernelImage, Settings, VmConfig};
use crate::console::{self, ConsoleDrain, ConsoleOutput, RawTerminal, SerialInput};
use crate::kvm_trace::KvmTrace;
use crate::metrics::{self, VcpuMetrics};
use crate::pager::Pager;
use crate::seccomp::{self, ThreadKind};

/// How the pager's final summary line on stderr starts (`apfvm: pager: {json}`). Programs
/// that read the line (tests/support's `apfvm::pager_summary`) have their own copy of it;
/// a unit test of apfvm's binary checks that the two are the same.
pub const PAGER_SUMMARY: &str = "apfvm: pager: ";

/// How the line about a snapshot taken (the guest asked for it, or the control API did)
/// starts (`apfvm: snapshot: {json}`, the fields of `snapshot::SnapshotInfo`); tests/support
/// has its own copy, checked like `PAGER_SUMMARY`'s.
pub const SNAPSHOT_DONE: &str = "apfvm: snapshot: ";

/// How the line about a restored VM starts (`apfvm: restored: {json}`, `RestoredInfo`), printed
/// once its vCPUs run; tests/support has its own copy.
pub const RESTORED: &str = "apfvm: restored: ";

/// What a restore took: from `run` being called (or, on `run --api-socket` without a
/// kernel, from the API request that made the loaded VM run) to the vCPUs running (the
/// guest's next instruction).
#[derive(serde::Serialize)]
struct RestoredInfo<'a> {
    id: &'a str,
    millis: f64,
}

/// Builds the VM described by `config`, runs it until it stops, and reports how it ended.
/// With `config.api_socket`, the control API is served meanwhile.
pub fn run(config: VmConfig, kvm_path: &str) -> Result<VmOutcome, VmError> {
    run_from(Start::Boot(Box::new(config)), kvm_path)
}

/// `apfvm run --api-socket PATH` without a kernel: serves the control API and waits for
/// `PUT /snapshot/load`, restores that snapshot with `settings` (checked against it as
/// `apfvm restore` does), and runs it as `run` does, once it is resumed.
pub fn run_awaiting_snapshot(settings: Settings, kvm_path: &str) -> Result<VmOutcome, VmError> {
    run_from(Start::AwaitLoad(Box::new(settings)), kvm_path)
}

/// Where a run starts from.
enum Start {
    Boot(Box<VmConfig>),
    AwaitLoad(Box<Settings>),
}

fn run_from(start: Start, kvm_path: &str) -> Result<VmOutcome, VmError> {
    let called = Instant::now();
    let (metrics, api_socket, confine) = match &start {
        Start::Boot(config) => (
            config.metrics.clone(),
            config.api_socket.clone(),
            config.seccomp,
        ),
        Start::AwaitLoad(settings) => {
            let metrics = settings.check_for_restore()?;
            let Some(path) = settings.api_socket.clone() else {
                return Err(crate::config::ConfigError::NoKernel.into());
            };
            (metrics, Some(path), !settings.no_seccomp)
        }
    };
    // Opened before any signal is masked: opening a file can block (a FIFO is refused, but
    // the check and the open are not one step).
    let metrics_file = match &metrics {
        Some(m) => {
            Some(
                metrics::open_metrics_file(&m.path).map_err(|source| VmError::Metrics {
                    path: m.path.display().to_string(),
                    source,
                })?,
            )
        }
        None => None,
    };
    // The API socket first: a path that exists is refused before anything else is done.
    let api_socket = api_socket.as_deref().map(ApiSocket::bind).transpose()?;
    seccomp::enable(confine).map_err(|e| VmError::Vmm(e.to_string()))?;
    // Stop signals are blocked before any thread exists (threads inherit the mask), so they
    // always reach the signalfd instead of killing the process from some helper thread.
    let signals = SignalListener::new()?;
    let signal_state = signals.state.clone();
    let _mask = SignalMaskGuard;
    let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| VmError::Events(format!("{e:?}")))?;
    events.add_subscriber(Box::new(signals));
    if let Some(e) = signal_state.unwatched.get() {
        return Err(VmError::Events(e.clone()));
    }
    let mut api = api_socket.map(ApiServer::start).transpose()?;
    if let Some(api) = &api {
        events.add_subscriber(Box::new(ApiListener(api.shared().clone())));
        if let Some(failure) = api.shared().failure() {
            return Err(VmError::Vmm(failure));
        }
    }
    // What the restore time is measured from: `run` being called, or the API request that
    // made a loaded VM run.
    let mut started_by = called;
    let mut vm = match start {
        Start::Boot(config) => {
            let mut vm = Vm::build(*config, kvm_path, metrics_file)?;
            signal_state.stop.set(vm.stop_requests().clone()).ok();
            vm.start()?;
            vm
        }
        Start::AwaitLoad(settings) => {
            let api = api.as_ref().expect("an API socket was bound");
            let waiting = AwaitLoad {
                settings: &settings,
                kvm_path,
                metrics_file,
                loaded: None,
            };
            match await_start(&mut events, &signal_state, api, waiting)? {
                Ok((vm, asked)) => {
                    signal_state.stop.set(vm.stop_requests().clone()).ok();
                    started_by = asked;
                    vm
                }
                Err(signal) => return Ok(VmOutcome::Signal(signal)),
            }
        }
    };
    if let KernelImage::Snapshot(snapshot) = &vm.config().kernel {
        let info = RestoredInfo {
            id: &snapshot.state.id,
            millis: started_by.elapsed().as_secs_f64() * 1e3,
        };
        let json = serde_json::to_string(&info).expect("restore info serializes");
        console::stderr().write_until(
            format!("{RESTORED}{json}\n").as_bytes(),
            Instant::now() + STOP_BUDGET,
        );
    }
    // From here on the main thread only runs the event loop and tears the VM down.
    let loop_result = seccomp::confine(ThreadKind::Main)
        .map_err(|e| VmError::Vmm(e.to_string()))
        .and_then(|()| run_event_loop(&mut vm, &mut events, api.as_ref()));
    if let Err(e) = &loop_result {
        vm.stop_requests().request(StopReason::Vmm(e.to_string()));
    }
    // No request is served once the VM stops; the socket goes away.
    if let Some(api) = &mut api {
        api.stop();
    }
    drop(api);
    let stopped = vm.shutdown();
    let deadline = Instant::now() + STOP_BUDGET;
    vm.console().flush_until(console::stdout(), deadline);
    let stderr = console::stderr();
    if let Some(summary) = vm.pager_summary() {
        let json = serde_json::to_string(summary).expect("summary serializes");
        stderr.write_until(format!("{PAGER_SUMMARY}{json}\n").as_bytes(), deadline);
    }
    if let Some(trace) = vm.trace_summary() {
        stderr.write_until(format!("apfvm: kvm trace: {trace}\n").as_bytes(), deadline);
    }
    let dropped = vm.console().dropped();
    if dropped > 0 {
        let line = format!(
            "apfvm: {dropped} bytes of guest console output dropped (stdout did not take them)\n"
        );
        stderr.write_until(line.as_bytes(), deadline);
    }
    loop_result?;
    let outcome = vm.outcome()?;
    stopped?;
    Ok(outcome)
}

/// Serves the control API until a VM has been loaded and started: the started VM and when
/// the request that started it came, or the stop signal that came first.
fn await_start(
    events: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    signals: &SignalState,
    api: &ApiServer,
    mut waiting: AwaitLoad<'_>,
) -> Result<Result<(Vm, Instant), i32>, VmError> {
    loop {
        while let Some(call) = api.shared().next_call() {
            let asked = Instant::now();
            if let Some(vm) = waiting.serve(call)? {
                // Calls still queued are served by the event loop, first thing.
                return Ok(Ok((vm, asked)));
            }
        }
        events
            .run()
            .map_err(|e| VmError::Events(format!("event loop: {e:?}")))?;
        if let Some(signal) = signals.early() {
            log::info!("received signal {signal} before a VM ran, stopping");
            return Ok(Err(signal));
        }
        if let Some(failure) = api.shared().failure() {
            return Err(VmError::Vmm(failure));
        }
    }
}

/// Writes the line about a snapshot taken (`apfvm: snapshot: {json}`) on stderr.
pub(super) fn report_snapshot(info: &crate::snapshot::SnapshotInfo) {
    let json = serde_json::to_string(info).expect("snapshot info serializes");
    console::stderr().write_until(
        format!("{SNAPSHOT_DONE}{json}\n").as_bytes(),
        Instant::now() + STOP_BUDGET,
    );
}

/// One metrics line: every vCPU, the pager, KVM's fault classes, the console.
pub(super) fn metrics_sampler(
    vcpus: Vec<Arc<VcpuMetrics>>,
    pager: Option<Arc<Pager>>,
    trace: Option<Arc<KvmTrace>>,
    console: Arc<ConsoleOutput>,
) -> crate::metrics::Sampler {
    Box::new(move || {
        let counts = trace.as_ref().map(|t| t.counts());
        let sample = MetricsSample {
            vcpus: vcpus
                .iter()
                .enumerate()
                .map(|(i, m)| m.line(i, counts.as_ref().and_then(|c| c.vcpu(i))))
                .collect(),
            pager: pager.as_ref().map(|p| p.stats().summary()),
            kvm_trace: counts.map(|c| c.json()),
            console_dropped_bytes: console.dropped(),
        };
        serde_json::to_value(sample).expect("metrics serialize")
    })
}

/// What a metrics line holds besides its type and time (fields: docs/metrics.md).
#[derive(serde::Serialize)]
struct MetricsSample {
    vcpus: Vec<crate::metrics::VcpuLine>,
    pager: Option<crate::pager::PagerSummary>,
    kvm_trace: Option<serde_json::Value>,
    console_dropped_bytes: u64,
}

fn run_event_loop(
    vm: &mut Vm,
    events: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    api: Option<&ApiServer>,
) -> Result<(), VmError> {
    let stop = vm.stop_requests().clone();
    events.add_subscriber(Box::new(StopListener(stop.clone())));
    events.add_subscriber(Box::new(SnapshotListener(vm.snapshot_requests().clone())));
    events.add_subscriber(Box::new(ConsoleDrain::new(vm.console().clone())));
    let _raw = if console::stdin_is_pollable() {
        events.add_subscriber(Box::new(SerialInput::new(
            vm.serial().clone(),
            vm.input_gate().clone(),
        )));
        Some(RawTerminal::enter())
    } else {
        None
    };
    while !stop.is_requested() {
        // First the calls that came meanwhile (or before the VM started).
        if let Some(api) = api {
            if let Some(failure) = api.shared().failure() {
                stop.request(StopReason::Vmm(failure));
                break;
            }
            while let Some(call) = api.shared().next_call() {
                call.reply.answer(super::api::serve(vm, call.request));
            }
        }
        events
            .run()
            .map_err(|e| VmError::Events(format!("event loop: {e:?}")))?;
        if vm.snapshot_requests().take() && !stop.is_requested() {
            snapshot_on_request(vm)?;
        }
    }
    Ok(())
}

/// A guest asked for a snapshot: pause (unless the API paused it already), save into
/// `--snapshot-on-request`'s directory, then resume or stop as configured (a VM the API
/// paused stays paused). The guest's console input waits meanwhile (this loop does not read
/// it). A failed snapshot is reported and the VM resumes: nothing of it is lost.
fn snapshot_on_request(vm: &mut Vm) -> Result<(), VmError> {
    let Some(target) = vm.config().snapshot_on_request.clone() else {
        log::warn!("the guest asked for a snapshot, but --snapshot-on-request is not set");
        return Ok(());
    };
    let running = vm.state() == VmState::Running;
    if running {
        vm.pause()?;
    }
    match vm.snapshot(&target.dir) {
        Ok(info) => {
            report_snapshot(&info);
            if target.after == AfterSnapshot::Stop {
                vm.stop_requests().request(StopReason::Owner);
                return Ok(());
            }
        }
        Err(e) => {
            console::stderr().write_until(
                format!("apfvm: error: snapshot failed: {e}\n").as_bytes(),
                Instant::now() + STOP_BUDGET,
            );
        }
    }
    if running { vm.resume() } else { Ok(()) }
}

/// Wakes the event loop when the control API has a call for it (the loop takes the calls).
struct ApiListener(Arc<ApiShared>);

impl MutEventSubscriber for ApiListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.event, EventSet::IN)) {
            // Seen by the loops, which then stop: an API nobody answers would hang clients.
            self.0.fail(format!("cannot watch the control API: {e:?}"));
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.event.read();
    }
}

/// Wakes the event loop when the guest asks for a snapshot (the loop takes the request).
struct SnapshotListener(Arc<SnapshotRequests>);

impl MutEventSubscriber for SnapshotListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.event, EventSet::IN)) {
            log::warn!("cannot watch snapshot requests: {e:?}");
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {}
}

/// Wakes the event loop when a stop is requested.
struct StopListener(Arc<StopRequests>);

impl MutEventSubscriber for StopListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.event, EventSet::IN)) {
            self.0
                .request(StopReason::Vmm(format!("cannot watch stop event: {e:?}")));
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.event.read();
    }
}

/// SIGINT/SIGTERM/SIGHUP through a signalfd: the VM stops cleanly instead of the process
/// dying with the terminal left in raw mode.
struct SignalListener {
    fd: OwnedFd,
    state: Arc<SignalState>,
}

/// Where a stop signal goes: the VM's stop requests once it exists, before that `early`.
#[derive(Default)]
struct SignalState {
    stop: std::sync::OnceLock<Arc<StopRequests>>,
    early: AtomicI32,
    /// Why the signalfd could not be watched (the event manager's `init` cannot fail).
    unwatched: std::sync::OnceLock<String>,
}

impl SignalState {
    /// A stop signal that came before the VM existed.
    fn early(&self) -> Option<i32> {
        Some(self.early.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

impl SignalListener {
    /// Blocks the stop signals on this thread (threads spawned later inherit the mask) and
    /// opens a signalfd for them.
    fn new() -> Result<SignalListener, VmError> {
        let set = vmm_sys_util::signal::create_sigset(&STOP_SIGNALS)
            .map_err(|e| VmError::Events(format!("signal set: {e}")))?;
        // SAFETY: `set` is a valid initialized sigset; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(VmError::Events(format!("blocking signals: errno {rc}")));
        }
        // SAFETY: `set` is valid; -1 asks for a new fd; the result is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(VmError::Events(format!(
                "signalfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalListener {
            fd,
            state: Arc::default(),
        })
    }
}

impl MutEventSubscriber for SignalListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            let _ = self
                .state
                .unwatched
                .set(format!("cannot watch signals: {e:?}"));
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        // SAFETY: an all-zero signalfd_siginfo is valid; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of_val(&info);
        // SAFETY: reads into `info`, which is `size` bytes long.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n != size as isize {
            return;
        }
        let signal = info.ssi_signo as i32;
        match self.state.stop.get() {
            Some(stop) => {
                log::info!("received signal {signal}, stopping the VM");
                stop.request(StopReason::Signal(signal));
            }
            None => {
                let _ = self.state.early.compare_exchange(
                    0,
                    signal,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
        }
    }
}

/// Restores the signal mask when the VM is done (the library may be used again).
struct SignalMaskGuard;

impl Drop for SignalMaskGuard {
    fn drop(&mut self) {
        if let Ok(set) = vmm_sys_util::signal::create_sigset(&STOP_SIGNALS) {
            // SAFETY: `set` is a valid sigset.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
        }
    }
}

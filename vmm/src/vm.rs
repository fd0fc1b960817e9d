//! Building a VM from a `VmConfig` and running it to its end.
//!
//! Order: KVM and the VM (irqchip, PIT) → guest RAM → kernel, initrd, command line and boot
//! structures → devices on the I/O bus → vCPUs (CPUID, MSRs, boot registers) → one thread per
//! vCPU → the main thread's event loop (console input, signals, stop requests) → stop all
//! vCPUs and report how the VM ended.

use std::fs::File;
use std::io::Cursor;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::{DebugExit, EvictionRequests, GuestStop, I8042, PagerControl, SerialConsole};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::boot::{self, InitrdPlacement};
use crate::arch::x86_64::cpuid::{self, CpuidConfig};
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, KVM_TSS_ADDRESS};
use crate::arch::x86_64::loader::{self, LoadedKernel, LoaderError};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::config::{KernelImage, VmConfig};
use crate::console::{RawTerminal, SerialInput, stdin_is_pollable};
use crate::kvm_trace::{KvmTrace, TraceError};
use crate::memory::{self, MemoryError};
use crate::metrics::{MetricsWriter, VcpuMetrics};
use crate::pager::{PageStore, Pager, PagerError, StoreError};
use crate::seccomp::{self, ThreadKind};
use crate::vcpu::{self, Vcpu, VcpuError, VcpuFault};
use crate::vm_stop::{StopReason, VmStop};

/// How a VM ended when nothing went wrong in apfvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest rebooted or powered off.
    GuestReset,
    /// A test guest wrote this code to the debug-exit port.
    GuestExit(u8),
    /// apfvm was asked to stop by this signal.
    Signal(i32),
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
    #[error("{0}")]
    Fault(VcpuFault),
    #[error("{0}")]
    Vmm(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens the KVM device, telling a missing device from a permission problem.
pub fn open_kvm(path: &str) -> Result<Kvm, VmError> {
    let c_path = std::ffi::CString::new(path).map_err(|_| VmError::NoKvm {
        path: path.to_string(),
    })?;
    Kvm::new_with_path(&c_path).map_err(|source| match source.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm {
            path: path.to_string(),
        },
        libc::EACCES | libc::EPERM => VmError::KvmPermission {
            path: path.to_string(),
        },
        _ => VmError::KvmOpen {
            path: path.to_string(),
            source,
        },
    })
}

const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::ExtCpuid,
    Cap::ImmediateExit,
    Cap::Irqfd,
];

fn check_kvm(kvm: &Kvm, config: &VmConfig) -> Result<(), VmError> {
    let api = kvm.get_api_version();
    if api < 0 {
        return Err(VmError::NotKvm);
    }
    if api != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::KvmApiVersion(api));
    }
    if let Some(cap) = REQUIRED_CAPS.into_iter().find(|c| !kvm.check_extension(*c)) {
        return Err(VmError::KvmCapability(cap));
    }
    let max = kvm.get_max_vcpus();
    if usize::from(config.vcpus) > max {
        return Err(VmError::TooManyVcpus {
            asked: config.vcpus,
            max,
        });
    }
    Ok(())
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    // The PIT is part of the PC platform Linux calibrates against; the speaker port is
    // emulated as a dummy so that port 0x61 does not exit to us.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    ram_end: u64,
    image: &KernelImage,
) -> Result<LoadedKernel, LoaderError> {
    match image {
        KernelImage::File(path) => loader::load_kernel_file(mem, ram_end, path),
        KernelImage::Embedded { name, bytes } => {
            loader::load_kernel(mem, ram_end, &mut Cursor::new(*bytes), name)
        }
    }
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    kernel: &LoadedKernel,
) -> Result<Option<InitrdPlacement>, VmError> {
    let Some(path) = &config.initrd else {
        return Ok(None);
    };
    let err = |message: String| VmError::Initrd {
        path: path.display().to_string(),
        message,
    };
    let mut file = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
    let low_end = memory::low_ram_end(config.mem_size);
    let addr = boot::initrd_address(low_end, kernel.end, size, boot::initrd_max_address(kernel))
        .ok_or_else(|| {
            err(format!(
                "{size} bytes do not fit in guest RAM above the kernel (which ends at {:#x}); \
                 raise --mem",
                kernel.end
            ))
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| err(e.to_string()))?;
    Ok(Some(InitrdPlacement {
        addr: GuestAddress(addr),
        size,
    }))
}

fn load_cmdline(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<usize, VmError> {
    let cmdline = Cmdline::try_from(&config.cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| VmError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| VmError::Cmdline(e.to_string()))?;
    Ok(config.cmdline.len())
}

/// Puts the platform devices on the port bus: COM1, the i8042, the debug-exit port.
fn create_devices(
    vm: &VmFd,
    stop: &Arc<VmStop>,
    pager: Option<&Arc<Pager>>,
) -> Result<(IoManager, Arc<Mutex<SerialConsole>>), VmError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Events(e.to_string()))?;
    vm.register_irqfd(&irq, devices::serial::COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD for COM1"))?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        irq,
        Box::new(std::io::stdout()),
    )));
    let mut io = IoManager::new();
    let range = |base: u16, len: u16| PioRange::new(PioAddress(base), len).expect("valid range");
    let register = |io: &mut IoManager, r, d| {
        io.register_pio(r, d)
            .map_err(|e| VmError::Vmm(format!("registering a device: {e}")))
    };
    use devices::{debug_exit as dx, i8042 as kb, serial as com};
    register(
        &mut io,
        range(com::COM1_PORT, com::COM1_PORT_LEN),
        serial.clone(),
    )?;
    register(
        &mut io,
        range(kb::I8042_PORT, kb::I8042_PORT_LEN),
        Arc::new(Mutex::new(I8042::new(stop.clone()))),
    )?;
    register(
        &mut io,
        range(dx::DEBUG_EXIT_PORT, dx::DEBUG_EXIT_PORT_LEN),
        Arc::new(Mutex::new(DebugExit::new(stop.clone()))),
    )?;
    if let Some(pager) = pager {
        use devices::pager_control as pc;
        register(
            &mut io,
            range(pc::PAGER_CONTROL_PORT, pc::PAGER_CONTROL_PORT_LEN),
            Arc::new(Mutex::new(PagerControl::new(pager.clone()))),
        )?;
    }
    Ok((io, serial))
}

impl EvictionRequests for Pager {
    fn evict(&self, first_pfn: u64, count: u64) -> u64 {
        self.evict_range(first_pfn, count)
    }
}

/// Starts host paging of all guest RAM; pages written so far (kernel, boot data) stay
/// resident. A pager failure stops the VM with its message.
fn start_pager(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    stop: &Arc<VmStop>,
) -> Result<Option<Arc<Pager>>, VmError> {
    let Some(paging) = &config.paging else {
        return Ok(None);
    };
    let store = match &paging.memory_image {
        Some(path) => PageStore::image(path)?,
        None => PageStore::Zero,
    };
    let stop = stop.clone();
    let on_fatal = Box::new(move |message: String| {
        stop.request(StopReason::Vmm(format!("host paging failed: {message}")))
    });
    Ok(Some(Arc::new(Pager::start(
        mem,
        store,
        paging.pager.clone(),
        on_fatal,
    )?)))
}

/// One metrics line: every vCPU and, when present, the pager and KVM's fault classes.
fn metrics_sampler(
    vcpus: Vec<Arc<VcpuMetrics>>,
    pager: Option<Arc<Pager>>,
    trace: Option<Arc<KvmTrace>>,
) -> crate::metrics::Sampler {
    Box::new(move || {
        let counts = trace.as_ref().map(|t| t.counts());
        let vcpus: Vec<serde_json::Value> = vcpus
            .iter()
            .enumerate()
            .map(|(i, m)| m.json(i, counts.as_ref().and_then(|c| c.vcpu(i))))
            .collect();
        let pager = pager
            .as_ref()
            .map_or(serde_json::Value::Null, |p| p.stats().summary_json());
        let trace = counts.map_or(serde_json::Value::Null, |c| c.json());
        serde_json::json!({ "vcpus": vcpus, "pager": pager, "kvm_trace": trace })
    })
}

/// How the pager's final summary line on stderr starts (`apfvm: pager: {json}`).
pub const PAGER_SUMMARY: &str = "apfvm: pager: ";

/// The pager's summary in what apfvm wrote to stderr, parsed.
pub fn pager_summary(stderr: &str) -> Option<serde_json::Value> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(PAGER_SUMMARY))
        .and_then(|json| serde_json::from_str(json).ok())
}

/// Wakes the event loop when a stop is requested.
struct StopListener(Arc<VmStop>);

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

/// SIGINT/SIGTERM through a signalfd: the VM stops cleanly instead of the process dying with
/// the terminal left in raw mode.
struct SignalListener {
    fd: OwnedFd,
    stop: Arc<VmStop>,
}

const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

impl SignalListener {
    /// Blocks the stop signals on this thread (threads spawned later inherit the mask) and
    /// opens a signalfd for them.
    fn new(stop: Arc<VmStop>) -> Result<SignalListener, VmError> {
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
        Ok(SignalListener { fd, stop })
    }
}

impl MutEventSubscriber for SignalListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            self.stop
                .request(StopReason::Vmm(format!("cannot watch signals: {e:?}")));
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
        if n == size as isize {
            log::info!("received signal {}, stopping the VM", info.ssi_signo);
            self.stop.request(StopReason::Signal(info.ssi_signo as i32));
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

/// How long stopping vCPUs may take before apfvm gives up waiting for them.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Kicks every vCPU thread until it has left its run loop, then joins it.
fn stop_vcpus(handles: Vec<JoinHandle<()>>) -> Result<(), VmError> {
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    for handle in handles {
        while !handle.is_finished() {
            if Instant::now() > deadline {
                return Err(VmError::Vmm(format!(
                    "a vCPU thread ({}) did not stop within {VCPU_STOP_TIMEOUT:?}",
                    handle.thread().name().unwrap_or("?")
                )));
            }
            // Repeated kicks cover a thread that was between its stop check and KVM_RUN.
            let _ = handle.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        if handle.join().is_err() {
            return Err(VmError::Vmm("a vCPU thread panicked".into()));
        }
    }
    Ok(())
}

/// Loads the kernel, initrd and command line and writes the boot structures (memory map,
/// boot params or PVH start info, MP table).
fn load_guest(mem: &GuestMemoryMmap, config: &VmConfig) -> Result<LoadedKernel, VmError> {
    let kernel = load_kernel(mem, memory::low_ram_end(config.mem_size), &config.kernel)?;
    log::info!(
        "kernel {}: {:?}, entry {:#x} ({:?}), ends at {:#x}",
        config.kernel.describe(),
        kernel.format,
        kernel.entry.0,
        kernel.mode,
        kernel.end
    );
    let initrd = load_initrd(mem, config, &kernel)?;
    let cmdline_len = load_cmdline(mem, config)?;
    let e820 = boot::e820_map(&memory::ram_ranges(config.mem_size));
    boot::write_boot_info(mem, &kernel, &e820, cmdline_len, initrd)?;
    mptable::setup_mptable(mem, config.vcpus)?;
    Ok(kernel)
}

/// Creates and configures every vCPU; vCPU 0 starts at the kernel's entry, the others wait
/// for INIT/SIPI.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    kernel: &LoadedKernel,
) -> Result<Vec<Vcpu>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let cpuid_config = CpuidConfig {
        vcpu_count: config.vcpus,
        apf: config.apf,
        feature_edits: config.cpu_features.clone(),
    };
    let mut vcpus = Vec::new();
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(vm, index)?;
        vcpu.configure(&cpuid::vcpu_cpuid(&supported, &cpuid_config, index))?;
        if index == 0 {
            vcpu.configure_boot(mem, kernel)?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Starts one thread per vCPU running its KVM_RUN loop.
fn spawn_vcpus(
    vcpus: Vec<Vcpu>,
    io: &Arc<IoManager>,
    mem: &GuestMemoryMmap,
    stop: &Arc<VmStop>,
    pager: Option<&Arc<Pager>>,
    metrics: &[Arc<VcpuMetrics>],
) -> Result<Vec<JoinHandle<()>>, VmError> {
    let mut handles = Vec::new();
    for vcpu in vcpus {
        let (io, mem, stop) = (io.clone(), mem.clone(), stop.clone());
        let pager = pager.cloned();
        let metrics = metrics[usize::from(vcpu.index)].clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index))
            .spawn(move || {
                if let Err(e) = seccomp::confine(ThreadKind::Vcpu) {
                    stop.request(StopReason::Vmm(e.to_string()));
                    return;
                }
                if let Some(pager) = pager {
                    // Faults raised by this thread stall the vCPU itself (guest kernel mode).
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    pager.add_sync_thread(tid, metrics.sync_faults.clone());
                }
                vcpu.run_loop(io, mem, stop, metrics)
            })
            .map_err(|e| VmError::Vmm(format!("spawning a vCPU thread: {e}")))?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Starts `--metrics-file` output.
fn start_metrics(
    config: &VmConfig,
    vcpus: &[Arc<VcpuMetrics>],
    pager: Option<&Arc<Pager>>,
    trace: Option<&Arc<KvmTrace>>,
) -> Result<Option<MetricsWriter>, VmError> {
    let Some(m) = &config.metrics else {
        return Ok(None);
    };
    let sample = metrics_sampler(vcpus.to_vec(), pager.cloned(), trace.cloned());
    MetricsWriter::start(&m.path, m.interval, sample)
        .map(Some)
        .map_err(|e| VmError::Vmm(format!("cannot write metrics to {}: {e}", m.path.display())))
}

/// Builds the VM described by `config`, runs it until it stops, and reports how it ended.
pub fn run(config: &VmConfig, kvm_path: &str) -> Result<VmOutcome, VmError> {
    // Stop signals are blocked before any thread exists (threads inherit the mask), so they
    // always reach the signalfd instead of killing the process from some helper thread.
    let stop = Arc::new(VmStop::new().map_err(|e| VmError::Events(e.to_string()))?);
    let signals = SignalListener::new(stop.clone())?;
    let _mask = SignalMaskGuard;
    seccomp::enable(config.seccomp).map_err(|e| VmError::Vmm(e.to_string()))?;
    let kvm = open_kvm(kvm_path)?;
    check_kvm(&kvm, config)?;
    let vm = create_vm(&kvm)?;
    let mem = memory::create_guest_memory(config.mem_size, config.memory_backend)?;
    memory::register_with_kvm(&vm, &mem)?;
    let kernel = load_guest(&mem, config)?;
    let vcpus = create_vcpus(&kvm, &vm, &mem, config, &kernel)?;
    // /dev/kvm itself is not needed once the VM and its vCPUs exist.
    drop(kvm);

    // Paging starts once the VMM has written all it writes into guest memory.
    let pager = start_pager(&mem, config, &stop)?;
    let (io, serial) = create_devices(&vm, &stop, pager.as_ref())?;
    let io = Arc::new(io);
    vcpu::register_kick_handler()
        .map_err(|e| VmError::Events(format!("installing the vCPU kick handler: {e}")))?;
    let vcpu_metrics: Vec<Arc<VcpuMetrics>> = vcpus
        .iter()
        .map(|_| Arc::new(VcpuMetrics::default()))
        .collect();
    let trace = if config.kvm_trace {
        Some(Arc::new(KvmTrace::start()?))
    } else {
        None
    };
    let metrics_writer = start_metrics(config, &vcpu_metrics, pager.as_ref(), trace.as_ref())?;
    let handles = spawn_vcpus(vcpus, &io, &mem, &stop, pager.as_ref(), &vcpu_metrics)?;

    // From here on the main thread only runs the event loop and tears the VM down.
    let loop_result = seccomp::confine(ThreadKind::Main)
        .map_err(|e| VmError::Vmm(e.to_string()))
        .and_then(|()| run_event_loop(&stop, serial, signals));
    if let Err(e) = &loop_result {
        stop.request(StopReason::Vmm(e.to_string()));
    }
    stop_vcpus(handles)?;
    if let Some(pager) = &pager {
        pager.stop();
        eprintln!("{PAGER_SUMMARY}{}", pager.stats().summary_json());
    }
    // The userfaultfd must be closed before the VM is destroyed: KVM's teardown waits for
    // its async PF kworkers, and one may still wait on a page (see `Pager::stop`). The last
    // reference goes with the metrics writer's sampler, just below.
    drop(io);
    drop(pager);
    if let Some(writer) = metrics_writer {
        writer
            .finish()
            .map_err(|e| VmError::Vmm(format!("writing metrics: {e}")))?;
    }
    if let Some(trace) = trace.and_then(Arc::into_inner) {
        eprintln!("apfvm: kvm trace: {}", trace.finish().json());
    }
    loop_result?;
    // `vm` and `mem` outlive every vCPU thread: both are dropped only here.
    drop(vm);

    match stop.reason() {
        Some(StopReason::Guest(GuestStop::Reset)) => Ok(VmOutcome::GuestReset),
        Some(StopReason::Guest(GuestStop::ExitCode(code))) => Ok(VmOutcome::GuestExit(code)),
        Some(StopReason::Signal(sig)) => Ok(VmOutcome::Signal(sig)),
        Some(StopReason::Fault(fault)) => Err(VmError::Fault(fault)),
        Some(StopReason::Vmm(message)) => Err(VmError::Vmm(message)),
        None => Err(VmError::Vmm("the VM stopped without a reason".into())),
    }
}

fn run_event_loop(
    stop: &Arc<VmStop>,
    serial: Arc<Mutex<SerialConsole>>,
    signals: SignalListener,
) -> Result<(), VmError> {
    let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| VmError::Events(format!("{e:?}")))?;
    events.add_subscriber(Box::new(StopListener(stop.clone())));
    events.add_subscriber(Box::new(signals));
    let _raw = if stdin_is_pollable() {
        events.add_subscriber(Box::new(SerialInput::new(serial)));
        Some(RawTerminal::enter())
    } else {
        None
    };
    while !stop.is_requested() {
        events
            .run()
            .map_err(|e| VmError::Events(format!("event loop: {e:?}")))?;
    }
    Ok(())
}

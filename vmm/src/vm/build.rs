//! Building a VM from a `VmConfig`, in this order: KVM and the VM (irqchip, PIT) → guest
//! RAM → kernel, initrd, command line and boot structures → the pager (once the VMM has
//! written all it writes into guest memory) → devices on the I/O bus → vCPUs (CPUID, MSRs,
//! boot registers for vCPU 0; the others wait for INIT/SIPI).

use std::fs::File;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use devices::{DebugExit, EvictionRequests, I8042, PagerControl, SerialConsole};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::snapshot::SnapshotRequests;
use super::working_set::WorkingSetRecorder;
use super::{StopReason, StopRequests, Vm, VmError, VmState};
use crate::arch::x86_64::boot::{self, InitrdPlacement};
use crate::arch::x86_64::cpuid::{self, CpuidConfig};
use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, KVM_TSS_ADDRESS};
use crate::arch::x86_64::loader::{self, LoadedKernel, LoaderError};
use crate::arch::x86_64::mptable;
use crate::config::{KernelImage, LazyRestore, Prefetch, VmConfig};
use crate::console::{ConsoleOutput, InputGate};
use crate::kvm_trace::KvmTrace;
use crate::memory::{self, MemoryBackend};
use crate::metrics::{StallCounter, VcpuMetrics};
use crate::pager::{PAGE_SIZE, PageStore, Pager};
use crate::seccomp;
use crate::snapshot::{self, LoadedSnapshot, SnapshotError, working_set};
use crate::vcpu::Vcpu;

/// See `Vm::build`. A VM restored from a snapshot (`KernelImage::Snapshot`) is built the same
/// way up to guest RAM; then, instead of loading a kernel and setting up boot registers,
/// RAM is filled from the memory file and the in-kernel devices, the vCPUs and the UART are
/// put back as they were saved (docs/snapshot.md has the order).
pub(super) fn build(
    config: VmConfig,
    kvm_path: &str,
    metrics_file: Option<File>,
) -> Result<Vm, VmError> {
    let stop = Arc::new(StopRequests::new().map_err(|e| VmError::Events(e.to_string()))?);
    let snapshot_requests =
        Arc::new(SnapshotRequests::new().map_err(|e| VmError::Events(e.to_string()))?);
    seccomp::enable(config.seccomp).map_err(|e| VmError::Vmm(e.to_string()))?;
    crate::thread::install_panic_hook();
    let kvm = open_kvm(kvm_path)?;
    check_kvm(&kvm, &config)?;
    let msr_indices: Arc<[u32]> = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .into();
    let vm_fd = create_vm(&kvm)?;
    let memory = match (&config.kernel, config.memory_backend) {
        (KernelImage::Snapshot(snapshot), MemoryBackend::File) => {
            memory::map_file_private(config.mem_size, &snapshot.memory_path)?
        }
        _ => memory::create_guest_memory(config.mem_size, config.memory_backend)?,
    };
    memory::register_with_kvm(&vm_fd, &memory)?;
    let mut working_set = None;
    let (unstarted, serial_state, pager) = match &config.kernel {
        KernelImage::Snapshot(snapshot) => {
            // A lazy restore pages RAM in from the memory file from the start: restoring
            // the vCPUs touches guest memory (kvmclock, steal time), through KVM on this
            // thread, which the pager serves as a synchronous faulter.
            let pager = start_pager(&memory, &config, &stop)?;
            if let Some(pager) = &pager {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                pager.add_sync_thread(tid, Arc::new(StallCounter::default()));
            }
            if let (Some(pager), Some(lazy)) = (&pager, &config.lazy_restore) {
                working_set = begin_lazy_restore(pager, lazy, snapshot, &stop)?;
            }
            let filled = config.memory_backend == MemoryBackend::File || pager.is_some();
            let vcpus = restore_guest(&vm_fd, &memory, snapshot, filled)?;
            (vcpus, Some(snapshot.state.serial.clone().into()), pager)
        }
        _ => {
            let kernel = load_guest(&memory, &config)?;
            let vcpus = create_vcpus(&kvm, &vm_fd, &memory, &config, &kernel)?;
            // Paging starts once the VMM has written all it writes into guest memory.
            (vcpus, None, start_pager(&memory, &config, &stop)?)
        }
    };
    // /dev/kvm itself is not needed once the VM and its vCPUs exist.
    drop(kvm);
    let console = Arc::new(ConsoleOutput::new().map_err(|e| VmError::Events(e.to_string()))?);
    // Console input waits until the guest runs (and again whenever it is paused).
    let input_gate = Arc::new(InputGate::new().map_err(|e| VmError::Events(e.to_string()))?);
    input_gate.hold();
    let (io, serial) = create_devices(
        &vm_fd,
        &stop,
        &snapshot_requests,
        pager.as_ref(),
        &console,
        serial_state,
    )?;
    let trace = if config.kvm_trace {
        Some(Arc::new(KvmTrace::start(stop.failure_report())?))
    } else {
        None
    };
    let vcpu_metrics = (0..config.vcpus)
        .map(|_| Arc::new(VcpuMetrics::default()))
        .collect();
    Ok(Vm {
        vcpu_threads: None,
        working_set,
        unstarted,
        metrics_writer: None,
        metrics_file,
        trace,
        pager,
        io: Arc::new(io),
        serial,
        input_gate,
        console,
        vcpu_metrics,
        vm_fd,
        memory,
        stop,
        snapshot_requests,
        msr_indices,
        state: VmState::Built,
        config,
        pager_summary: None,
        trace_summary: None,
    })
}

/// Starts what a lazy restore streams in: the recorded working set or every page with data
/// (`--prefetch`), or else records this restore's first touches as the snapshot's working set.
/// A working set that cannot be used (missing, damaged, from another snapshot, pages outside
/// RAM) is a warning, and the restore is on demand (and records a new one).
fn begin_lazy_restore(
    pager: &Arc<Pager>,
    lazy: &LazyRestore,
    snapshot: &LoadedSnapshot,
    stop: &Arc<StopRequests>,
) -> Result<Option<WorkingSetRecorder>, VmError> {
    let pages = snapshot.state.memory.size / PAGE_SIZE as u64;
    let prefetch = match lazy.prefetch {
        Prefetch::None => None,
        Prefetch::All => Some(pager.store_data_pages()),
        Prefetch::WorkingSet => {
            match working_set::read(&lazy.working_set, &snapshot.state.id, pages) {
                Ok(set) => Some(set.pages),
                Err(e) => {
                    log::warn!("{e}; restoring on demand");
                    None
                }
            }
        }
    };
    if let Some(pages) = prefetch {
        pager.start_prefetch(pages)?;
        return Ok(None);
    }
    pager.record_first_touches();
    let recorder = WorkingSetRecorder::start(
        pager.clone(),
        lazy.working_set.clone(),
        snapshot.state.id.clone(),
        lazy.record_end,
        std::time::Instant::now(),
        stop.failure_report(),
    )
    .map_err(VmError::Thread)?;
    Ok(Some(recorder))
}

/// Guest RAM from the memory file (read in now, unless RAM maps the file or the pager serves
/// it), then the VM-wide in-kernel state, then each vCPU (created here; CPUID and everything
/// else come from the snapshot).
fn restore_guest(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    snapshot: &LoadedSnapshot,
    ram_is_served: bool,
) -> Result<Vec<Vcpu>, VmError> {
    if !ram_is_served {
        let path = &snapshot.memory_path;
        let read_err = |source| {
            VmError::Restore(SnapshotError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let file = File::open(path).map_err(read_err)?;
        snapshot::memory::fill(&file, mem).map_err(read_err)?;
    }
    super::snapshot::restore_platform(vm, &snapshot.state.platform)?;
    let mut vcpus = Vec::new();
    for saved in &snapshot.state.vcpus {
        let vcpu = Vcpu::new(vm, saved.index)?;
        vcpu.restore_state(saved)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
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
        KernelImage::Snapshot(_) => unreachable!("a restored VM loads no kernel"),
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
    stop: &Arc<StopRequests>,
    snapshot_requests: &Arc<SnapshotRequests>,
    pager: Option<&Arc<Pager>>,
    console: &Arc<ConsoleOutput>,
    serial_state: Option<vm_superio::serial::SerialState>,
) -> Result<(IoManager, Arc<Mutex<SerialConsole>>), VmError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Events(e.to_string()))?;
    vm.register_irqfd(&irq, devices::serial::COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD for COM1"))?;
    let uart = match serial_state {
        Some(state) => SerialConsole::from_state(irq, console.writer(), &state)
            .map_err(|e| VmError::Vmm(format!("restoring the UART: {e}")))?,
        None => SerialConsole::new(irq, console.writer()),
    };
    let serial = Arc::new(Mutex::new(uart));
    let mut io = IoManager::new();
    let range = |base: u16, len: u16| PioRange::new(PioAddress(base), len).expect("valid range");
    let register = |io: &mut IoManager, r, d| {
        io.register_pio(r, d)
            .map_err(|e| VmError::Vmm(format!("registering a device: {e}")))
    };
    use devices::{debug_exit as dx, i8042 as kb, serial as com, snapshot_request as sr};
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
    register(
        &mut io,
        range(sr::SNAPSHOT_REQUEST_PORT, sr::SNAPSHOT_REQUEST_PORT_LEN),
        Arc::new(Mutex::new(devices::SnapshotRequest::new(
            snapshot_requests.clone(),
        ))),
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
    stop: &Arc<StopRequests>,
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

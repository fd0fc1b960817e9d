//! One vCPU: its setup (CPUID, MSRs, local APIC, boot registers for the boot vCPU) and one
//! step of its KVM_RUN loop, which dispatches exits to the I/O bus and reports what happened
//! (`VcpuAction`); the VM, which owns the vCPU's thread, decides what to do about it.
//!
//! Kicking: the VM sends the vCPU thread `SIGRTMIN`. The signal handler sets
//! `kvm_run.immediate_exit` on the thread it interrupts, so the vCPU leaves KVM_RUN (or does
//! not enter it) even if the signal lands between the owner's check and the ioctl.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_mp_state,
    kvm_msr_entry, kvm_run, kvm_xcrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{loader::LoadedKernel, msrs, regs};
use crate::metrics::VcpuMetrics;
use crate::snapshot::state::{Msr, VcpuState, msr_restore_order};

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// The `kvm_run` of the vCPU running on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: `run` points at this thread's mapped kvm_run (set in `run_loop`, cleared
            // before the mapping can go away); a byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("setting up vCPU {index}: {what}: {source}")]
    Setup {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("setting up vCPU {index}: KVM accepted {set} of {total} boot MSRs")]
    Msrs { index: u8, set: usize, total: usize },
    #[error("writing boot page tables and GDT: {0}")]
    BootMemory(#[from] vm_memory::GuestMemoryError),
    #[error("saving vCPU {index}: {what}: {source}")]
    Save {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restoring vCPU {index}: {what}: {source}")]
    Restore {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restoring vCPU {index}: KVM refused MSR {msr:#x} (value {value:#x})")]
    MsrRefused { index: u8, msr: u32, value: u64 },
    #[error(
        "restoring vCPU {index}: the snapshot's TSC runs at {saved} kHz, this host's at \
         {here} kHz, and KVM cannot scale it: {source}"
    )]
    TscScaling {
        index: u8,
        saved: u32,
        here: u32,
        source: kvm_ioctls::Error,
    },
}

/// What one step of the KVM_RUN loop came to.
#[derive(Debug)]
pub enum VcpuAction {
    /// An exit was handled (or KVM_RUN was interrupted): run again, unless told otherwise.
    Continue,
    /// The guest reset or shut the machine down.
    GuestReset,
    /// The guest did something this vCPU cannot continue from.
    Fault(VcpuFault),
}

/// Why a vCPU stopped the VM on its own: what the guest did, and where.
#[derive(Debug, Clone)]
pub struct VcpuFault {
    pub vcpu: u8,
    pub reason: String,
    pub rip: Option<u64>,
    pub state: String,
    pub insn_bytes: Vec<u8>,
}

impl fmt::Display for VcpuFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {} stopped the VM: {}", self.vcpu, self.reason)?;
        if let Some(rip) = self.rip {
            write!(f, " at RIP {rip:#x}")?;
        }
        if !self.insn_bytes.is_empty() {
            let hex: Vec<String> = self.insn_bytes.iter().map(|b| format!("{b:02x}")).collect();
            write!(f, "; instruction bytes: {}", hex.join(" "))?;
        } else {
            write!(f, "; instruction bytes: unavailable")?;
        }
        if !self.state.is_empty() {
            write!(f, "; {}", self.state)?;
        }
        Ok(())
    }
}

const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_apic_delivery_mode(regs: &mut [libc::c_char], offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Vcpu { index, fd })
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Setup {
            index,
            what,
            source,
        }
    }

    /// State every vCPU gets: CPUID, MSRs, LINT0 = ExtINT and LINT1 = NMI (as the MP table
    /// says), FPU reset values.
    pub fn configure(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.setup_err("KVM_SET_CPUID2"))?;
        let msrs = msrs::boot_msrs();
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.setup_err("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                set,
                total: msrs.as_slice().len(),
            });
        }
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.setup_err("KVM_GET_LAPIC"))?;
        set_apic_delivery_mode(&mut lapic.regs, LAPIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_apic_delivery_mode(&mut lapic.regs, LAPIC_LVT_LINT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.setup_err("KVM_SET_LAPIC"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.setup_err("KVM_SET_FPU"))?;
        Ok(())
    }

    /// Puts the boot vCPU at the kernel's entry point in the mode its protocol wants.
    pub fn configure_boot(
        &self,
        mem: &GuestMemoryMmap,
        kernel: &LoadedKernel,
    ) -> Result<(), VcpuError> {
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.setup_err("KVM_GET_SREGS"))?;
        let sregs = regs::setup_sregs(mem, kernel.mode, sregs)?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.setup_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::boot_regs(kernel.mode, kernel.entry.0))
            .map_err(self.setup_err("KVM_SET_REGS"))?;
        Ok(())
    }

    fn save_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Save {
            index,
            what,
            source,
        }
    }

    fn restore_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Restore {
            index,
            what,
            source,
        }
    }

    /// Everything KVM holds for this vCPU, from its own thread while it is parked (its pending
    /// I/O completed). The order is Firecracker's: the MP state first (reading it may accept
    /// pending INIT/SIPI events, changing LAPIC state), the vCPU events last (other reads can
    /// change them). `msr_indices`: KVM_GET_MSR_INDEX_LIST; an MSR KVM lists but cannot
    /// read for this vCPU is left out.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(self.save_err("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(self.save_err("KVM_GET_REGS"))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.save_err("KVM_GET_SREGS"))?;
        let xsave = self
            .fd
            .get_xsave()
            .map_err(self.save_err("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(self.save_err("KVM_GET_XCRS"))?;
        let debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(self.save_err("KVM_GET_DEBUGREGS"))?;
        let lapic = self
            .fd
            .get_lapic()
            .map_err(self.save_err("KVM_GET_LAPIC"))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.save_err("KVM_GET_CPUID2"))?;
        let mut msrs = self.read_msrs(msr_indices)?;
        msr_restore_order(&mut msrs);
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(self.save_err("KVM_GET_VCPU_EVENTS"))?;
        let nr_xcrs = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        Ok(VcpuState {
            index: self.index,
            mp_state: mp_state.mp_state,
            regs: (&regs).into(),
            sregs: (&sregs).into(),
            debug_regs: (&debug_regs).into(),
            xcrs: xcrs.xcrs[..nr_xcrs].iter().map(Into::into).collect(),
            cpuid: cpuid.as_slice().iter().map(Into::into).collect(),
            tsc_khz,
            msrs,
            lapic,
            xsave,
            vcpu_events,
        })
    }

    /// Reads every MSR in `indices` that KVM can read: KVM_GET_MSRS stops at the first MSR it
    /// cannot read and returns how many it read, so that one is skipped and the read goes on
    /// after it.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<Msr>, VcpuError> {
        let mut saved = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Save {
                index: self.index,
                what: "building the KVM_GET_MSRS list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.save_err("KVM_GET_MSRS"))?;
            saved.extend(msrs.as_slice()[..read].iter().map(|e| Msr {
                index: e.index,
                value: e.data,
            }));
            if read < chunk.len() {
                log::debug!(
                    "vCPU {}: MSR {:#x} is listed but cannot be read; not saved",
                    self.index,
                    chunk[read]
                );
                rest = &rest[read + 1..];
            } else {
                rest = &rest[read..];
            }
        }
        Ok(saved)
    }

    /// Puts a saved vCPU back, before its thread starts, in the order KVM needs: TSC rate,
    /// CPUID, MP state, registers (which clear pending exceptions), special registers (which
    /// set the APIC base), XSAVE, XCRs, debug registers, the LAPIC (before the MSRs: the TSC
    /// deadline only takes with the LAPIC set up), the MSRs in `msr_restore_order` (the
    /// async PF enable last: its write queues the wake-all for tasks that were parked), the
    /// vCPU events (pending exceptions and interrupts), and kvmclock told that the vCPU was
    /// stopped.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        if let Some(saved) = state.tsc_khz {
            let here = self.fd.get_tsc_khz().unwrap_or(0);
            if here != saved {
                self.fd
                    .set_tsc_khz(saved)
                    .map_err(|source| VcpuError::TscScaling {
                        index: self.index,
                        saved,
                        here,
                        source,
                    })?;
            }
        }
        let entries: Vec<kvm_cpuid_entry2> = state.cpuid.iter().map(|&e| e.into()).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::Restore {
            index: self.index,
            what: "building the CPUID list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.restore_err("KVM_SET_CPUID2"))?;
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: state.mp_state,
            })
            .map_err(self.restore_err("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&(&state.regs).into())
            .map_err(self.restore_err("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&(&state.sregs).into())
            .map_err(self.restore_err("KVM_SET_SREGS"))?;
        // SAFETY: the area is what KVM_GET_XSAVE gave for a vCPU with this CPUID (the CRC
        // of the state file vouches for it); KVM checks the header and refuses what it cannot
        // load.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.restore_err("KVM_SET_XSAVE"))?;
        let mut xcrs = kvm_xcrs::default();
        for (slot, x) in xcrs.xcrs.iter_mut().zip(&state.xcrs) {
            slot.xcr = x.xcr;
            slot.value = x.value;
        }
        xcrs.nr_xcrs = state.xcrs.len().min(xcrs.xcrs.len()) as u32;
        self.fd
            .set_xcrs(&xcrs)
            .map_err(self.restore_err("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&(&state.debug_regs).into())
            .map_err(self.restore_err("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.restore_err("KVM_SET_LAPIC"))?;
        self.write_msrs(&state.msrs)?;
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(self.restore_err("KVM_SET_VCPU_EVENTS"))?;
        self.notify_paused();
        Ok(())
    }

    /// Writes `msrs` in their order (in chunks of what one KVM_SET_MSRS takes); KVM stops at
    /// the first MSR it refuses, which is named in the error.
    fn write_msrs(&self, msrs: &[Msr]) -> Result<(), VcpuError> {
        for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.index,
                    data: m.value,
                    ..Default::default()
                })
                .collect();
            let list = Msrs::from_entries(&entries).map_err(|_| VcpuError::Restore {
                index: self.index,
                what: "building the KVM_SET_MSRS list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let written = self
                .fd
                .set_msrs(&list)
                .map_err(self.restore_err("KVM_SET_MSRS"))?;
            if let Some(refused) = chunk.get(written) {
                return Err(VcpuError::MsrRefused {
                    index: self.index,
                    msr: refused.index,
                    value: refused.value,
                });
            }
        }
        Ok(())
    }

    /// Lets the kick signal reach this vCPU's KVM_RUN on the calling thread (its own thread,
    /// for as long as it runs the vCPU; `unbind_kick` before the vCPU goes).
    pub fn bind_kick(&mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
    }

    pub fn unbind_kick(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    /// Completes a pending port or MMIO exit without running guest code (KVM_RUN with
    /// immediate_exit set): the guest's register state is then final, so a vCPU saved or
    /// parked here does not repeat its last I/O instruction when it runs again.
    pub fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Tells the guest's kvmclock that the vCPU was stopped (no soft-lockup reports for the
    /// time it sat paused). A guest without kvmclock makes KVM refuse, which is fine.
    pub fn notify_paused(&self) {
        let _ = self.fd.kvmclock_ctrl();
    }

    /// Runs the guest until one exit is handled and says what came of it.
    pub fn run_once(
        &mut self,
        io: &IoManager,
        mem: &GuestMemoryMmap,
        metrics: &VcpuMetrics,
    ) -> VcpuAction {
        let entered = Instant::now();
        let exit = self.fd.run();
        metrics
            .run_ns
            .fetch_add(entered.elapsed().as_nanos() as u64, Ordering::Relaxed);
        metrics.exits.fetch_add(1, Ordering::Relaxed);
        let reason = match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if io.pio_read(PioAddress(port), data).is_err() {
                    // No device: the bus floats high, as on a PC.
                    data.fill(0xff);
                }
                return VcpuAction::Continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if io.pio_write(PioAddress(port), data).is_err() {
                    log::trace!("vCPU {}: write to unassigned port {port:#x}", self.index);
                }
                return VcpuAction::Continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if io.mmio_read(MmioAddress(addr), data).is_err() {
                    data.fill(0xff);
                }
                return VcpuAction::Continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if io.mmio_write(MmioAddress(addr), data).is_err() {
                    log::debug!("vCPU {}: write to unassigned MMIO {addr:#x}", self.index);
                }
                return VcpuAction::Continue;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    return VcpuAction::GuestReset;
                }
                other => format!("system event {other} (guest crash)"),
            },
            Ok(VcpuExit::Shutdown) => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Ok(VcpuExit::InternalError) => self.internal_error_reason(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            ),
            Ok(VcpuExit::Hlt) => {
                // The in-kernel irqchip handles HLT; seeing it means the guest halted for
                // good with nothing that could wake it.
                "HLT exit (vCPU halted with no way to wake)".to_string()
            }
            Ok(VcpuExit::Intr) => return VcpuAction::Continue,
            Ok(other) => format!("unhandled KVM exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return VcpuAction::Continue;
            }
            Err(e) => format!("KVM_RUN failed: {e}"),
        };
        VcpuAction::Fault(self.fault(reason, mem))
    }

    fn internal_error_reason(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            _ => "internal error",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            "KVM internal error: {what} (suberror {}, data [{}])",
            internal.suberror,
            data.join(", ")
        )
    }

    /// Collects where the guest was: RIP, mode, and the bytes of the instruction there.
    fn fault(&self, reason: String, mem: &GuestMemoryMmap) -> VcpuFault {
        let mut fault = VcpuFault {
            vcpu: self.index,
            reason,
            rip: None,
            state: String::new(),
            insn_bytes: Vec::new(),
        };
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return fault;
        };
        fault.rip = Some(r.rip);
        fault.state = format!(
            "RSP {:#x} RFLAGS {:#x} CS {:#x} (base {:#x}, L={} D={}) CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}",
            r.rsp, r.rflags, s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.cr0, s.cr3, s.cr4, s.efer
        );
        let linear = s.cs.base.wrapping_add(r.rip);
        let paging = s.cr0 & (1 << 31) != 0;
        let phys = if paging {
            match self.fd.translate_gva(linear) {
                Ok(t) if t.valid != 0 => Some(t.physical_address),
                _ => None,
            }
        } else {
            Some(linear)
        };
        if let Some(phys) = phys {
            // Up to 15 bytes (the longest x86 instruction), not crossing into the next page,
            // whose translation may differ.
            let len = 15.min(0x1000 - (phys & 0xfff)) as usize;
            let mut bytes = vec![0u8; len];
            if mem.read_slice(&mut bytes, GuestAddress(phys)).is_ok() {
                fault.insn_bytes = bytes;
            }
        }
        fault
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes_keep_other_bits() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[LAPIC_LVT_LINT0] = 0x55u8 as libc::c_char; // vector bits
        regs[LAPIC_LVT_LINT0 + 2] = 0x01; // mask bit 16
        set_apic_delivery_mode(&mut regs, LAPIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_apic_delivery_mode(&mut regs, LAPIC_LVT_LINT1, APIC_MODE_NMI);
        let word = |o: usize| u32::from_le_bytes(std::array::from_fn(|i| regs[o + i] as u8));
        assert_eq!(word(LAPIC_LVT_LINT0), 0x0001_0755);
        assert_eq!(word(LAPIC_LVT_LINT1), 0x0000_0400);
    }

    #[test]
    fn fault_message_names_reason_rip_and_bytes() {
        let f = VcpuFault {
            vcpu: 1,
            reason: "triple fault (KVM_EXIT_SHUTDOWN)".into(),
            rip: Some(0x10_0abc),
            state: "CR0 0x11".into(),
            insn_bytes: vec![0x0f, 0x0b],
        };
        assert_eq!(
            f.to_string(),
            "vCPU 1 stopped the VM: triple fault (KVM_EXIT_SHUTDOWN) at RIP 0x100abc; \
             instruction bytes: 0f 0b; CR0 0x11"
        );
    }
}

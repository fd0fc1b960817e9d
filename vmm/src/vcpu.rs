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

use kvm_bindings::{CpuId, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{loader::LoadedKernel, msrs, regs};
use crate::metrics::VcpuMetrics;

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

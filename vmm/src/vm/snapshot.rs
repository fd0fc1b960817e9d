//! Snapshot and restore at the VM's level: what is saved besides guest RAM (every vCPU from
//! its own parked thread, the in-kernel PIC, IOAPIC and PIT, kvmclock, the UART), and
//! putting it back into a new VM in the order KVM needs (docs/snapshot.md). Also the guest's
//! snapshot requests, which the VM's owner acts on.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{STOP_BUDGET, Vm, VmError, VmState};
use crate::snapshot::state::{PlatformState, SavedConfig, SnapshotState};
use crate::snapshot::{self, SnapshotError, SnapshotInfo};

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// The VM-wide in-kernel state.
pub(super) fn save_platform(vm: &VmFd) -> Result<PlatformState, VmError> {
    Ok(PlatformState {
        kvmclock_ns: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?.clock,
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
    })
}

/// Puts the VM-wide state back (after the irqchip and PIT are created, before any vCPU is
/// restored): PIT, kvmclock (continuing from the saved value: the guest sees no time pass
/// while it was saved), PICs and IOAPIC.
pub(super) fn restore_platform(vm: &VmFd, state: &PlatformState) -> Result<(), VmError> {
    vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: state.kvmclock_ns,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// The config a snapshot records, to check a restore against.
pub(super) fn saved_config(vm: &Vm) -> SavedConfig {
    let c = &vm.config;
    SavedConfig {
        vcpus: c.vcpus,
        mem_size: c.mem_size,
        apf: c.apf,
        cpu_features: crate::arch::x86_64::cpuid::describe_feature_edits(&c.cpu_features),
        kernel: c.kernel.describe(),
        cmdline: c.cmdline.clone(),
    }
}

impl Vm {
    /// Saves a paused VM into `dir` (see `snapshot::write`); the VM stays paused, whatever
    /// the outcome, and nothing it holds changes.
    pub fn snapshot(&mut self, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        if self.state != VmState::Paused {
            return Err(SnapshotError::NotPaused(format!("{:?}", self.state)));
        }
        let started = Instant::now();
        let threads = self
            .vcpu_threads
            .as_ref()
            .expect("a paused VM has vCPU threads");
        let vcpus = threads
            .save_states(self.msr_indices.clone(), Instant::now() + STOP_BUDGET)
            .ok_or_else(|| SnapshotError::Save("a vCPU thread is gone: the VM is stopping".into()))?
            .map_err(|e| SnapshotError::Save(e.to_string()))?;
        let platform =
            save_platform(&self.vm_fd).map_err(|e| SnapshotError::Save(e.to_string()))?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
            .into();
        let id = snapshot::new_id();
        let state = SnapshotState {
            id: id.clone(),
            apfvm_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            vm: saved_config(self),
            memory: Default::default(),
            vcpus,
            platform,
            serial,
        };
        let data_pages = snapshot::write(dir, state, &self.memory, self.pager.as_deref())?;
        Ok(SnapshotInfo {
            dir: dir.to_path_buf(),
            memory_file: dir.join(format!("memory-{id}")),
            id,
            mem_size: self.config.mem_size,
            data_pages,
            millis: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// A guest's pending snapshot request (the snapshot-request port), for the VM's owner: its
/// event wakes the owner's loop. Once the VM runs with somewhere to put snapshots, a request
/// also parks the requesting vCPU right after its port write (`pauser`), so the snapshot is
/// taken exactly there, not a few instructions later.
pub struct SnapshotRequests {
    pending: AtomicBool,
    pub event: EventFd,
    pauser: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl SnapshotRequests {
    pub fn new() -> std::io::Result<SnapshotRequests> {
        Ok(SnapshotRequests {
            pending: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK)?,
            pauser: std::sync::OnceLock::new(),
        })
    }

    /// Set by the VM when it starts, if snapshots have somewhere to go (the owner then
    /// always pauses and resumes or stops after a request).
    pub(in crate::vm) fn set_pauser(&self, pauser: Box<dyn Fn() + Send + Sync>) {
        let _ = self.pauser.set(pauser);
    }

    /// Whether a request came since the last call (and clears it).
    pub fn take(&self) -> bool {
        let _ = self.event.read();
        self.pending.swap(false, Ordering::SeqCst)
    }
}

impl devices::SnapshotRequestHandler for SnapshotRequests {
    fn snapshot_requested(&self) {
        if let Some(pause) = self.pauser.get() {
            pause();
        }
        self.pending.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
    }
}

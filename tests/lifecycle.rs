//! The `Vm` lifecycle through the library, in this process: pause and resume with faults in
//! flight, stop from the paused state, and a vCPU thread that panics. (Stopping the apfvm
//! binary from other states is in tests/stop.rs.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset, PioRange};
use vmm::config::{KernelImage, PagerKind, Settings, Switch};
use vmm::vm::{Vm, VmError, VmOutcome, VmState};

const LIMIT: Duration = Duration::from_secs(120);

/// The reference guest with `cmdline`, paged with `latency` fetches, unconfined (seccomp
/// filters would stay on this test process's threads).
fn reference_vm(cmdline: &str, latency: &str) -> Vm {
    let settings = Settings {
        vcpus: Some(2),
        cmdline: Some(cmdline.into()),
        pager: Some(PagerKind::Uffd),
        fault_latency: Some(latency.into()),
        apf: Some(Switch::On),
        no_seccomp: true,
        ..Default::default()
    };
    let config = settings
        .into_config(Some(KernelImage::Embedded {
            name: "reference guest",
            bytes: vmm::REFERENCE_GUEST,
        }))
        .unwrap();
    Vm::build(config, "/dev/kvm", None).unwrap()
}

/// Polls `ready` (an event in the VM's counters) until it holds; fails after `limit`.
fn wait_until(what: &str, limit: Duration, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "waiting for {what}: not seen in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn vcpu_exits(vm: &Vm) -> u64 {
    vm.vcpu_metrics()
        .iter()
        .map(|m| m.exits.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

fn async_faults(vm: &Vm) -> u64 {
    vm.pager()
        .unwrap()
        .stats()
        .faults_async
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn pages_copied(vm: &Vm) -> u64 {
    let s = vm.pager().unwrap().stats();
    s.served_from_store
        .load(std::sync::atomic::Ordering::Relaxed)
        + s.restored_from_swap
            .load(std::sync::atomic::Ordering::Relaxed)
}

/// Pause a guest mid-workload with faults in flight (async PF on): while paused no vCPU runs
/// (no KVM_RUN returns, no console output) and the pager copies no page; after resume the
/// workload ends with every byte and token right.
#[test]
fn pause_holds_vcpus_and_pager_and_resume_continues_exactly_there() {
    if !kvm_available() {
        return;
    }
    let _one_at_a_time = exclusive();
    let mut vm = reference_vm("pages=1024 touchers=2 busy=1 passes=2 evict=1", "20ms");
    vm.start().unwrap();
    wait_until("async faults", LIMIT, || async_faults(&vm) >= 20);
    vm.pause().unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    let (exits, copied, output) = (vcpu_exits(&vm), pages_copied(&vm), vm.console().take());
    // Absence can only be shown over some time: 20 fetch latencies.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(vcpu_exits(&vm), exits, "no vCPU ran while paused");
    assert_eq!(pages_copied(&vm), copied, "no page was copied while paused");
    assert!(
        vm.console().take().is_empty(),
        "the guest printed nothing while paused"
    );
    vm.resume().unwrap();
    assert_eq!(vm.state(), VmState::Running);
    let stop = vm.stop_requests().clone();
    wait_until("the guest's end", LIMIT, || stop.is_requested());
    vm.shutdown().unwrap();
    assert_eq!(vm.outcome().unwrap(), VmOutcome::GuestExit(0));
    let mut text = String::from_utf8_lossy(&output).into_owned();
    text.push_str(&String::from_utf8_lossy(&vm.console().take()));
    let result = test_support::reference_guest::result(&text).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(result["verdict"], "pass", "{text}");
    assert_guest_checks_clean(&result);
    assert_eq!(field(&result, "pages_touched"), 2048, "{result}");
}

/// A paused VM stops within the stop budget, every fault it held released.
#[test]
fn a_paused_vm_stops_within_the_budget() {
    if !kvm_available() {
        return;
    }
    let _one_at_a_time = exclusive();
    let mut vm = reference_vm("pages=1024 touchers=2 busy=1 passes=1", "10s");
    vm.start().unwrap();
    wait_until("async faults", LIMIT, || async_faults(&vm) >= 2);
    vm.pause().unwrap();
    vm.shutdown().unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(vm.outcome().unwrap(), VmOutcome::Stopped);
    assert!(vm.pager_summary().is_some());
}

/// A device model that panics, on the port the reference guest's `fail=port` writes to.
struct PanickingDevice;

impl MutDevicePio for PanickingDevice {
    fn pio_read(&mut self, _: PioAddress, _: PioAddressOffset, _: &mut [u8]) {}
    fn pio_write(&mut self, _: PioAddress, _: PioAddressOffset, _: &[u8]) {
        panic!("device model bug");
    }
}

/// A vCPU thread that panics stops the VM with an error naming the vCPU's thread.
#[test]
fn a_vcpu_thread_that_panics_stops_the_vm_with_an_error_naming_it() {
    if !kvm_available() {
        return;
    }
    let _one_at_a_time = exclusive();
    let mut vm = reference_vm("fail=port hold", "0");
    vm.register_pio_device(
        PioRange::new(PioAddress(0x9999), 1).unwrap(),
        Arc::new(Mutex::new(PanickingDevice)),
    )
    .unwrap();
    vm.start().unwrap();
    let stop = vm.stop_requests().clone();
    wait_until("the VM to stop", LIMIT, || stop.is_requested());
    vm.shutdown().unwrap();
    match vm.outcome() {
        Err(VmError::Vmm(message)) => {
            assert_eq!(message, "thread vcpu0 panicked: device model bug")
        }
        other => panic!("{other:?}"),
    }
}

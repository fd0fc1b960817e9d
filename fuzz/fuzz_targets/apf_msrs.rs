//! Guest writes of the async PF MSRs (MSR_KVM_ASYNC_PF_INT, _EN, _ACK) with any values at
//! any moment: the reference guest's `hostile=msr-script` makes the writes the input lists
//! (9 bytes each: which MSR, then the value) while it pages through apfvm's pager on 2 vCPUs
//! under the real KVM. Areas outside RAM, reserved bits, vectors below 32, enable/disable
//! loops and ACK floods all reach KVM as written (resources/guest/README.md says how the guest
//! keeps its own bookkeeping in step). Whatever the values, apfvm must neither panic nor hang,
//! and the guest must finish its workload with every byte intact: `vm::run` returns the
//! guest's exit code 0. Anything else is a finding (the panic names the script).
//!
//! One input is one VM boot (~0.5 s), so runs are short in inputs; -close_fd_mask=1 keeps the
//! guest's serial console quiet.
#![no_main]

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use test_support::reference_guest::{MSR_SCRIPT_FLAGS, msr_script_cmdline};
use vmm::config::{KernelImage, Settings};
use vmm::vm::{self, VmOutcome};

/// The flags `apfvm demo` takes, so that the VM here is exactly the one the tests run.
#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    settings: Settings,
}

fuzz_target!(|script: &[u8]| {
    let Some(cmdline) = msr_script_cmdline(script) else {
        return;
    };
    let mut argv = vec!["apfvm-demo"];
    argv.extend_from_slice(&MSR_SCRIPT_FLAGS);
    argv.extend_from_slice(&["--no-seccomp", "--cmdline", &cmdline]);
    let flags = Flags::try_parse_from(argv).expect("the MSR script flags parse");
    let guest = KernelImage::Embedded {
        name: "reference guest",
        bytes: vmm::REFERENCE_GUEST,
    };
    let config = flags
        .settings
        .into_config(Some(guest))
        .expect("a valid VM configuration");
    // In-process confinement would outlive the VM (seccomp filters stay): --no-seccomp.
    match vm::run(config, "/dev/kvm") {
        Ok(VmOutcome::GuestExit(0)) => {}
        other => panic!("MSR script {cmdline}: the VM ended with {other:?}"),
    }
});

//! apfvm: a KVM virtual machine monitor built around async page faults.
//!
//! Follow a VM from `config` (what the user asked for) to `vm::run` (build and run it), which
//! uses `memory` (guest RAM), `arch::x86_64` (boot), `vcpu` (the KVM_RUN loops) and the
//! `devices` crate, and `apf` for the async page fault switch.

pub mod apf;
pub mod arch;
pub mod bench;
pub mod child;
pub mod config;
pub mod console;
pub mod kvm_trace;
pub mod linux_guest;
pub mod memory;
pub mod metrics;
pub mod pager;
pub mod reference_guest;
pub mod seccomp;
pub mod thread;
pub mod vcpu;
pub mod vm;

/// The project's reference guest, built from resources/guest by build.rs.
pub const REFERENCE_GUEST: &[u8] = include_bytes!(env!("APFVM_REFERENCE_GUEST"));

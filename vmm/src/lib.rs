//! apfvm: a KVM virtual machine monitor built around async page faults.
//!
//! Follow a VM from `config` (what the user asked for) to `vm::run` (build and run it), which
//! uses `memory` (guest RAM), `arch::x86_64` (boot), `vcpu` (the KVM_RUN loops) and the
//! `devices` crate, and `apf` for the async page fault switch.
//!
//! The library is the VMM. The `apfvm` binary (beside this file: `main.rs`, the command line,
//! and `bench/`, `apfvm bench`) is built on it; what the bench and the integration tests share
//! to drive apfvm as a child process and read its guests' result lines is the
//! `apfvm-test-support` crate in tests/support, which this library does not use.

pub mod apf;
pub mod api;
pub mod arch;
pub mod config;
pub mod console;
pub mod kvm_trace;
pub mod memory;
pub mod metrics;
pub mod pager;
pub mod seccomp;
pub mod snapshot;
pub mod thread;
pub mod vcpu;
pub mod vm;

/// The project's reference guest, built from resources/guest by build.rs.
pub const REFERENCE_GUEST: &[u8] = include_bytes!(env!("APFVM_REFERENCE_GUEST"));

//! x86_64 boot: where things go in guest memory, CPU state at entry, CPUID, MSRs, the MP
//! table and the boot protocols (PVH and the Linux 64-bit boot protocol).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod msrs;
pub mod regs;

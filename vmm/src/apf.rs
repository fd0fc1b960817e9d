//! KVM's paravirtual async page fault, as far as the VMM is concerned: the CPUID bits that
//! tell the guest it may enable it (the `--apf on|off` switch), and the MSRs that hold a
//! vCPU's async PF state and so belong in any save/restore of that vCPU.
//!
//! The protocol itself runs between KVM and the guest (../shared/docs/async-pf.md); the VMM's
//! part beyond this is the host paging that makes pages missing (see `pager`).

use kvm_bindings::CpuId;

/// KVM's paravirtual CPUID leaves.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// CPUID 0x40000001 EAX bits of async PF.
pub const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
pub const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
/// Page-ready by interrupt; Linux enables async PF only when this one is set.
pub const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;
pub const ASYNC_PF_CPUID_BITS: u32 =
    KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_VMEXIT | KVM_FEATURE_ASYNC_PF_INT;

/// Guest-physical address of the shared area, and the enable bits.
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// Page-ready vector.
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// Written by the guest after it consumed a page-ready token.
pub const MSR_KVM_ASYNC_PF_ACK: u32 = 0x4b56_4d07;

/// A vCPU's async PF state. INT must be restored before EN: enabling validates the vector.
pub const ASYNC_PF_MSRS: [u32; 3] = [
    MSR_KVM_ASYNC_PF_INT,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_ASYNC_PF_ACK,
];

/// Keeps the KVM signature leaf well-formed and shows or hides the async PF bits.
pub fn apply_cpuid(cpuid: &mut CpuId, apf_enabled: bool) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            KVM_CPUID_SIGNATURE => {
                entry.eax = KVM_CPUID_FEATURES;
                [entry.ebx, entry.ecx, entry.edx] = KVM_SIGNATURE;
            }
            KVM_CPUID_FEATURES => {
                if apf_enabled {
                    entry.eax |= ASYNC_PF_CPUID_BITS;
                } else {
                    entry.eax &= !ASYNC_PF_CPUID_BITS;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpuid::{find_entry, tests::sample};

    #[test]
    fn apf_switch_shows_and_hides_the_three_bits() {
        let mut c = sample();
        apply_cpuid(&mut c, false);
        let eax = find_entry(&c, KVM_CPUID_FEATURES, 0).unwrap().eax;
        assert_eq!(eax & ASYNC_PF_CPUID_BITS, 0);
        assert_eq!(
            eax,
            0x0100_7efb & !ASYNC_PF_CPUID_BITS,
            "other PV features kept"
        );
        apply_cpuid(&mut c, true);
        let eax = find_entry(&c, KVM_CPUID_FEATURES, 0).unwrap().eax;
        assert_eq!(eax & ASYNC_PF_CPUID_BITS, ASYNC_PF_CPUID_BITS);
        let sig = find_entry(&c, KVM_CPUID_SIGNATURE, 0).unwrap();
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
    }
}

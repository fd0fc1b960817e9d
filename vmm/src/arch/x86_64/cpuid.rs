//! The guest's CPUID: KVM_GET_SUPPORTED_CPUID, made per-vCPU (APIC ids, topology), with the
//! KVM paravirtual leaves kept, and feature edits applied last (`--cpu-features`).
//!
//! Feature edits exist because some hosts run guest kernel mode through an instruction
//! emulator that lacks XSAVE, CMPXCHG16B, POPCNT and friends (../shared/docs/host-kvm.md):
//! such hosts are handled by configuration, not by special cases in the VMM.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

use crate::apf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Where a feature flag lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn fb(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> FeatureBit {
    FeatureBit {
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Feature names accepted by `--cpu-features`, as Linux's /proc/cpuinfo spells them.
pub const FEATURES: &[(&str, FeatureBit)] = &[
    ("sse3", fb(1, 0, Reg::Ecx, 0)),
    ("pclmulqdq", fb(1, 0, Reg::Ecx, 1)),
    ("ssse3", fb(1, 0, Reg::Ecx, 9)),
    ("fma", fb(1, 0, Reg::Ecx, 12)),
    ("cx16", fb(1, 0, Reg::Ecx, 13)),
    ("pcid", fb(1, 0, Reg::Ecx, 17)),
    ("sse4_1", fb(1, 0, Reg::Ecx, 19)),
    ("sse4_2", fb(1, 0, Reg::Ecx, 20)),
    ("x2apic", fb(1, 0, Reg::Ecx, 21)),
    ("movbe", fb(1, 0, Reg::Ecx, 22)),
    ("popcnt", fb(1, 0, Reg::Ecx, 23)),
    ("tsc_deadline_timer", fb(1, 0, Reg::Ecx, 24)),
    ("aes", fb(1, 0, Reg::Ecx, 25)),
    ("xsave", fb(1, 0, Reg::Ecx, 26)),
    ("avx", fb(1, 0, Reg::Ecx, 28)),
    ("f16c", fb(1, 0, Reg::Ecx, 29)),
    ("rdrand", fb(1, 0, Reg::Ecx, 30)),
    ("fsgsbase", fb(7, 0, Reg::Ebx, 0)),
    ("bmi1", fb(7, 0, Reg::Ebx, 3)),
    ("hle", fb(7, 0, Reg::Ebx, 4)),
    ("avx2", fb(7, 0, Reg::Ebx, 5)),
    ("smep", fb(7, 0, Reg::Ebx, 7)),
    ("bmi2", fb(7, 0, Reg::Ebx, 8)),
    ("erms", fb(7, 0, Reg::Ebx, 9)),
    ("invpcid", fb(7, 0, Reg::Ebx, 10)),
    ("rtm", fb(7, 0, Reg::Ebx, 11)),
    ("avx512f", fb(7, 0, Reg::Ebx, 16)),
    ("rdseed", fb(7, 0, Reg::Ebx, 18)),
    ("adx", fb(7, 0, Reg::Ebx, 19)),
    ("smap", fb(7, 0, Reg::Ebx, 20)),
    ("clflushopt", fb(7, 0, Reg::Ebx, 23)),
    ("clwb", fb(7, 0, Reg::Ebx, 24)),
    ("sha_ni", fb(7, 0, Reg::Ebx, 29)),
    ("umip", fb(7, 0, Reg::Ecx, 2)),
    ("pku", fb(7, 0, Reg::Ecx, 3)),
    ("la57", fb(7, 0, Reg::Ecx, 16)),
    ("rdpid", fb(7, 0, Reg::Ecx, 22)),
    ("fsrm", fb(7, 0, Reg::Edx, 4)),
    ("xsaveopt", fb(0xd, 1, Reg::Eax, 0)),
    ("xsavec", fb(0xd, 1, Reg::Eax, 1)),
    ("xsaves", fb(0xd, 1, Reg::Eax, 3)),
    ("lahf_lm", fb(0x8000_0001, 0, Reg::Ecx, 0)),
    ("abm", fb(0x8000_0001, 0, Reg::Ecx, 5)),
    ("pdpe1gb", fb(0x8000_0001, 0, Reg::Edx, 26)),
    ("rdtscp", fb(0x8000_0001, 0, Reg::Edx, 27)),
    // AMD: FXSAVE saves/restores the x87 error pointers. Advertising it disables Linux's
    // FXSAVE-leak workaround, which runs x87 instructions that instruction emulators lack.
    ("xsaveerptr", fb(0x8000_0008, 0, Reg::Ebx, 2)),
];

/// Named sets of edits, usable in `--cpu-features` like a feature.
pub const TEMPLATES: &[(&str, &str)] = &[(
    // For hosts that emulate guest kernel mode instruction by instruction (PVM): hide what
    // the emulator cannot run in kernel mode.
    "emulated-kernel",
    "-xsave,-xsaveopt,-xsavec,-xsaves,-avx,-avx2,-avx512f,-fma,-f16c,-cx16,-popcnt,-movbe,\
     -rdpid,-rdtscp,-bmi1,-bmi2,-abm,-adx,-sse4_2,-pcid,-invpcid,-fsgsbase,-hle,-rtm,-clwb,\
     -smap,-smep,-rdrand,-rdseed,-erms,-fsrm,-la57,-pku,-umip,+xsaveerptr",
)];

/// One `+name` / `-name` edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureEdit {
    pub name: &'static str,
    pub bit: FeatureBit,
    pub enable: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    #[error(
        "unknown CPU feature '{0}' in --cpu-features (known: {known}; templates: {templates})",
        known = FEATURES.iter().map(|f| f.0).collect::<Vec<_>>().join(","),
        templates = TEMPLATES.iter().map(|t| t.0).collect::<Vec<_>>().join(",")
    )]
    UnknownFeature(String),
    #[error("CPU feature edit '{0}' must start with '+' or '-' (e.g. -xsave,+xsaveerptr)")]
    MissingSign(String),
}

/// Parses a comma-separated list of `+feature`, `-feature` and template names.
/// The edits as `+name`/`-name`, templates expanded: what a snapshot records.
pub fn describe_feature_edits(edits: &[FeatureEdit]) -> Vec<String> {
    edits
        .iter()
        .map(|e| format!("{}{}", if e.enable { '+' } else { '-' }, e.name))
        .collect()
}

pub fn parse_feature_edits(list: &str) -> Result<Vec<FeatureEdit>, CpuidError> {
    let mut edits = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((_, expansion)) = TEMPLATES.iter().find(|(name, _)| *name == item) {
            edits.extend(parse_feature_edits(expansion)?);
            continue;
        }
        // Not split_at(1): the first character may take more than one byte.
        let (enable, name) = if let Some(rest) = item.strip_prefix('+') {
            (true, rest)
        } else if let Some(rest) = item.strip_prefix('-') {
            (false, rest)
        } else {
            return Err(CpuidError::MissingSign(item.to_string()));
        };
        let (name, bit) = FEATURES
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| CpuidError::UnknownFeature(name.to_string()))?;
        edits.push(FeatureEdit {
            name,
            bit: *bit,
            enable,
        });
    }
    Ok(edits)
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

fn set_bit(value: &mut u32, bit: u8, on: bool) {
    if on {
        *value |= 1 << bit;
    } else {
        *value &= !(1 << bit);
    }
}

/// Applies feature edits; a feature whose leaf the host does not report cannot be turned on
/// and is left alone.
pub fn apply_feature_edits(cpuid: &mut CpuId, edits: &[FeatureEdit]) {
    for edit in edits {
        for entry in cpuid.as_mut_slice() {
            if entry.function == edit.bit.leaf && entry.index == edit.bit.subleaf {
                set_bit(reg_mut(entry, edit.bit.reg), edit.bit.bit, edit.enable);
            }
        }
    }
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR_BIT: u8 = 31;
const ECX_X2APIC_BIT: u8 = 21;
const EDX_HTT_BIT: u8 = 28;

/// The VM-wide CPUID choices.
#[derive(Debug, Clone)]
pub struct CpuidConfig {
    pub vcpu_count: u8,
    pub apf: bool,
    pub feature_edits: Vec<FeatureEdit>,
}

/// Builds the CPUID of one vCPU from the host's supported CPUID.
pub fn vcpu_cpuid(supported: &CpuId, config: &CpuidConfig, apic_id: u8) -> CpuId {
    let mut cpuid = supported.clone();
    // Topology: one socket of `vcpu_count` cores, one thread each.
    let core_shift = 32 - u32::from(config.vcpu_count.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(apic_id) << 24)
                    | (u32::from(config.vcpu_count) << 16);
                set_bit(&mut entry.ecx, ECX_HYPERVISOR_BIT, true);
                set_bit(&mut entry.ecx, ECX_X2APIC_BIT, true);
                set_bit(&mut entry.edx, EDX_HTT_BIT, config.vcpu_count > 1);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = u32::from(apic_id);
                match entry.index {
                    0 => {
                        // SMT level: one thread per core.
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    1 => {
                        // Core level: all vCPUs in one package.
                        entry.eax = core_shift;
                        entry.ebx = u32::from(config.vcpu_count);
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
    apf::apply_cpuid(&mut cpuid, config.apf);
    apply_feature_edits(&mut cpuid, &config.feature_edits);
    cpuid
}

/// Looks up one entry (for tests and diagnostics).
pub fn find_entry(cpuid: &CpuId, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A small CPUID like the host's: features, leaf 7, topology, the KVM leaves.
    pub(crate) fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0, 0, 0),
            entry(1, 0, 0x806f8, 0x0820_0800, 0xfffa_3203, 0x178b_fbff),
            entry(7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 5, 16, 0x201, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x4000_0001, 0, 0x0100_7efb, 0, 0, 0),
            entry(0x8000_0008, 0, 0x3030, 0, 0, 0),
        ])
        .unwrap()
    }

    #[test]
    fn per_vcpu_apic_ids_and_topology() {
        let cfg = CpuidConfig {
            vcpu_count: 2,
            apf: true,
            feature_edits: vec![],
        };
        let c = vcpu_cpuid(&sample(), &cfg, 1);
        let l1 = find_entry(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 1);
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(l1.ecx & (1 << 21), 0, "x2apic");
        let smt = find_entry(&c, 0xb, 0).unwrap();
        let core = find_entry(&c, 0xb, 1).unwrap();
        assert_eq!((smt.edx, smt.ebx, smt.ecx >> 8), (1, 1, 1));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (1, 2, 2));
    }

    /// Found by the `config` fuzz target: a first character of more than one byte.
    #[test]
    fn a_feature_edit_without_a_sign_is_an_error_whatever_its_first_character() {
        for item in ["\u{28a}lt_s", "xsave", "\u{e9}", "+\u{28a}"] {
            assert!(parse_feature_edits(item).is_err(), "{item}");
        }
    }

    #[test]
    fn feature_edits_and_templates() {
        let edits = parse_feature_edits("-xsave, -cx16,+xsaveerptr").unwrap();
        assert_eq!(edits.len(), 3);
        let mut c = sample();
        apply_feature_edits(&mut c, &edits);
        let l1 = find_entry(&c, 1, 0).unwrap();
        assert_eq!(l1.ecx & (1 << 26), 0);
        assert_eq!(l1.ecx & (1 << 13), 0);
        assert_ne!(l1.ecx & (1 << 23), 0, "popcnt untouched");
        assert_ne!(find_entry(&c, 0x8000_0008, 0).unwrap().ebx & (1 << 2), 0);

        let t = parse_feature_edits("emulated-kernel").unwrap();
        let mut c = sample();
        apply_feature_edits(&mut c, &t);
        let l7 = find_entry(&c, 7, 0).unwrap();
        assert_eq!(l7.ebx & (1 << 20), 0, "smap off");
        assert_eq!(
            find_entry(&c, 1, 0).unwrap().ecx & (1 << 23),
            0,
            "popcnt off"
        );

        assert!(matches!(
            parse_feature_edits("-nosuch"),
            Err(CpuidError::UnknownFeature(n)) if n == "nosuch"
        ));
        assert!(matches!(
            parse_feature_edits("xsave"),
            Err(CpuidError::MissingSign(_))
        ));
        assert_eq!(parse_feature_edits("").unwrap(), vec![]);
    }

    #[test]
    fn every_feature_name_is_unique() {
        let mut names: Vec<_> = FEATURES.iter().map(|f| f.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FEATURES.len());
    }
}

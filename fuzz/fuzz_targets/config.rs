//! What users type: the TOML config file (`--config`) validated into a VM configuration, and
//! the value syntaxes of the flags (sizes, fetch latencies, completion order, eviction policy,
//! CPUID edits). Every input must parse or be refused with an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::arch::x86_64::cpuid;
use vmm::config::{KernelImage, Settings, parse_size};
use vmm::pager::{EvictPolicy, FaultOrder, LatencyModel, parse_duration};

fuzz_target!(|text: &str| {
    let _ = parse_size(text);
    let _ = parse_duration(text);
    let _ = LatencyModel::parse(text);
    let _ = FaultOrder::parse(text);
    let _ = EvictPolicy::parse(text);
    let _ = cpuid::parse_feature_edits(text);
    if let Ok(settings) = toml::from_str::<Settings>(text) {
        let builtin = KernelImage::Embedded {
            name: "fuzz",
            bytes: b"not a kernel",
        };
        let _ = settings.into_config(Some(builtin));
    }
});

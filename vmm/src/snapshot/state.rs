//! What a snapshot's state file holds, as plain serde structs: the configuration needed to
//! rebuild the VM, every vCPU, the in-kernel platform devices (PIC, IOAPIC, PIT, kvmclock),
//! the UART, and how the memory file is laid out. Registers that users read when they
//! debug a restore (general and special registers, MSRs, CPUID) are spelled out field by
//! field; the hardware-defined register pages (LAPIC, XSAVE area) and KVM's event and
//! in-kernel device records keep KVM's own layout and are stored as byte arrays (kvm-bindings'
//! serde form), named by the field that holds them.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_irqchip, kvm_lapic_state, kvm_pit_state2,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcr, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// The whole state file's payload.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// Random, unique per snapshot: what a working set or a page store refers to.
    pub id: String,
    /// The apfvm version that wrote it (informative; the format version is in the header).
    pub apfvm_version: String,
    /// Unix time of the snapshot, in milliseconds.
    pub created_unix_ms: u64,
    pub vm: SavedConfig,
    pub memory: MemoryLayout,
    pub vcpus: Vec<VcpuState>,
    pub platform: PlatformState,
    pub serial: SerialState,
}

/// What the restored VM must be built with; a restore that asks for something else is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedConfig {
    pub vcpus: u8,
    pub mem_size: u64,
    pub apf: bool,
    /// `--cpu-features` as edits (`+name`/`-name`, templates expanded); the CPUID itself is
    /// in each vCPU's state.
    pub cpu_features: Vec<String>,
    /// Informative: what was booted, and with which command line.
    pub kernel: String,
    pub cmdline: String,
}

/// The memory file: guest RAM in RAM-offset order (the regions below and above the MMIO gap,
/// concatenated), `size` bytes, a hole wherever a page is all zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryLayout {
    pub file: String,
    pub size: u64,
    pub page_size: u64,
    /// Pages written to the file (not holes).
    pub data_pages: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    pub index: u8,
    pub mp_state: u32,
    pub regs: Regs,
    pub sregs: Sregs,
    pub debug_regs: DebugRegs,
    pub xcrs: Vec<Xcr>,
    pub cpuid: Vec<CpuidEntry>,
    /// Guest TSC frequency; absent when KVM cannot say.
    pub tsc_khz: Option<u32>,
    /// Every MSR KVM_GET_MSR_INDEX_LIST reports that KVM_GET_MSRS could read, in restore
    /// order (see `msr_restore_order`).
    pub msrs: Vec<Msr>,
    pub lapic: kvm_lapic_state,
    pub xsave: kvm_xsave,
    pub vcpu_events: kvm_vcpu_events,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Msr {
    pub index: u32,
    pub value: u64,
}

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
pub const MSR_KVM_ASYNC_PF_ACK: u32 = 0x4b56_4d07;

/// The order MSRs are restored in: the TSC before anything timed against it (the TSC
/// deadline), the async PF vector and ACK before the enable (whose write queues the wake-all
/// that frees tasks parked on a "page not present" of the old process), the rest by index.
pub fn msr_restore_order(msrs: &mut [Msr]) {
    msrs.sort_by_key(|m| {
        let rank = match m.index {
            MSR_IA32_TSC => 0,
            MSR_KVM_ASYNC_PF_EN => 2,
            _ => 1,
        };
        (rank, m.index)
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xcr {
    pub xcr: u32,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// Declares a serde struct with the same fields as a KVM struct and the conversions both
/// ways, so the state file names every register.
macro_rules! mirror {
    ($name:ident, $kvm:ident, { $($field:ident: $ty:ty),* $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(pub $field: $ty,)*
        }

        impl From<&$kvm> for $name {
            fn from(k: &$kvm) -> Self {
                $name { $($field: k.$field.into(),)* }
            }
        }

        impl From<&$name> for $kvm {
            fn from(m: &$name) -> Self {
                #[allow(clippy::needless_update)]
                let k = $kvm { $($field: m.$field.into(),)* ..Default::default() };
                k
            }
        }
    };
}

mirror!(Regs, kvm_regs, {
    rax: u64, rbx: u64, rcx: u64, rdx: u64, rsi: u64, rdi: u64, rsp: u64, rbp: u64,
    r8: u64, r9: u64, r10: u64, r11: u64, r12: u64, r13: u64, r14: u64, r15: u64,
    rip: u64, rflags: u64,
});

mirror!(Segment, kvm_segment, {
    base: u64, limit: u32, selector: u16, type_: u8, present: u8, dpl: u8, db: u8, s: u8,
    l: u8, g: u8, avl: u8, unusable: u8,
});

mirror!(Dtable, kvm_dtable, { base: u64, limit: u16 });

mirror!(DebugRegs, kvm_debugregs, { db: [u64; 4], dr6: u64, dr7: u64, flags: u64 });

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: Dtable,
    pub idt: Dtable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

impl From<&kvm_sregs> for Sregs {
    fn from(k: &kvm_sregs) -> Self {
        Sregs {
            cs: (&k.cs).into(),
            ds: (&k.ds).into(),
            es: (&k.es).into(),
            fs: (&k.fs).into(),
            gs: (&k.gs).into(),
            ss: (&k.ss).into(),
            tr: (&k.tr).into(),
            ldt: (&k.ldt).into(),
            gdt: (&k.gdt).into(),
            idt: (&k.idt).into(),
            cr0: k.cr0,
            cr2: k.cr2,
            cr3: k.cr3,
            cr4: k.cr4,
            cr8: k.cr8,
            efer: k.efer,
            apic_base: k.apic_base,
            interrupt_bitmap: k.interrupt_bitmap,
        }
    }
}

impl From<&Sregs> for kvm_sregs {
    fn from(m: &Sregs) -> Self {
        kvm_sregs {
            cs: (&m.cs).into(),
            ds: (&m.ds).into(),
            es: (&m.es).into(),
            fs: (&m.fs).into(),
            gs: (&m.gs).into(),
            ss: (&m.ss).into(),
            tr: (&m.tr).into(),
            ldt: (&m.ldt).into(),
            gdt: (&m.gdt).into(),
            idt: (&m.idt).into(),
            cr0: m.cr0,
            cr2: m.cr2,
            cr3: m.cr3,
            cr4: m.cr4,
            cr8: m.cr8,
            efer: m.efer,
            apic_base: m.apic_base,
            interrupt_bitmap: m.interrupt_bitmap,
        }
    }
}

impl From<&kvm_xcr> for Xcr {
    fn from(x: &kvm_xcr) -> Self {
        Xcr {
            xcr: x.xcr,
            value: x.value,
        }
    }
}

/// The in-kernel devices of the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformState {
    /// kvmclock's value (ns) when saved; the restored clock continues from it.
    pub kvmclock_ns: u64,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

/// COM1's registers and its receive FIFO (vm-superio's `SerialState`). The i8042 has no
/// state to save: vm-superio's model holds only its reset line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<SerialState> for vm_superio::serial::SerialState {
    fn from(s: SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrs_restore_tsc_first_and_async_pf_enable_last() {
        let mut msrs: Vec<Msr> = [
            MSR_KVM_ASYNC_PF_EN,
            MSR_IA32_TSC_DEADLINE,
            MSR_KVM_ASYNC_PF_ACK,
            0x4b56_4d01,
            MSR_KVM_ASYNC_PF_INT,
            MSR_IA32_TSC,
            0xc000_0080,
        ]
        .into_iter()
        .map(|index| Msr { index, value: 0 })
        .collect();
        msr_restore_order(&mut msrs);
        let order: Vec<u32> = msrs.iter().map(|m| m.index).collect();
        assert_eq!(
            order,
            [
                MSR_IA32_TSC,
                MSR_IA32_TSC_DEADLINE,
                0x4b56_4d01,
                MSR_KVM_ASYNC_PF_INT,
                MSR_KVM_ASYNC_PF_ACK,
                0xc000_0080,
                MSR_KVM_ASYNC_PF_EN,
            ]
        );
    }

    #[test]
    fn registers_keep_every_field_through_json() {
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x10;
        sregs.cs.l = 1;
        sregs.gdt.base = 0x1000;
        sregs.cr3 = 0x9000;
        sregs.efer = 0x500;
        sregs.interrupt_bitmap[2] = 7;
        let json = serde_json::to_string(&Sregs::from(&sregs)).unwrap();
        assert!(json.contains("\"cr3\":36864"), "{json}");
        let back: Sregs = serde_json::from_str(&json).unwrap();
        assert_eq!(kvm_sregs::from(&back), sregs);

        let regs = kvm_regs {
            rip: 0x10_0000,
            rflags: 2,
            r15: u64::MAX,
            ..Default::default()
        };
        let back: Regs =
            serde_json::from_str(&serde_json::to_string(&Regs::from(&regs)).unwrap()).unwrap();
        assert_eq!(kvm_regs::from(&back), regs);
    }

    #[test]
    fn kvm_blobs_round_trip() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 3;
        let json = serde_json::to_string(&lapic).unwrap();
        let back: kvm_lapic_state = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs[0x20], 3);
    }
}

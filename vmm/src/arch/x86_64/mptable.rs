//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI (our Linux config,
//! the reference guest) finds its CPUs, its I/O APIC and the ISA interrupt routing.
//! Written at the EBDA, one of the places Linux scans for the "_MP_" floating pointer.

use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};

const MPC_SPEC_REV: u8 = 4;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
const APIC_VERSION: u8 = 0x14;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Polarity and trigger "conforming to the bus" (ISA: active high, edge).
const MP_IRQ_DEFAULT_FLAGS: u16 = 0;
const ISA_IRQS: u8 = 16;
/// The CPU signature and feature words of a "generic" family 6 processor.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201; // FPU, APIC

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature1: u8,
    feature2: u8,
    feature3: u8,
    feature4: u8,
    feature5: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcLintsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbusid: u8,
    srcbusirq: u8,
    destapic: u8,
    destapiclint: u8,
}

// SAFETY: plain-old-data structs of integers, `repr(C, packed)` so there is no padding;
// every bit pattern is a valid value.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}
// SAFETY: as above.
unsafe impl ByteValued for MpcLintsrc {}

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit an MP table (at most 254: APIC ids are 8-bit)")]
    TooManyCpus(u8),
    #[error("writing the MP table to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Most vCPUs an MP table describes: ids 0..=253 for CPUs, the next for the I/O APIC.
pub const MAX_CPUS: u8 = 254;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the table bytes: the floating pointer at `start`, the config table right after.
fn build(num_cpus: u8, start: GuestAddress) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut push = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count += 1;
    };
    for cpu in 0..num_cpus {
        let e = MpcCpu {
            type_: MP_PROCESSOR,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_SIGNATURE,
            featureflag: CPU_FEATURES,
            reserved: [0; 2],
        };
        push(e.as_slice());
    }
    let bus = MpcBus {
        type_: MP_BUS,
        busid: 0,
        bustype: *b"ISA   ",
    };
    push(bus.as_slice());
    let ioapic = MpcIoapic {
        type_: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: APIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_ADDR,
    };
    push(ioapic.as_slice());
    // ISA IRQ n → I/O APIC pin n, except IRQ 0 (the PIT), which is wired to pin 2 as on a
    // PC; KVM's in-kernel I/O APIC follows the same convention.
    for irq in 0..ISA_IRQS {
        let e = MpcIntsrc {
            type_: MP_INTSRC,
            irqtype: MP_IRQ_INT,
            irqflag: MP_IRQ_DEFAULT_FLAGS,
            srcbus: 0,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: if irq == 0 { 2 } else { irq },
        };
        push(e.as_slice());
    }
    // LINT0 = ExtINT (the legacy PIC), LINT1 = NMI, on every local APIC.
    for (irqtype, lint) in [(MP_IRQ_EXTINT, 0u8), (MP_IRQ_NMI, 1u8)] {
        let e = MpcLintsrc {
            type_: MP_LINTSRC,
            irqtype,
            irqflag: MP_IRQ_DEFAULT_FLAGS,
            srcbusid: 0,
            srcbusirq: 0,
            destapic: 0xff,
            destapiclint: lint,
        };
        push(e.as_slice());
    }

    let mpf_size = std::mem::size_of::<MpfIntel>();
    let mut table = MpcTable {
        signature: *b"PCMP",
        length: (std::mem::size_of::<MpcTable>() + entries.len()) as u16,
        spec: MPC_SPEC_REV,
        checksum: 0,
        oem: *b"APFVM   ",
        productid: *b"APFVM 0.1   ",
        oemptr: 0,
        oemsize: 0,
        oemcount: count,
        lapic: LAPIC_ADDR,
        reserved: 0,
    };
    let mut config = table.as_slice().to_vec();
    config.extend_from_slice(&entries);
    table.checksum = checksum(&config);
    config[7] = table.checksum;

    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        physptr: (start.raw_value() + mpf_size as u64) as u32,
        length: 1, // in 16-byte units
        specification: MPC_SPEC_REV,
        ..Default::default()
    };
    mpf.checksum = checksum(mpf.as_slice());
    let mut out = mpf.as_slice().to_vec();
    out.extend_from_slice(&config);
    out
}

/// Writes the MP table for `num_cpus` vCPUs with APIC ids 0..num_cpus.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let start = GuestAddress(EBDA_START);
    mem.write_slice(&build(num_cpus, start), start)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn table_is_well_formed_and_lists_every_cpu() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, 3).unwrap();
        let mut mpf = [0u8; 16];
        mem.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&mpf[..4], b"_MP_");
        assert_eq!(sum(&mpf), 0, "floating pointer checksum");
        let physptr = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(physptr)).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(physptr)).unwrap();
        assert_eq!(sum(&table), 0, "config table checksum");
        let count = u16::from_le_bytes([hdr[34], hdr[35]]);
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
        assert!(physptr + len as u64 <= 0xa0000, "fits below the VGA hole");

        // Walk the entries like a guest does.
        let mut off = 44;
        let mut cpus = vec![];
        let mut ioapic = None;
        let mut pin_of_irq0 = None;
        while off < len {
            match table[off] {
                MP_PROCESSOR => {
                    cpus.push((table[off + 1], table[off + 3]));
                    off += 20;
                }
                MP_IOAPIC => {
                    ioapic = Some(u32::from_le_bytes(
                        table[off + 4..off + 8].try_into().unwrap(),
                    ));
                    off += 8;
                }
                MP_INTSRC => {
                    if table[off + 5] == 0 {
                        pin_of_irq0 = Some(table[off + 7]);
                    }
                    off += 8;
                }
                _ => off += 8,
            }
        }
        assert_eq!(
            cpus,
            vec![(0, 3), (1, 1), (2, 1)],
            "BSP flagged, all enabled"
        );
        assert_eq!(ioapic, Some(IOAPIC_ADDR));
        assert_eq!(pin_of_irq0, Some(2));
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::TooManyCpus(255))
        ));
        setup_mptable(&mem, MAX_CPUS).unwrap();
    }
}

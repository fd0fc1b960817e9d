//! Register state of the boot vCPU at kernel entry, for both entry modes:
//! - PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info` (Xen PVH ABI);
//! - 64-bit Linux boot protocol: long mode with the first 4 GiB identity-mapped,
//!   RSI = zero page, CS = 0x10, DS/ES/SS = 0x18 (Documentation/arch/x86/boot.rst).
//!
//! Secondary vCPUs are not touched: with the in-kernel irqchip they wait for INIT/SIPI, which
//! is how Linux (and the reference guest) start them.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selectors of the boot GDT: the Linux boot protocol names 0x10 and 0x18.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode at the PVH note's entry, EBX = start info.
    Pvh,
    /// Long mode, RSI = zero page.
    Linux64,
}

/// A GDT entry from the packed flags/access word (as in `GDT_ENTRY` of Linux).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn code_segment_flags(mode: EntryMode) -> u16 {
    match mode {
        EntryMode::Pvh => 0xc09b,     // present, 32-bit (D=1), 4 KiB granularity
        EntryMode::Linux64 => 0xa09b, // present, long mode (L=1)
    }
}

/// The boot GDT: null, null, code (0x10), data (0x18), TSS (0x20).
pub fn boot_gdt(mode: EntryMode) -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(code_segment_flags(mode), 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The segment-register view (hidden part) of a GDT entry.
fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

/// Writes the boot GDT, an empty IDT and (for a 64-bit entry) identity page tables, and
/// returns the special registers that go with them.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, vm_memory::GuestMemoryError> {
    let gdt = boot_gdt(mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let code = segment_from_gdt(gdt[2], BOOT_CS);
    let data = segment_from_gdt(gdt[3], BOOT_DS);
    let tss = segment_from_gdt(gdt[4], BOOT_TSS);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if mode == EntryMode::Linux64 {
        write_identity_page_tables(mem)?;
        sregs.cr3 = PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    Ok(sregs)
}

/// Identity-maps the first 4 GiB with 2 MiB pages: the kernel, the zero page, the command
/// line and the initrd are all below 4 GiB.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPT_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for gib in 0..4u64 {
        let pd = PD_START + gib * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPT_START + gib * 8))?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            mem.write_obj(phys | PRESENT_RW | PAGE_SIZE_2M, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// General registers at entry: RIP = entry, and the boot-info pointer where the protocol
/// wants it.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved-one; IF stays clear
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO_START,
        EntryMode::Linux64 => {
            regs.rsi = ZERO_PAGE_START;
            // A stack is not part of the protocol, but one below the zero page costs nothing
            // and keeps a kernel that pushes early from scribbling over page 0.
            regs.rsp = ZERO_PAGE_START;
            regs.rbp = ZERO_PAGE_START;
        }
    }
    regs
}

/// x87/SSE state at reset values (FCW 0x37f, MXCSR 0x1f80), as after a power-on.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = boot_gdt(EntryMode::Linux64);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[2], BOOT_CS);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.type_),
            (0, 0xffff_ffff, 1, 0, 0xb)
        );
        let cs32 = segment_from_gdt(boot_gdt(EntryMode::Pvh)[2], BOOT_CS);
        assert_eq!((cs32.l, cs32.db, cs32.present), (0, 1, 1));
        let ds = segment_from_gdt(gdt[3], BOOT_DS);
        assert_eq!((ds.type_, ds.s, ds.present, ds.unusable), (3, 1, 1, 0));
    }

    #[test]
    fn long_mode_sregs_and_identity_page_tables() {
        let m = mem();
        let s = setup_sregs(&m, EntryMode::Linux64, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, BOOT_CS);
        assert_eq!(s.ss.selector, BOOT_DS);
        // Walk the tables for a few addresses: each must map to itself.
        for addr in [0u64, 0x1234_5678, 0xbfff_ffff, 0xfee0_0000, 0xffff_ffff] {
            let pml4e: u64 = m
                .read_obj(GuestAddress(PML4_START + ((addr >> 39) & 511) * 8))
                .unwrap();
            let pdpte: u64 = m
                .read_obj(GuestAddress((pml4e & !0xfff) + ((addr >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((addr >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB page");
            assert_eq!((pde & !0x1f_ffff & !0xfff) | (addr & 0x1f_ffff), addr);
        }
        let gdt2: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 16)).unwrap();
        assert_eq!(gdt2, boot_gdt(EntryMode::Linux64)[2]);
    }

    #[test]
    fn pvh_entry_is_32bit_protected_mode_without_paging() {
        let s = setup_sregs(&mem(), EntryMode::Pvh, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(s.efer, 0);
        assert_eq!(s.cs.db, 1);
        let r = boot_regs(EntryMode::Pvh, 0x10_0000);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0000, PVH_INFO_START, 2));
        let r = boot_regs(EntryMode::Linux64, 0x100_0000);
        assert_eq!(r.rsi, ZERO_PAGE_START);
    }
}

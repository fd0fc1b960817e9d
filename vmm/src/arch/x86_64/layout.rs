//! The guest-physical memory map apfvm builds. Low addresses follow the PC conventions the
//! Linux boot code expects; everything the VMM writes lies below 1 MiB, where no kernel
//! image is loaded.

/// GDT written for the boot vCPU (5 entries, see `regs::BOOT_GDT`).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: interrupts stay off until the guest installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MODLIST_START: u64 = 0x6e00;
/// Linux "zero page" (`struct boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables for a 64-bit entry: PML4, PDPT, and four page directories
/// (the first 4 GiB with 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line; 4 KiB of room (Linux x86 accepts up to 2 KiB by default).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x1000;
/// Extended BIOS data area: the MP table lives here, where Linux scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory: kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO hole below 4 GiB (I/O APIC at 0xfec00000, local APIC at 0xfee00000).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// TSS and identity-map pages some KVM implementations (Intel VMX) need for real mode.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

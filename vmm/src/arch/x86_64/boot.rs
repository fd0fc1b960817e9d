//! What the kernel is handed at entry: the memory map (e820), the command line, the initrd,
//! in the shape its boot protocol wants (PVH `hvm_start_info`, or the Linux zero page).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::loader::LoadedKernel;
use super::regs::EntryMode;

// The PVH memory map must not run into the module list (room for 128 entries of 24 bytes).
const _: () = assert!(PVH_MEMMAP_START + 24 * 128 <= PVH_MODLIST_START);

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const KERNEL_LOADFLAGS_LOADED_HIGH: u8 = 0x1;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map for RAM laid out by `memory::ram_ranges`.
pub fn e820_map(ram: &[(GuestAddress, usize)]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for &(start, len) in ram {
        let end = start.raw_value() + len as u64;
        let start = start.raw_value().max(HIMEM_START);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// An initrd already copied into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Where an initrd of `size` bytes goes: as high as possible in low RAM (page-aligned), as
/// Linux loaders do, so it stays clear of the kernel's own early allocations.
pub fn initrd_address(low_ram_end: u64, kernel_end: u64, size: u64, max_addr: u64) -> Option<u64> {
    let top = low_ram_end.min(max_addr.saturating_add(1));
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end.next_multiple_of(PAGE_SIZE)).then_some(addr)
}

/// Highest address a kernel accepts an initrd at (`initrd_addr_max`); ELF kernels have no
/// header, so the protocol default applies.
pub fn initrd_max_address(kernel: &LoadedKernel) -> u64 {
    match kernel.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max),
        _ => 0x37ff_ffff,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("writing boot parameters: {0}")]
    Configurator(#[from] linux_loader::configurator::Error),
}

/// Writes the boot information for `kernel`'s entry mode. The command line must already be at
/// CMDLINE_START.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    e820: &[E820Entry],
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    match kernel.mode {
        EntryMode::Pvh => write_pvh_start_info(mem, e820, initrd),
        EntryMode::Linux64 => write_zero_page(mem, kernel, e820, cmdline_len, initrd),
    }
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr.raw_value(),
            size: i.size,
            ..Default::default()
        })
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    e820: &[E820Entry],
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.loadflags |= KERNEL_LOADFLAGS_LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr.raw_value() as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::loader::KernelFormat;
    use vm_memory::Bytes;

    #[test]
    fn e820_covers_low_ram_reserves_ebda_and_skips_the_mmio_gap() {
        let ram = [
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), 1 << 30),
        ];
        let map = e820_map(&ram);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: EBDA_START,
                    size: 0x400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: MMIO_GAP_START - HIMEM_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: MMIO_GAP_END,
                    size: 1 << 30,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_never_over_the_kernel() {
        assert_eq!(
            initrd_address(0x800_0000, 0x200_0000, 0x1800, u64::MAX),
            Some(0x7ffe000)
        );
        assert_eq!(
            initrd_address(0x800_0000, 0x200_0000, 0x1000, 0x3ff_ffff),
            Some(0x3fff000)
        );
        assert_eq!(
            initrd_address(0x300_0000, 0x200_0000, 0x200_0000, u64::MAX),
            None
        );
    }

    fn kernel(mode: EntryMode) -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            mode,
            entry: GuestAddress(0x100_0000),
            end: 0x200_0000,
            setup_header: None,
        }
    }

    /// 64 MiB of RAM with boot info for `mode` and an initrd at 48 MiB.
    fn boot_info_in_64m(mode: EntryMode, cmdline_len: usize) -> GuestMemoryMmap {
        let ram = [(GuestAddress(0), 64 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ram).unwrap();
        let initrd = InitrdPlacement {
            addr: GuestAddress(0x300_0000),
            size: 0x1234,
        };
        write_boot_info(
            &mem,
            &kernel(mode),
            &e820_map(&ram),
            cmdline_len,
            Some(initrd),
        )
        .unwrap();
        mem
    }

    #[test]
    fn zero_page_has_header_cmdline_e820_and_initrd() {
        let mem = boot_info_in_64m(EntryMode::Linux64, 42);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x300_0000, 0x1234)
        );
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn pvh_start_info_points_at_cmdline_memmap_and_module() {
        let mem = boot_info_in_64m(EntryMode::Pvh, 0);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let m: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!((m.addr, m.type_), (HIMEM_START, E820_RAM));
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
    }
}

//! Guest RAM: where it sits in the guest-physical space, and what backs it on the host.
//!
//! Backends: anonymous private memory (the default), or a memfd (shared, so that later work
//! can hand it to another process or punch holes in it). Both are mapped with vm-memory and
//! registered with KVM one memslot per region.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MemoryBackend {
    /// Private anonymous memory.
    #[default]
    Anon,
    /// A memfd mapped shared.
    Memfd,
    /// `apfvm restore` only: the snapshot's memory file mapped privately, as Firecracker's File
    /// backend. The host kernel reads each page from the file on first touch (copy on write;
    /// the file is never written). No pager: userfaultfd cannot register file mappings.
    File,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("creating the memfd for guest RAM: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the memfd for guest RAM to {size} bytes: {source}")]
    MemfdSize { size: u64, source: std::io::Error },
    #[error("mapping {size} bytes of guest RAM: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("--memory file maps a snapshot's memory file: it needs `apfvm restore`")]
    FileNeedsSnapshot,
    #[error("mapping the memory file {path}: {source}")]
    MapFile {
        path: String,
        source: std::io::Error,
    },
    #[error("registering guest RAM with KVM (slot {slot}): {source}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Guest-physical ranges of `size` bytes of RAM: below the 32-bit MMIO gap first, the rest
/// from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// End of the RAM below the MMIO gap: where kernels, initrds and boot data must fit.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let name = CString::new("apfvm-guest-ram").expect("no NUL in name");
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::MemfdSize { size, source })?;
    Ok(file)
}

/// Maps `size` bytes of guest RAM with the chosen backend.
pub fn create_guest_memory(
    size: u64,
    backend: MemoryBackend,
) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = ram_ranges(size);
    let map_err = |source| MemoryError::Map { size, source };
    match backend {
        MemoryBackend::Anon => GuestMemoryMmap::from_ranges(&ranges).map_err(map_err),
        MemoryBackend::Memfd => {
            let file = create_memfd(size)?;
            let mut offset = 0u64;
            let mut with_files = Vec::new();
            for (addr, len) in ranges {
                let f = file.try_clone().map_err(MemoryError::Memfd)?;
                with_files.push((addr, len, Some(FileOffset::new(f, offset))));
                offset += len as u64;
            }
            GuestMemoryMmap::from_ranges_with_files(&with_files).map_err(map_err)
        }
        MemoryBackend::File => Err(MemoryError::FileNeedsSnapshot),
    }
}

/// Maps `path` (a memory file of exactly `size` bytes, in RAM-offset order) privately as guest
/// RAM: pages come from the file on first touch, writes stay in this process.
pub fn map_file_private(size: u64, path: &std::path::Path) -> Result<GuestMemoryMmap, MemoryError> {
    let map_err = |source: std::io::Error| MemoryError::MapFile {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(map_err)?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in ram_ranges(size) {
        let f = file.try_clone().map_err(map_err)?;
        let mapping = vm_memory::MmapRegion::<()>::build(
            Some(FileOffset::new(f, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_NORESERVE | libc::MAP_PRIVATE,
        )
        .map_err(|e| map_err(std::io::Error::other(e.to_string())))?;
        let region = vm_memory::GuestRegionMmap::new(mapping, addr).ok_or_else(|| {
            map_err(std::io::Error::other(
                "region does not fit the guest's address space",
            ))
        })?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| map_err(std::io::Error::other(e.to_string())))
}

/// Registers every region of `mem` as a KVM memslot.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("region start is inside the region");
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping behind `host` lives as long as `mem`, which the VM keeps for its
        // whole life, and it is not unmapped while KVM may access it.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let big = MMIO_GAP_START + (1 << 30);
        assert_eq!(
            ram_ranges(big),
            vec![
                (GuestAddress(0), MMIO_GAP_START as usize),
                (GuestAddress(MMIO_GAP_END), 1 << 30)
            ]
        );
        assert_eq!(low_ram_end(big), MMIO_GAP_START);
    }

    #[test]
    fn memfd_backend_is_shared_file_memory() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Memfd).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let fo = region.file_offset().expect("memfd-backed");
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        fo.file().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        let anon = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        assert!(
            anon.find_region(GuestAddress(0))
                .unwrap()
                .file_offset()
                .is_none()
        );
    }
}

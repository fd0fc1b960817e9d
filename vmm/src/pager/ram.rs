//! Guest RAM as the pager sees it: host mappings indexed by page number in "RAM offset"
//! space (the RAM regions laid end to end, which is also the layout of a memory image).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::PAGE_SIZE;

struct RamRegion {
    gpa: u64,
    host: usize,
    len: u64,
    ram_offset: u64,
    /// The backing file and the region's offset in it (memfd backend).
    file: Option<(Arc<std::fs::File>, u64)>,
}

pub struct RamLayout {
    regions: Vec<RamRegion>,
    pages: u64,
}

/// A run of consecutive pages inside one host mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRun {
    pub first_page: u64,
    pub pages: u64,
    pub host: usize,
}

impl RamLayout {
    pub fn new(mem: &GuestMemoryMmap) -> RamLayout {
        let mut regions = Vec::new();
        let mut ram_offset = 0;
        for region in mem.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .expect("region start is inside the region") as usize;
            let file = region
                .file_offset()
                .map(|fo| (fo.arc().clone(), fo.start()));
            regions.push(RamRegion {
                gpa: region.start_addr().raw_value(),
                host,
                len: region.len(),
                ram_offset,
                file,
            });
            ram_offset += region.len();
        }
        RamLayout {
            regions,
            pages: ram_offset / PAGE_SIZE as u64,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Host mappings to register with userfaultfd: (address, length).
    pub fn host_ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.regions.iter().map(|r| (r.host, r.len as usize))
    }

    fn region_of_page(&self, page: u64) -> &RamRegion {
        let offset = page * PAGE_SIZE as u64;
        self.regions
            .iter()
            .find(|r| offset >= r.ram_offset && offset < r.ram_offset + r.len)
            .expect("page inside guest RAM")
    }

    pub fn host_addr(&self, page: u64) -> usize {
        let r = self.region_of_page(page);
        r.host + (page * PAGE_SIZE as u64 - r.ram_offset) as usize
    }

    /// The page a host address (as reported by a fault) belongs to.
    pub fn page_of_host(&self, addr: usize) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| addr >= r.host && addr < r.host + r.len as usize)
            .map(|r| (r.ram_offset + (addr - r.host) as u64) / PAGE_SIZE as u64)
    }

    /// The page of a guest-physical address, if it is RAM.
    pub fn page_of_gpa(&self, gpa: GuestAddress) -> Option<u64> {
        let gpa = gpa.raw_value();
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
            .map(|r| (r.ram_offset + gpa - r.gpa) / PAGE_SIZE as u64)
    }

    /// Which pages are already in host memory (written before paging began, e.g. by the
    /// loader): they never fault, but the pager must still be able to evict them.
    pub fn resident_pages(&self) -> std::io::Result<Vec<bool>> {
        let mut resident = Vec::with_capacity(self.pages as usize);
        for r in &self.regions {
            let mut core = vec![0u8; r.len as usize / PAGE_SIZE];
            // SAFETY: [host, host+len) is one mapping of guest RAM; `core` has one byte per
            // page of it, as mincore writes.
            let rc = unsafe {
                libc::mincore(
                    r.host as *mut libc::c_void,
                    r.len as usize,
                    core.as_mut_ptr(),
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            resident.extend(core.iter().map(|b| b & 1 == 1));
        }
        Ok(resident)
    }

    /// Pages that read as zeros without being read: in anonymous memory (no backing file),
    /// and neither present nor swapped out (/proc/self/pagemap bits 63 and 62), so never
    /// written. A snapshot leaves them as holes without touching them.
    pub fn untouched_anon_pages(&self) -> std::io::Result<Vec<bool>> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let mut untouched = Vec::with_capacity(self.pages as usize);
        for r in &self.regions {
            let pages = r.len as usize / PAGE_SIZE;
            if r.file.is_some() {
                untouched.extend(std::iter::repeat_n(false, pages));
                continue;
            }
            let mut entries = vec![0u8; pages * 8];
            let offset = (r.host / PAGE_SIZE) as u64 * 8;
            pagemap.read_exact_at(&mut entries, offset)?;
            untouched.extend(entries.chunks_exact(8).map(|e| {
                let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                entry & (PRESENT | SWAPPED) == 0
            }));
        }
        Ok(untouched)
    }

    /// Splits sorted page numbers into runs that are contiguous in one host mapping.
    pub fn runs(&self, sorted_pages: &[u64]) -> Vec<HostRun> {
        let mut runs: Vec<HostRun> = Vec::new();
        for &page in sorted_pages {
            let host = self.host_addr(page);
            if let Some(last) = runs.last_mut()
                && last.first_page + last.pages == page
                && last.host + (last.pages as usize) * PAGE_SIZE == host
            {
                last.pages += 1;
                continue;
            }
            runs.push(HostRun {
                first_page: page,
                pages: 1,
                host,
            });
        }
        runs
    }

    /// Takes a run of pages away from the guest. KVM's mmu notifier drops its mapping too;
    /// the next access faults into userfaultfd as a missing page.
    pub fn drop_pages(&self, run: HostRun) -> std::io::Result<()> {
        let len = run.pages as usize * PAGE_SIZE;
        let region = self.region_of_page(run.first_page);
        match &region.file {
            // Shared file memory: MADV_DONTNEED would only unmap, leaving the page in the
            // page cache; punching a hole really removes it.
            Some((file, file_start)) => {
                let offset = file_start + (run.host - region.host) as u64;
                // SAFETY: fallocate on an fd we own, with a range inside the file.
                let rc = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            }
            None => {
                // SAFETY: the run lies inside a guest RAM mapping owned by this VM; dropping
                // its contents is the point (the pager saved them first).
                let rc = unsafe {
                    libc::madvise(run.host as *mut libc::c_void, len, libc::MADV_DONTNEED)
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryBackend, create_guest_memory};

    #[test]
    fn page_numbers_map_between_gpa_host_and_runs() {
        let mem = create_guest_memory(16 << 20, MemoryBackend::Anon).unwrap();
        let ram = RamLayout::new(&mem);
        assert_eq!(ram.pages(), 4096);
        let host0 = ram.host_addr(0);
        assert_eq!(ram.page_of_host(host0 + 5 * PAGE_SIZE + 17), Some(5));
        assert_eq!(ram.page_of_gpa(GuestAddress(0x3000)), Some(3));
        assert_eq!(ram.page_of_gpa(GuestAddress(16 << 20)), None);
        let runs = ram.runs(&[1, 2, 3, 7, 8]);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].first_page, runs[0].pages), (1, 3));
        assert_eq!((runs[1].first_page, runs[1].pages), (7, 2));
    }

    #[test]
    fn only_never_written_anonymous_pages_count_as_untouched() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        mem.write_obj(7u8, GuestAddress(0x3000)).unwrap();
        let untouched = RamLayout::new(&mem).untouched_anon_pages().unwrap();
        assert_eq!(untouched.len(), 1024);
        assert!(!untouched[3]);
        assert_eq!(untouched.iter().filter(|u| !**u).count(), 1);
        let shared = create_guest_memory(4 << 20, MemoryBackend::Memfd).unwrap();
        let untouched = RamLayout::new(&shared).untouched_anon_pages().unwrap();
        assert!(
            untouched.iter().all(|u| !u),
            "file-backed pages are always read"
        );
    }

    #[test]
    fn dropped_pages_read_back_as_zero_for_both_backends() {
        use vm_memory::Bytes;
        for backend in [MemoryBackend::Anon, MemoryBackend::Memfd] {
            let mem = create_guest_memory(4 << 20, backend).unwrap();
            mem.write_obj(0x1234_5678u32, GuestAddress(0x2000)).unwrap();
            mem.write_obj(0x1111u32, GuestAddress(0x3000)).unwrap();
            let ram = RamLayout::new(&mem);
            ram.drop_pages(ram.runs(&[2])[0]).unwrap();
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
                0,
                "{backend:?}"
            );
            assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0x1111);
        }
    }
}

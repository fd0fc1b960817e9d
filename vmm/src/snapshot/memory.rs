//! The memory file: guest RAM in RAM-offset order, sparse. Writing reads resident pages from
//! the guest mapping and the others from the pager (never through the mapping), and leaves
//! a hole for every all-zero page; restoring reads only the file's data extents
//! (SEEK_DATA/SEEK_HOLE) into guest RAM, so holes cost nothing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::GuestMemoryMmap;

use crate::pager::{PAGE_SIZE, Pager, RamLayout, SnapshotPage, data_extents};

const PAGE: u64 = PAGE_SIZE as u64;

/// Writes `mem` into `file` (empty, sized here); returns how many pages hold data.
pub fn write(file: &File, mem: &GuestMemoryMmap, pager: Option<&Pager>) -> io::Result<u64> {
    let ram = RamLayout::new(mem);
    file.set_len(ram.pages() * PAGE)?;
    let mut writer = SparseWriter {
        file,
        ram: &ram,
        run: None,
        data_pages: 0,
    };
    match pager {
        Some(pager) => pager.visit_pages_for_snapshot(&mut |page, contents| match contents {
            SnapshotPage::Mapped => writer.mapped(page),
            SnapshotPage::Data(bytes) => writer.data(page, bytes),
        })?,
        None => {
            let untouched = ram.untouched_anon_pages()?;
            for page in 0..ram.pages() {
                if untouched[page as usize] {
                    writer.flush()?;
                } else {
                    writer.mapped(page)?;
                }
            }
        }
    }
    writer.flush()?;
    Ok(writer.data_pages)
}

/// Collects consecutive non-zero mapped pages into one write.
struct SparseWriter<'a> {
    file: &'a File,
    ram: &'a RamLayout,
    /// (first page, pages, host address of the first page)
    run: Option<(u64, u64, usize)>,
    data_pages: u64,
}

impl SparseWriter<'_> {
    fn mapped(&mut self, page: u64) -> io::Result<()> {
        let host = self.ram.host_addr(page);
        // SAFETY: `host` is the start of a page of guest RAM, mapped for the VM's lifetime;
        // the VM is paused, so no vCPU writes it while it is read (and a page the pager calls
        // mapped is present: reading it cannot fault).
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE_SIZE) };
        if is_zero(bytes) {
            return self.flush();
        }
        self.data_pages += 1;
        match &mut self.run {
            Some((first, pages, start))
                if *first + *pages == page && *start + (*pages as usize) * PAGE_SIZE == host =>
            {
                *pages += 1;
                Ok(())
            }
            _ => {
                self.flush()?;
                self.run = Some((page, 1, host));
                Ok(())
            }
        }
    }

    fn data(&mut self, page: u64, bytes: &[u8; PAGE_SIZE]) -> io::Result<()> {
        self.flush()?;
        if is_zero(bytes) {
            return Ok(());
        }
        self.data_pages += 1;
        self.file.write_all_at(bytes, page * PAGE)
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some((first, pages, host)) = self.run.take() {
            // SAFETY: the run is `pages` consecutive pages of one host mapping of guest RAM
            // (checked as it grew), all present; see `mapped`.
            let bytes = unsafe {
                std::slice::from_raw_parts(host as *const u8, pages as usize * PAGE_SIZE)
            };
            self.file.write_all_at(bytes, first * PAGE)?;
        }
        Ok(())
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    // Word-wise: the compiler vectorizes this; a byte loop would be several times slower.
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits at alignment.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Fills guest RAM from a memory file of exactly RAM's size: only its data extents are read,
/// holes stay as they are (fresh anonymous memory: zeros).
pub fn fill(file: &File, mem: &GuestMemoryMmap) -> io::Result<()> {
    let ram = RamLayout::new(mem);
    for (start, end) in data_extents(file, ram.pages() * PAGE)? {
        read_extent(file, &ram, start, end)?;
    }
    Ok(())
}

/// Reads file bytes [start, end) into guest RAM at the same RAM offsets, one host mapping at
/// a time.
fn read_extent(file: &File, ram: &RamLayout, start: u64, end: u64) -> io::Result<()> {
    // Extents from the file system are block-aligned; widen to whole pages.
    let mut at = start / PAGE * PAGE;
    let end = end.div_ceil(PAGE) * PAGE;
    for run in ram.runs(&(at / PAGE..end / PAGE).collect::<Vec<_>>()) {
        let len = run.pages as usize * PAGE_SIZE;
        // SAFETY: the run is `pages` pages of one host mapping of guest RAM, which no vCPU
        // runs on yet (the VM is being restored).
        let dest = unsafe { std::slice::from_raw_parts_mut(run.host as *mut u8, len) };
        file.read_exact_at(dest, run.first_page * PAGE)?;
        at += len as u64;
    }
    debug_assert_eq!(at, end);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress};

    fn guest(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn zero_pages_become_holes_and_come_back_as_zeros() {
        let mem = guest(64 * PAGE_SIZE);
        mem.write_slice(&[0xab; 10], GuestAddress(3 * PAGE))
            .unwrap();
        mem.write_slice(&[0xcd; PAGE_SIZE * 2], GuestAddress(40 * PAGE))
            .unwrap();
        mem.write_slice(&[1], GuestAddress(63 * PAGE + 4095))
            .unwrap();
        let dir = tempdir();
        let path = dir.join("memory");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        assert_eq!(write(&file, &mem, None).unwrap(), 4);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 64 * PAGE);
        assert!(
            meta.blocks() * 512 <= 8 * PAGE,
            "sparse: {} blocks",
            meta.blocks()
        );

        let restored = guest(64 * PAGE_SIZE);
        fill(&file, &restored).unwrap();
        let mut a = vec![0u8; 64 * PAGE_SIZE];
        let mut b = vec![0u8; 64 * PAGE_SIZE];
        mem.read_slice(&mut a, GuestAddress(0)).unwrap();
        restored.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b, "restored RAM differs");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("apfvm-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

//! Where pages come from the first time the guest touches them: zero-fill, or a raw image
//! of guest RAM (`--memory-image`), read lazily page by page so a guest can be restored
//! without reading its whole memory up front.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open memory image {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("reading page at offset {offset:#x} of memory image {path}: {source}")]
    Read {
        path: String,
        offset: u64,
        source: std::io::Error,
    },
}

/// The source of pages that have never been resident.
pub enum PageStore {
    Zero,
    /// A file laid out like guest RAM: offset = RAM offset (see `RamLayout`), such as a
    /// snapshot's memory file. Pages past its end and in its holes read as zeros without a
    /// read.
    Image {
        file: File,
        path: PathBuf,
        len: u64,
        /// Where the file has data, [start, end) sorted (SEEK_DATA/SEEK_HOLE at open).
        data: Vec<(u64, u64)>,
    },
}

/// The data extents of `file` up to `len`, [start, end) in order: everything else is a hole.
pub fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut offset = 0u64;
    while offset < len {
        let Some(data) = seek(file, offset, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if data < hole {
            extents.push((data, hole));
        }
        offset = hole;
    }
    Ok(extents)
}

/// lseek with SEEK_DATA/SEEK_HOLE; None past the last data (ENXIO).
fn seek(file: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open fd has no memory effects.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    if at < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(at as u64))
}

impl PageStore {
    pub fn image(path: &Path) -> Result<PageStore, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let data = data_extents(&file, len).map_err(open_err)?;
        Ok(PageStore::Image {
            file,
            path: path.to_path_buf(),
            len,
            data,
        })
    }

    /// Fills `page` with the initial contents of the page at `ram_offset`.
    pub fn read_page(&self, ram_offset: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        self.read_run(ram_offset, page)
    }

    /// Fills `buf` (whole pages) with the initial contents from `ram_offset` on: one read
    /// for the part of the run that lies in the file (holes read as zeros).
    pub fn read_run(&self, ram_offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        buf.fill(0);
        if let PageStore::Image {
            file,
            path,
            len,
            data,
        } = self
        {
            if ram_offset >= *len || !overlaps(data, ram_offset, buf.len() as u64) {
                return Ok(());
            }
            let want = (*len - ram_offset).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..want], ram_offset)
                .map_err(|source| StoreError::Read {
                    path: path.display().to_string(),
                    offset: ram_offset,
                    source,
                })?;
        }
        Ok(())
    }

    /// The pages whose contents are not zeros without a read (the file's data extents),
    /// within `pages`, in order: what prefetching "all" streams in.
    pub fn data_pages(&self, pages: u64) -> Vec<u64> {
        match self {
            PageStore::Zero => Vec::new(),
            PageStore::Image { data, .. } => data
                .iter()
                .flat_map(|&(s, e)| s / PAGE_SIZE as u64..e.div_ceil(PAGE_SIZE as u64))
                .filter(|&p| p < pages)
                .collect(),
        }
    }

    /// Whether the page at `ram_offset` is known to be zeros without reading it.
    pub fn is_hole(&self, ram_offset: u64) -> bool {
        match self {
            PageStore::Zero => true,
            PageStore::Image { len, data, .. } => {
                ram_offset >= *len || !overlaps(data, ram_offset, PAGE_SIZE as u64)
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PageStore::Zero => "zero-fill".to_string(),
            PageStore::Image { path, .. } => format!("image {}", path.display()),
        }
    }
}

/// Whether [start, start+len) overlaps any of the sorted extents.
fn overlaps(extents: &[(u64, u64)], start: u64, len: u64) -> bool {
    let end = start + len;
    // The first extent that ends after `start` is the only candidate.
    let i = extents.partition_point(|&(_, e)| e <= start);
    extents.get(i).is_some_and(|&(s, _)| s < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_zeros_without_a_read() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(f.as_path())
            .unwrap();
        file.set_len(64 * PAGE_SIZE as u64).unwrap();
        file.write_all_at(&[5u8; PAGE_SIZE], 10 * PAGE_SIZE as u64)
            .unwrap();
        let store = PageStore::image(f.as_path()).unwrap();
        assert!(!store.is_hole(10 * PAGE_SIZE as u64));
        assert!(store.is_hole(40 * PAGE_SIZE as u64), "a hole in the file");
        assert!(store.is_hole(64 * PAGE_SIZE as u64), "past its end");
        let mut page = [0xffu8; PAGE_SIZE];
        store.read_page(10 * PAGE_SIZE as u64, &mut page).unwrap();
        assert!(page.iter().all(|b| *b == 5));
        store.read_page(40 * PAGE_SIZE as u64, &mut page).unwrap();
        assert!(page.iter().all(|b| *b == 0));
        assert!(overlaps(&[(0, 10), (20, 30)], 25, 1));
        assert!(!overlaps(&[(0, 10), (20, 30)], 10, 10));
        assert!(overlaps(&[(0, 10), (20, 30)], 15, 10));
    }

    #[test]
    fn image_pages_come_from_the_file_and_zeros_past_its_end() {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut data = vec![0u8; PAGE_SIZE + 100];
        data[5] = 7;
        data[PAGE_SIZE + 99] = 9;
        std::fs::write(f.as_path(), &data).unwrap();
        let store = PageStore::image(f.as_path()).unwrap();
        let mut page = [0xffu8; PAGE_SIZE];
        store.read_page(0, &mut page).unwrap();
        assert_eq!((page[5], page[6]), (7, 0));
        store.read_page(PAGE_SIZE as u64, &mut page).unwrap();
        assert_eq!((page[99], page[100], page[4095]), (9, 0, 0));
        store.read_page(8 * PAGE_SIZE as u64, &mut page).unwrap();
        assert!(page.iter().all(|b| *b == 0));
        PageStore::Zero.read_page(0, &mut page).unwrap();
        assert!(matches!(
            PageStore::image(Path::new("/nonexistent/image")),
            Err(StoreError::Open { .. })
        ));
    }
}

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
    /// A file laid out like guest RAM: offset = RAM offset (see `RamLayout`). Pages past its
    /// end read as zeros.
    Image {
        file: File,
        path: PathBuf,
        len: u64,
    },
}

impl PageStore {
    pub fn image(path: &Path) -> Result<PageStore, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        Ok(PageStore::Image {
            file,
            path: path.to_path_buf(),
            len,
        })
    }

    /// Fills `page` with the initial contents of the page at `ram_offset`.
    pub fn read_page(&self, ram_offset: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        match self {
            PageStore::Zero => page.fill(0),
            PageStore::Image { file, path, len } => {
                page.fill(0);
                if ram_offset < *len {
                    let want = (*len - ram_offset).min(PAGE_SIZE as u64) as usize;
                    file.read_exact_at(&mut page[..want], ram_offset)
                        .map_err(|source| StoreError::Read {
                            path: path.display().to_string(),
                            offset: ram_offset,
                            source,
                        })?;
                }
            }
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match self {
            PageStore::Zero => "zero-fill".to_string(),
            PageStore::Image { path, .. } => format!("image {}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

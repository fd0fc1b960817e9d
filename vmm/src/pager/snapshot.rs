//! What a snapshot needs from a paused pager: every page's contents without reading a
//! missing page through the guest mapping (that would fault it in, and a paused pager copies
//! nothing).

use std::io;

use super::pages::PageContents;
use super::{PAGE_SIZE, Pager};

/// One page, as a snapshot writer gets it.
pub enum SnapshotPage<'a> {
    /// In the guest mapping: read it there.
    Mapped,
    /// Not mapped; these are its contents (a saved copy, or what the store holds for it).
    Data(&'a [u8; PAGE_SIZE]),
}

impl Pager {
    /// Calls `visit` for every page of guest RAM in order, with the page table locked (no
    /// fault is served meanwhile). Meant for a paused VM: no vCPU runs and no copy is made.
    pub fn visit_pages_for_snapshot(
        &self,
        visit: &mut dyn FnMut(u64, SnapshotPage<'_>) -> io::Result<()>,
    ) -> io::Result<()> {
        let pages = self.shared.lock_pages();
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        for page in 0..self.shared.ram.pages() {
            match pages.contents(page) {
                PageContents::Mapped => visit(page, SnapshotPage::Mapped)?,
                PageContents::Saved(data) => visit(page, SnapshotPage::Data(data))?,
                PageContents::Store => {
                    self.shared
                        .store
                        .read_page(page * PAGE_SIZE as u64, &mut buf)
                        .map_err(io::Error::other)?;
                    visit(page, SnapshotPage::Data(&buf))?
                }
            }
        }
        Ok(())
    }
}

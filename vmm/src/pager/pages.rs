//! The per-page state machine, as plain data: each page's state, the saved copies of
//! evicted pages and the pages that faulted while being evicted. Every transition is one
//! method that returns what the caller must do next; the caller holds the table's lock for
//! the call, which is what keeps eviction and fault-in of one page from losing data. No
//! userfaultfd and no system calls here, so the rules are tested on their own.

use std::collections::{HashMap, HashSet};

use super::PAGE_SIZE;

/// The contents of one page.
pub(super) type PageData = Box<[u8; PAGE_SIZE]>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PageState {
    /// Missing, never served by the pager.
    Untouched,
    /// A fetch is queued or running.
    InFlight,
    /// Mapped: served by the pager, or written by the loader before paging began.
    Resident,
    /// Write-protected, being saved and dropped.
    Evicting,
    /// Dropped; its contents are in the swap store.
    Evicted,
}

/// Where a page's contents are (see `PageTable::contents`).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PageContents<'a> {
    Mapped,
    Saved(&'a PageData),
    Store,
}

/// What a missing-page fault needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MissingFault {
    /// The page is missing: the caller now owns its fetch (the page is InFlight).
    Fetch,
    /// A fetch is queued or running; its copy wakes this faulter too.
    AlreadyInFlight,
    /// The page is being evicted: `finish_eviction` hands it back for a fetch from the
    /// saved copy ("invalidation wins, the fault is served again").
    RefaultAfterEviction,
    /// The message raced the copy that already served the page: the faulter only needs a
    /// wake.
    AlreadyResident,
}

pub(super) struct PageTable {
    state: Vec<PageState>,
    /// Contents of evicted pages.
    swap: HashMap<u64, PageData>,
    /// Pages that faulted while being evicted: fetched as soon as the eviction is done.
    refault_after_eviction: HashSet<u64>,
}

impl PageTable {
    /// One entry per page of guest RAM: resident (in memory before paging began) or not.
    pub fn new(resident: impl IntoIterator<Item = bool>) -> PageTable {
        let state = resident
            .into_iter()
            .map(|resident| {
                if resident {
                    PageState::Resident
                } else {
                    PageState::Untouched
                }
            })
            .collect();
        PageTable {
            state,
            swap: HashMap::new(),
            refault_after_eviction: HashSet::new(),
        }
    }

    fn state_mut(&mut self, page: u64) -> &mut PageState {
        &mut self.state[page as usize]
    }

    pub fn on_missing_fault(&mut self, page: u64) -> MissingFault {
        let state = self.state_mut(page);
        match *state {
            PageState::Untouched | PageState::Evicted => {
                *state = PageState::InFlight;
                MissingFault::Fetch
            }
            PageState::InFlight => MissingFault::AlreadyInFlight,
            PageState::Evicting => {
                self.refault_after_eviction.insert(page);
                MissingFault::RefaultAfterEviction
            }
            PageState::Resident => MissingFault::AlreadyResident,
        }
    }

    /// The owner of an InFlight page's fetch is about to copy it in: its saved copy if it
    /// was evicted, else None (read it from the store).
    pub fn take_for_serving(&mut self, page: u64) -> Option<PageData> {
        debug_assert_eq!(
            self.state[page as usize],
            PageState::InFlight,
            "page {page}"
        );
        self.swap.remove(&page)
    }

    /// The page is mapped. Its waiters must be woken only after this: a guest that goes on
    /// to evict this very page must find it evictable.
    pub fn mark_resident(&mut self, page: u64) {
        *self.state_mut(page) = PageState::Resident;
    }

    /// Takes the resident ones among `pages` for eviction (Evicting); returns them sorted.
    /// The others are missing, in flight or being evicted already, and stay as they are.
    pub fn begin_eviction(&mut self, pages: &[u64]) -> Vec<u64> {
        let mut chosen: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|&page| {
                let state = self.state_mut(page);
                let resident = *state == PageState::Resident;
                if resident {
                    *state = PageState::Evicting;
                }
                resident
            })
            .collect();
        chosen.sort_unstable();
        chosen
    }

    /// Stores the saved copies of pages taken by `begin_eviction`, now dropped. Returns the
    /// pages that faulted meanwhile: they are InFlight again and the caller must fetch them.
    pub fn finish_eviction(&mut self, saved: Vec<(u64, PageData)>) -> Vec<u64> {
        let mut refetch = Vec::new();
        for (page, data) in saved {
            debug_assert_eq!(
                self.state[page as usize],
                PageState::Evicting,
                "page {page}"
            );
            self.swap.insert(page, data);
            if self.refault_after_eviction.remove(&page) {
                *self.state_mut(page) = PageState::InFlight;
                refetch.push(page);
            } else {
                *self.state_mut(page) = PageState::Evicted;
            }
        }
        refetch
    }

    /// Whether a write-protect fault is held by an eviction: the writer is released once the
    /// page is gone, and then faults it back in. Any other write-protect fault is stale and
    /// the caller releases it at once.
    pub fn on_wp_fault(&self, page: u64) -> bool {
        self.state[page as usize] == PageState::Evicting
    }

    /// The pages eviction may take, in page order.
    pub fn resident_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.state
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == PageState::Resident)
            .map(|(page, _)| page as u64)
    }

    /// Takes the never-present pages among `pages` for a prefetch (InFlight, owned by the
    /// caller, who copies them in and marks them resident); returns them sorted. A page the
    /// guest has written, or wrote and then had evicted, or that a fault is fetching, is left
    /// alone: prefetch never overwrites what the guest did.
    pub fn claim_untouched(&mut self, pages: &[u64]) -> Vec<u64> {
        let mut claimed: Vec<u64> = pages
            .iter()
            .copied()
            .filter(|&page| {
                let state = self.state_mut(page);
                let untouched = *state == PageState::Untouched;
                if untouched {
                    *state = PageState::InFlight;
                }
                untouched
            })
            .collect();
        claimed.sort_unstable();
        claimed
    }

    /// Where a page's contents are, for a snapshot of a paused pager: the guest mapping
    /// (resident, or write-protected mid-eviction), a saved copy (evicted, or evicted and
    /// now waiting for its fetch), or the store (never served).
    pub fn contents(&self, page: u64) -> PageContents<'_> {
        match self.state[page as usize] {
            PageState::Resident | PageState::Evicting => PageContents::Mapped,
            PageState::Evicted | PageState::InFlight | PageState::Untouched => {
                match self.swap.get(&page) {
                    Some(data) => PageContents::Saved(data),
                    None => PageContents::Store,
                }
            }
        }
    }

    #[cfg(test)]
    fn state(&self, page: u64) -> PageState {
        self.state[page as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MissingFault::*;
    use PageState::*;

    fn page_of(byte: u8) -> PageData {
        Box::new([byte; PAGE_SIZE])
    }

    /// Pages 0 and 2 resident (loaded before paging), 1 and 3 not.
    fn table() -> PageTable {
        PageTable::new([true, false, true, false])
    }

    /// Evicts `page` with `byte` as its contents, with no fault during the eviction.
    fn evict(table: &mut PageTable, page: u64, byte: u8) {
        assert_eq!(table.begin_eviction(&[page]), [page]);
        assert!(
            table
                .finish_eviction(vec![(page, page_of(byte))])
                .is_empty()
        );
    }

    #[test]
    fn starts_from_residency() {
        let t = table();
        assert_eq!(
            (0..4).map(|p| t.state(p)).collect::<Vec<_>>(),
            [Resident, Untouched, Resident, Untouched]
        );
        assert_eq!(t.resident_pages().collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn a_first_fault_fetches_from_the_store_and_the_page_becomes_resident() {
        let mut t = table();
        assert_eq!(t.on_missing_fault(1), Fetch);
        assert_eq!(t.state(1), InFlight);
        assert!(
            t.take_for_serving(1).is_none(),
            "never evicted: from the store"
        );
        t.mark_resident(1);
        assert_eq!(t.state(1), Resident);
        assert_eq!(t.resident_pages().collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn a_fault_on_an_in_flight_page_coalesces() {
        let mut t = table();
        assert_eq!(t.on_missing_fault(3), Fetch);
        assert_eq!(t.on_missing_fault(3), AlreadyInFlight);
        assert_eq!(t.state(3), InFlight);
    }

    #[test]
    fn a_fault_on_a_resident_page_only_needs_a_wake() {
        let mut t = table();
        assert_eq!(t.on_missing_fault(0), AlreadyResident);
        assert_eq!(t.state(0), Resident);
    }

    #[test]
    fn eviction_takes_only_resident_pages_and_saves_them() {
        let mut t = table();
        assert_eq!(t.on_missing_fault(1), Fetch);
        // 1 in flight, 3 untouched: not taken; the result is sorted.
        assert_eq!(t.begin_eviction(&[2, 3, 1, 0]), [0, 2]);
        assert_eq!((t.state(0), t.state(2)), (Evicting, Evicting));
        assert!(t.begin_eviction(&[0]).is_empty(), "already being evicted");
        let refetch = t.finish_eviction(vec![(0, page_of(0xa0)), (2, page_of(0xa2))]);
        assert!(refetch.is_empty());
        assert_eq!((t.state(0), t.state(2)), (Evicted, Evicted));
        assert!(t.resident_pages().next().is_none());
    }

    #[test]
    fn an_evicted_page_is_served_from_its_saved_copy_once() {
        let mut t = table();
        evict(&mut t, 2, 0x42);
        assert_eq!(t.on_missing_fault(2), Fetch);
        assert_eq!(t.take_for_serving(2).unwrap()[..], [0x42; PAGE_SIZE]);
        t.mark_resident(2);
        evict(&mut t, 2, 0x43);
        assert_eq!(t.on_missing_fault(2), Fetch);
        assert_eq!(
            t.take_for_serving(2).unwrap()[..],
            [0x43; PAGE_SIZE],
            "the latest copy"
        );
    }

    #[test]
    fn a_fault_racing_an_eviction_is_served_again_from_the_saved_copy() {
        let mut t = table();
        assert_eq!(t.begin_eviction(&[0, 2]), [0, 2]);
        // The fault arrives while the page is being saved and dropped: nothing to fetch yet.
        assert_eq!(t.on_missing_fault(2), RefaultAfterEviction);
        assert_eq!(
            t.on_missing_fault(2),
            RefaultAfterEviction,
            "twice: one refetch"
        );
        assert_eq!(t.state(2), Evicting);
        let refetch = t.finish_eviction(vec![(0, page_of(0xa0)), (2, page_of(0xa2))]);
        assert_eq!(refetch, [2], "only the page that faulted");
        assert_eq!((t.state(0), t.state(2)), (Evicted, InFlight));
        // Faults until the refetch is done coalesce with it.
        assert_eq!(t.on_missing_fault(2), AlreadyInFlight);
        assert_eq!(t.take_for_serving(2).unwrap()[..], [0xa2; PAGE_SIZE]);
        t.mark_resident(2);
        assert_eq!(t.state(2), Resident);
        // The next eviction of the page does not refetch it again.
        evict(&mut t, 2, 0xb2);
        assert_eq!(t.state(2), Evicted);
    }

    #[test]
    fn a_write_protect_fault_is_held_only_by_an_eviction() {
        let mut t = table();
        assert!(!t.on_wp_fault(0), "resident: stale, release it");
        assert_eq!(t.begin_eviction(&[0]), [0]);
        assert!(t.on_wp_fault(0), "held until the page is gone");
        assert!(t.finish_eviction(vec![(0, page_of(0))]).is_empty());
        assert!(
            !t.on_wp_fault(0),
            "evicted: stale, the writer faults the page back in"
        );
    }

    #[test]
    fn contents_never_come_from_the_mapping_of_a_missing_page() {
        let mut t = table();
        evict(&mut t, 0, 7);
        assert_eq!(t.on_missing_fault(1), Fetch);
        assert_eq!(t.contents(0), PageContents::Saved(&page_of(7)));
        assert_eq!(t.contents(1), PageContents::Store);
        assert_eq!(t.contents(2), PageContents::Mapped);
        assert_eq!(t.contents(3), PageContents::Store);
        // Evicted, then faulted: the fetch is queued, the copy is still the contents.
        assert_eq!(t.on_missing_fault(0), Fetch);
        assert_eq!(t.contents(0), PageContents::Saved(&page_of(7)));
        assert_eq!(t.begin_eviction(&[2]), [2]);
        assert_eq!(
            t.contents(2),
            PageContents::Mapped,
            "write-protected, still mapped"
        );
    }

    #[test]
    fn prefetch_claims_only_pages_that_were_never_present() {
        let mut t = table();
        evict(&mut t, 0, 7);
        assert_eq!(t.on_missing_fault(3), Fetch);
        // 0: evicted (was present), 1: untouched, 2: resident, 3: a fault fetches it.
        assert_eq!(t.claim_untouched(&[3, 2, 1, 0]), [1]);
        assert_eq!(t.state(1), InFlight);
        assert_eq!(
            t.on_missing_fault(1),
            AlreadyInFlight,
            "a fault waits for the prefetch"
        );
        t.mark_resident(1);
        assert_eq!(t.claim_untouched(&[1]), Vec::<u64>::new(), "once");
    }
}

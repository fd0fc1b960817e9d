//! Prefetch for a lazy restore: a thread streams pages in ahead of the guest's faults, in the
//! order it is given (the recorded working set, or every page with data). It takes the list in
//! chunks, sorted within each chunk so that reads are large and sequential, and copies every
//! contiguous run with one UFFDIO_COPY. It claims pages under the page lock, and only pages
//! that were never present (`PageTable::claim_untouched`): a page the guest wrote, or wrote
//! and then had evicted, is never overwritten with snapshot data. Faults do not wait behind
//! it: a page a vCPU or a parked task needs goes through the fault path at once, and a fault
//! on a page the prefetch has claimed is woken by the prefetch's copy.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::ram::HostRun;
use super::stats::PagerStats;
use super::{PAGE_SIZE, Pager, PagerError, Shared, host_ptr};
use crate::seccomp::ThreadKind;

/// Pages taken from the list at a time (sorted within): 2 MiB.
const CHUNK_PAGES: usize = 512;
/// The longest run read and copied in one go: 256 KiB.
const RUN_PAGES: u64 = 64;

impl Pager {
    /// Starts streaming `pages` in (in that order, see the module docs).
    pub fn start_prefetch(&self, pages: Vec<u64>) -> Result<(), PagerError> {
        let total = self.shared.ram.pages();
        let pages: Vec<u64> = pages.into_iter().filter(|&p| p < total).collect();
        self.spawn("pager-prefetch", ThreadKind::PagerWorker, move |s| {
            s.prefetch_loop(&pages)
        })
    }

    /// The pages the pager's store has data for: what `--prefetch all` streams in.
    pub fn store_data_pages(&self) -> Vec<u64> {
        self.shared.store.data_pages(self.shared.ram.pages())
    }
}

/// Splits sorted pages into runs of consecutive pages, at most `RUN_PAGES` long.
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &page in sorted {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == page && *n < RUN_PAGES => *n += 1,
            _ => runs.push((page, 1)),
        }
    }
    runs
}

impl Shared {
    fn prefetch_loop(self: Arc<Self>, pages: &[u64]) {
        let mut buf = vec![0u8; RUN_PAGES as usize * PAGE_SIZE];
        for chunk in pages.chunks(CHUNK_PAGES) {
            let mut sorted = chunk.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            for (first, n) in runs(&sorted) {
                if !self.prefetch_run(first, n, &mut buf) {
                    return;
                }
            }
        }
        log::info!(
            "pager: prefetch done: {} pages",
            self.stats.prefetched.load(Ordering::Relaxed)
        );
    }

    /// Copies in the never-present pages of [first, first+n); false when the pager stops or
    /// fails.
    fn prefetch_run(&self, first: u64, n: u64, buf: &mut [u8]) -> bool {
        let Some(_op) = self.wait_to_copy() else {
            return false;
        };
        let started = Instant::now();
        let wanted: Vec<u64> = (first..first + n).collect();
        let claimed = self.lock_pages().claim_untouched(&wanted);
        if claimed.is_empty() {
            return true;
        }
        // One read from the first to the last claimed page, one copy per contiguous part.
        let (lo, hi) = (claimed[0], claimed[claimed.len() - 1] + 1);
        let span = &mut buf[..(hi - lo) as usize * PAGE_SIZE];
        if let Err(e) = self.store.read_run(lo * PAGE_SIZE as u64, span) {
            self.fatal(e.to_string());
            return false;
        }
        // Runs contiguous in one host mapping (a run of RAM offsets may cross the MMIO gap).
        let host_runs = self.ram.runs(&claimed);
        for run in &host_runs {
            let offset = (run.first_page - lo) as usize * PAGE_SIZE;
            let len = run.pages as usize * PAGE_SIZE;
            if let Err(message) = self.copy_run(run, &span[offset..offset + len]) {
                self.fatal(message);
                return false;
            }
        }
        {
            let mut pages = self.lock_pages();
            for &page in &claimed {
                pages.mark_resident(page);
            }
        }
        for run in &host_runs {
            self.wake(run.first_page, run.pages);
        }
        PagerStats::add(&self.stats.prefetched, claimed.len() as u64);
        PagerStats::add(&self.stats.bytes_in, (claimed.len() * PAGE_SIZE) as u64);
        PagerStats::add(&self.stats.prefetch_ns, started.elapsed().as_nanos() as u64);
        true
    }

    /// Waits until a copy may start (not paused); None once the pager stops.
    fn wait_to_copy(&self) -> Option<super::lifecycle::Busy<'_>> {
        let lifecycle = &self.lifecycle;
        let mut control = lifecycle.lock();
        loop {
            if control.stopping {
                return None;
            }
            if control.may_copy_async() {
                return Some(lifecycle.begin_locked(&mut control));
            }
            control = lifecycle
                .work
                .wait(control)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// UFFDIO_COPY of `data` (the run's pages) into the run, without waking (the caller
    /// wakes once the pages are marked resident).
    fn copy_run(&self, run: &HostRun, data: &[u8]) -> Result<(), String> {
        let mut done = 0;
        while done < data.len() {
            let len = data.len() - done;
            // SAFETY: the run is `data.len()` bytes of guest RAM in one host mapping registered
            // with this userfaultfd, so `run.host + done` has `len` bytes left in it, and
            // `data[done..]` is `len` readable bytes.
            let result = unsafe {
                self.uffd.copy(
                    data[done..].as_ptr().cast(),
                    host_ptr(run.host + done),
                    len,
                    false,
                )
            };
            match result {
                Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) => done += n,
                // A page there already (cannot happen for a claimed page): skip it.
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    done += PAGE_SIZE
                }
                Err(e) => {
                    let page = run.first_page + (done / PAGE_SIZE) as u64;
                    return Err(format!("prefetch: UFFDIO_COPY of page {page} failed: {e}"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_consecutive_and_bounded() {
        assert_eq!(runs(&[1, 2, 3, 7, 8, 10]), [(1, 3), (7, 2), (10, 1)]);
        let long: Vec<u64> = (0..150).collect();
        assert_eq!(runs(&long), [(0, 64), (64, 64), (128, 22)]);
        assert!(runs(&[]).is_empty());
    }
}

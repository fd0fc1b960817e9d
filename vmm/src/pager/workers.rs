//! Fetches for asynchronous faults: the due-time queue they wait in (where the latency
//! model and the deliberate reordering take effect), the workers that take them when due,
//! and `serve`, the one place a page is copied in (UFFDIO_COPY) and its waiters woken.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use super::lifecycle::Busy;
use super::stats::PagerStats;
use super::{PAGE_SIZE, Shared, host_ptr};
use crate::metrics::StallCounter;

/// A fetch taken from the queue: the page, and when its fault arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fetch {
    pub page: u64,
    pub arrived: Instant,
}

/// What the queue has for a worker.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Due(Fetch),
    /// Nothing due before this time.
    At(Instant),
    Empty,
}

/// Fetches by due time, ties in the order queued. A page has at most one live entry: a
/// cancelled entry stays in the heap (a heap cannot remove from the middle) and is skipped
/// when it comes up.
#[derive(Default)]
pub(super) struct FetchQueue {
    /// (due, sequence, page, arrived).
    heap: BinaryHeap<Reverse<(Instant, u64, u64, Instant)>>,
    /// The sequence number of each queued page's live entry.
    live: HashMap<u64, u64>,
    sequence: u64,
}

impl FetchQueue {
    /// Queues a fetch of `page`, due at `due`; returns how many fetches are queued.
    pub fn push(&mut self, page: u64, due: Instant, arrived: Instant) -> usize {
        self.sequence += 1;
        self.live.insert(page, self.sequence);
        self.heap.push(Reverse((due, self.sequence, page, arrived)));
        self.live.len()
    }

    /// Takes the first fetch if it is due at `now`, or whatever its due time with `any`.
    pub fn next(&mut self, now: Instant, any: bool) -> Next {
        while let Some(&Reverse((due, sequence, page, arrived))) = self.heap.peek() {
            let live = self.live.get(&page) == Some(&sequence);
            if live && due > now && !any {
                return Next::At(due);
            }
            self.heap.pop();
            if live {
                self.live.remove(&page);
                return Next::Due(Fetch { page, arrived });
            }
        }
        Next::Empty
    }

    /// Takes `page`'s fetch out of the queue; false if it was not queued.
    pub fn cancel(&mut self, page: u64) -> bool {
        self.live.remove(&page).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// Who waits for a page being served.
pub(super) enum Waiter<'a> {
    /// A vCPU thread, stalled until the page is there.
    Sync(&'a StallCounter),
    /// A kworker (KVM async PF) or any other thread.
    Async,
}

impl Shared {
    pub(super) fn enqueue(&self, page: u64, due: Instant, arrived: Instant) {
        let queued = self.lifecycle.lock().queue.push(page, due, arrived);
        self.stats
            .queue_depth_max
            .fetch_max(queued as u64, std::sync::atomic::Ordering::Relaxed);
        self.lifecycle.work.notify_one();
    }

    pub(super) fn worker_loop(self: Arc<Self>) {
        while let Some((fetch, op)) = self.next_fetch() {
            let sync = self.sync_waiter(fetch.page);
            let waiter = sync.as_deref().map_or(Waiter::Async, Waiter::Sync);
            self.serve(fetch.page, fetch.arrived, waiter, op);
        }
    }

    /// The stall counter of a vCPU thread whose fault on `page` waited in the queue
    /// (`PagerConfig::sync_latency`).
    pub(super) fn sync_waiter(&self, page: u64) -> Option<Arc<StallCounter>> {
        if !self.config.sync_latency {
            return None;
        }
        self.sync_waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&page)
    }

    /// Waits for a fetch that may be served now: due (or the pager drains) and the pager
    /// not paused. None once the pager stops.
    fn next_fetch(&self) -> Option<(Fetch, Busy<'_>)> {
        let lifecycle = &self.lifecycle;
        let mut control = lifecycle.lock();
        loop {
            if control.stopping {
                return None;
            }
            let next = if control.may_copy_async() {
                let draining = control.draining;
                control.queue.next(Instant::now(), draining)
            } else {
                Next::Empty
            };
            control = match next {
                Next::Due(fetch) => {
                    let op = lifecycle.begin_locked(&mut control);
                    drop(control);
                    // Another worker may now have an earlier fetch to wait for.
                    lifecycle.work.notify_one();
                    return Some((fetch, op));
                }
                Next::At(due) => {
                    let wait = due.saturating_duration_since(Instant::now());
                    lifecycle
                        .work
                        .wait_timeout(control, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                Next::Empty => lifecycle
                    .work
                    .wait(control)
                    .unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    /// Copies a page in (from its saved copy if it was evicted, else from the store) and
    /// wakes every thread waiting for it. The caller owns the page's fetch (InFlight);
    /// `_op` counts the copy as work in progress until it returns.
    pub(super) fn serve(&self, page: u64, arrived: Instant, waiter: Waiter, _op: Busy<'_>) {
        let saved = self.lock_pages().take_for_serving(page);
        let from_swap = saved.is_some();
        let data = match saved {
            Some(data) => data,
            None => {
                let mut data = Box::new([0u8; PAGE_SIZE]);
                if let Err(e) = self.store.read_page(page * PAGE_SIZE as u64, &mut data) {
                    self.fatal(e.to_string());
                    return;
                }
                data
            }
        };
        let dst = host_ptr(self.ram.host_addr(page));
        loop {
            // SAFETY: `data` is a full page; `dst` is a page-aligned page of guest RAM
            // registered with this userfaultfd.
            let result = unsafe { self.uffd.copy(data.as_ptr().cast(), dst, PAGE_SIZE, false) };
            match result {
                Ok(_) => break,
                // Already present (another path populated it): the waiters just need a wake.
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => break,
                // The address space changed under the copy: try again.
                Err(userfaultfd::Error::PartiallyCopied(_)) => continue,
                Err(e) => {
                    self.fatal(format!("UFFDIO_COPY of page {page} failed: {e}"));
                    return;
                }
            }
        }
        // Resident before the wake: a guest that goes on to evict this very page must find
        // it evictable.
        self.lock_pages().mark_resident(page);
        self.wake(page, 1);
        let stats = &self.stats;
        let counter = if from_swap {
            &stats.restored_from_swap
        } else {
            if let Some(touches) = self
                .first_touches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                touches.push(page);
            }
            &stats.served_from_store
        };
        PagerStats::add(counter, 1);
        PagerStats::add(&stats.bytes_in, PAGE_SIZE as u64);
        let waited = arrived.elapsed();
        match waiter {
            Waiter::Sync(stalls) => {
                stalls.add(waited);
                stats.service_sync.record(waited);
            }
            Waiter::Async => stats.service_async.record(waited),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryBackend, create_guest_memory};
    use crate::pager::test_support::{eventually_at_least, pager_reporting_fatal};
    use crate::pager::{PageStore, Pager, PagerConfig};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    fn fetch(page: u64, arrived: Instant) -> Next {
        Next::Due(Fetch { page, arrived })
    }

    #[test]
    fn fetches_come_out_by_due_time_then_in_the_order_queued() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = FetchQueue::default();
        assert_eq!(q.push(1, ms(20), t0), 1);
        assert_eq!(q.push(2, ms(10), ms(1)), 2);
        assert_eq!(q.push(3, ms(10), ms(2)), 3);
        assert_eq!(q.next(ms(5), false), Next::At(ms(10)));
        assert_eq!(q.next(ms(10), false), fetch(2, ms(1)));
        assert_eq!(q.next(ms(10), false), fetch(3, ms(2)));
        assert_eq!(q.next(ms(10), false), Next::At(ms(20)));
        assert_eq!(q.next(ms(10), true), fetch(1, t0), "draining: due or not");
        assert_eq!(q.next(ms(99), false), Next::Empty);
        assert!(q.is_empty());
    }

    #[test]
    fn a_cancelled_fetch_is_skipped() {
        let t0 = Instant::now();
        let mut q = FetchQueue::default();
        q.push(1, t0, t0);
        q.push(2, t0, t0);
        assert!(q.cancel(1));
        assert!(!q.cancel(1), "once");
        assert_eq!(q.next(t0, false), fetch(2, t0));
        assert!(q.is_empty());
        assert_eq!(q.next(t0, false), Next::Empty);
        // Queued again after a cancel: only the new entry counts.
        q.push(2, t0 + Duration::from_secs(1), t0);
        assert!(q.cancel(2));
        q.push(2, t0 + Duration::from_secs(2), t0);
        assert_eq!(q.next(t0, false), Next::At(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn first_touch_pages_come_from_the_memory_image_but_loaded_pages_stay() {
        let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut bytes = vec![0u8; 3 * PAGE_SIZE];
        bytes[PAGE_SIZE..PAGE_SIZE + 8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        bytes[2 * PAGE_SIZE..2 * PAGE_SIZE + 8].copy_from_slice(&42u64.to_le_bytes());
        std::fs::write(image.as_path(), &bytes).unwrap();
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        mem.write_obj(7u64, GuestAddress(2 * PAGE_SIZE as u64))
            .unwrap(); // "loaded"
        let store = PageStore::image(image.as_path()).unwrap();
        let pager = Pager::start(
            &mem,
            store,
            PagerConfig::default(),
            Box::new(|m| panic!("{m}")),
        )
        .unwrap();
        let read = |page: u64| {
            mem.read_obj::<u64>(GuestAddress(page * PAGE_SIZE as u64))
                .unwrap()
        };
        assert_eq!(read(1), 0x1122_3344_5566_7788, "from the image");
        assert_eq!(read(2), 7, "written before paging: not replaced");
        assert_eq!(read(5), 0, "past the image's end");
        assert!(eventually_at_least(&pager.stats().served_from_store, 2));
        assert_eq!(pager.stats().served_from_store.load(Ordering::Relaxed), 2);
        // A loaded page is resident like any other: it can be evicted and comes back intact.
        assert_eq!(pager.evict_range(2, 1), 1);
        assert_eq!(read(2), 7, "restored from the saved copy");
        assert!(eventually_at_least(&pager.stats().restored_from_swap, 1));
    }

    #[test]
    fn a_store_read_error_is_fatal_and_names_the_file_and_the_page() {
        let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(image.as_path(), vec![1u8; 8 * PAGE_SIZE]).unwrap();
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let store = PageStore::image(image.as_path()).unwrap();
        let (pager, fatal) = pager_reporting_fatal(&mem, store);
        // The image shrinks under the running VM: page 6 can no longer be read in full.
        image.as_file().set_len(5 * PAGE_SIZE as u64 + 100).unwrap();
        let toucher = {
            let mem = mem.clone();
            std::thread::spawn(move || mem.read_obj::<u8>(GuestAddress(6 * PAGE_SIZE as u64)))
        };
        let message = fatal
            .recv_timeout(Duration::from_secs(5))
            .expect("fatal error");
        let path = image.as_path().display().to_string();
        assert!(message.contains(&path), "{message}");
        assert!(message.contains("offset 0x6000"), "{message}");
        // Stopping releases the toucher (the VM is gone by then); it must not hang.
        drop(pager);
        toucher.join().unwrap().unwrap();
    }
}

//! The userfaultfd reader: reads fault messages, tells synchronous faults (a vCPU thread
//! stalled outright) from asynchronous ones, serves the former at once and hands the latter
//! to the due-time queue, batched for reverse order. It never waits on a lock other than
//! briefly, so faults keep being read whatever the workers and the evictor do.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use userfaultfd::{Event, FaultKind};

use super::pages::MissingFault;
use super::stats::PagerStats;
use super::workers::Waiter;
use super::{FaultOrder, Shared};
use crate::metrics::StallCounter;

/// How long a partial reverse-order batch waits for more faults.
const REVERSE_BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Gap between completions of one reverse batch, so that the guest sees them in order.
const REVERSE_SPACING: Duration = Duration::from_micros(500);

/// Asynchronous faults read but not queued yet: (page, when the fault arrived).
type Batch = Vec<(u64, Instant)>;

impl Shared {
    pub(super) fn reader_loop(self: Arc<Self>) {
        let mut rng = SmallRng::seed_from_u64(self.config.seed);
        let mut batch = Batch::new();
        let mut batch_deadline: Option<Instant> = None;
        let mut events = userfaultfd::EventBuffer::new(64);
        loop {
            // Checked before every poll: the wake that ended an earlier poll may have been
            // consumed already.
            if self.lifecycle.lock().stopping {
                return;
            }
            let timeout_ms = batch_deadline.map_or(-1, |d| {
                d.saturating_duration_since(Instant::now()).as_millis() as i32 + 1
            });
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.lifecycle.reader_wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            let (stopping, draining) = {
                let control = self.lifecycle.lock();
                (control.stopping, control.draining)
            };
            if stopping {
                return;
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let _ = self.lifecycle.reader_wake.read();
            }
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    self.fatal(format!("poll on the userfaultfd failed: {err}"));
                    return;
                }
            }
            if fds[0].revents & libc::POLLIN != 0 {
                let read = match self.uffd.read_events(&mut events) {
                    Ok(read) => read.collect::<Vec<_>>(),
                    Err(e) => {
                        self.fatal(format!("reading userfaultfd events: {e}"));
                        return;
                    }
                };
                for event in read {
                    match event {
                        Ok(Event::Pagefault {
                            kind,
                            addr,
                            thread_id,
                            ..
                        }) => {
                            let Some(page) = self.ram.page_of_host(addr as usize) else {
                                continue;
                            };
                            match kind {
                                FaultKind::WriteProtected => self.on_wp_fault(page),
                                _ => self.on_missing_fault(page, thread_id.as_raw(), &mut batch),
                            }
                        }
                        Ok(other) => log::debug!("pager: ignoring event {other:?}"),
                        Err(e) => {
                            self.fatal(format!("bad userfaultfd event: {e}"));
                            return;
                        }
                    }
                }
            }
            // Hand collected async faults to the workers, in batches for reverse order.
            if draining {
                for (page, arrived) in batch.drain(..) {
                    self.serve_async_now(page, arrived);
                }
                batch_deadline = None;
                continue;
            }
            match self.config.order {
                FaultOrder::Arrival => {
                    for (page, arrived) in batch.drain(..) {
                        let latency = self.config.latency.sample(&mut rng);
                        if latency.is_zero() {
                            // Nothing to wait for: a handoff to a worker would only add a
                            // cross-thread wake-up to the fault's latency.
                            self.serve_async_now(page, arrived);
                        } else {
                            self.enqueue(page, arrived + latency, arrived);
                        }
                    }
                }
                FaultOrder::Reverse(n) => {
                    if !batch.is_empty() && batch_deadline.is_none() {
                        batch_deadline = Some(Instant::now() + REVERSE_BATCH_WINDOW);
                    }
                    let expired = batch_deadline.is_some_and(|d| Instant::now() >= d);
                    if batch.len() >= n || (expired && !batch.is_empty()) {
                        let base = Instant::now() + self.config.latency.sample(&mut rng);
                        let len = batch.len();
                        for (i, (page, arrived)) in batch.drain(..).enumerate() {
                            let due = base + REVERSE_SPACING * (len - 1 - i) as u32;
                            self.enqueue(page, due, arrived);
                        }
                        batch_deadline = None;
                    } else if expired {
                        batch_deadline = None;
                    }
                }
            }
        }
    }

    /// Serves an asynchronous fault here and now, or, while paused, queues it due now so
    /// that it is served right after the resume.
    fn serve_async_now(&self, page: u64, arrived: Instant) {
        match self.lifecycle.try_begin_async_copy() {
            Some(op) => {
                let sync = self.sync_waiter(page);
                let waiter = sync.as_deref().map_or(Waiter::Async, Waiter::Sync);
                self.serve(page, arrived, waiter, op)
            }
            None => self.enqueue(page, arrived, arrived),
        }
    }

    /// Decides what a missing-page fault needs: a fetch (at once for a vCPU thread, else
    /// added to `batch`), nothing (another fetch or an eviction covers it), or a wake.
    fn on_missing_fault(&self, page: u64, thread: i32, batch: &mut Batch) {
        let arrived = Instant::now();
        let stats = &self.stats;
        PagerStats::add(&stats.faults, 1);
        let sync = self.sync_thread(thread);
        let outcome = self.lock_pages().on_missing_fault(page);
        match outcome {
            MissingFault::Fetch => match &sync {
                Some(stalls) if self.config.sync_latency => {
                    // Waits out the latency model like an asynchronous fault; the worker
                    // that serves it counts the wait on the vCPU's stall counter.
                    PagerStats::add(&stats.faults_sync, 1);
                    self.sync_waiting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(page, stalls.clone());
                    batch.push((page, arrived));
                }
                Some(stalls) => {
                    PagerStats::add(&stats.faults_sync, 1);
                    self.serve_sync(page, arrived, stalls);
                }
                None => {
                    PagerStats::add(&stats.faults_async, 1);
                    batch.push((page, arrived));
                }
            },
            MissingFault::AlreadyInFlight => {
                PagerStats::add(&stats.faults_coalesced, 1);
                // A stalled vCPU must not wait out the latency of a fetch another thread
                // started: take that fetch over if it is still waiting. If it is not, a
                // copy is under way or due now, and wakes this faulter too.
                if let Some(stalls) = &sync
                    && !self.config.sync_latency
                    && self.unqueue(page, batch)
                {
                    self.serve_sync(page, arrived, stalls);
                }
            }
            MissingFault::RefaultAfterEviction => PagerStats::add(&stats.faults_coalesced, 1),
            MissingFault::AlreadyResident => {
                PagerStats::add(&stats.faults_coalesced, 1);
                self.wake(page, 1);
            }
        }
    }

    fn serve_sync(&self, page: u64, arrived: Instant, stalls: &StallCounter) {
        let op = self.lifecycle.begin_sync_copy();
        self.serve(page, arrived, Waiter::Sync(stalls), op);
    }

    /// Takes `page`'s waiting fetch out of `batch` or the queue; false if it is in neither.
    fn unqueue(&self, page: u64, batch: &mut Batch) -> bool {
        if let Some(i) = batch.iter().position(|&(p, _)| p == page) {
            batch.remove(i);
            return true;
        }
        self.lifecycle.lock().queue.cancel(page)
    }

    /// A write hit a page: held if an eviction is under way (the writer is released once the
    /// page is gone and then faults it back in), else stale and released now.
    fn on_wp_fault(&self, page: u64) {
        PagerStats::add(&self.stats.faults_wp, 1);
        let held = self.lock_pages().on_wp_fault(page);
        if !held {
            self.wake(page, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryBackend, create_guest_memory};
    use crate::pager::test_support::{eventually_at_least, read_in_thread, zero_pager};
    use crate::pager::{LatencyModel, PagerConfig};
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_sync_fault_takes_over_a_queued_fetch_instead_of_waiting_out_its_latency() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let config = PagerConfig {
            latency: LatencyModel::parse("100s").unwrap(),
            ..Default::default()
        };
        let pager = Arc::new(zero_pager(&mem, config));
        let addr = GuestAddress(0x20_0000);
        let async_toucher = read_in_thread(&mem, addr);
        assert!(eventually_at_least(&pager.stats().faults_async, 1));
        let stalls = Arc::new(StallCounter::default());
        let (done, returned) = std::sync::mpsc::channel();
        let sync_toucher = {
            let (mem, pager, stalls) = (mem.clone(), pager.clone(), stalls.clone());
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                pager.add_sync_thread(unsafe { libc::gettid() }, stalls);
                done.send(mem.read_obj::<u64>(addr).unwrap()).unwrap();
            })
        };
        let value = returned
            .recv_timeout(Duration::from_secs(10))
            .expect("the sync toucher is served at once");
        assert_eq!(value, 0);
        sync_toucher.join().unwrap();
        assert_eq!(async_toucher.join().unwrap(), 0, "woken by the same copy");
        // Counters are bumped after the copy that woke the touchers; once the pager has
        // stopped they are final (and a cancelled fetch would have been served by then).
        pager.stop();
        let stats = pager.stats();
        assert_eq!(
            stats.served_from_store.load(Ordering::Relaxed),
            1,
            "one copy, for both faults: the cancelled fetch is not served again"
        );
        assert_eq!(stats.faults_coalesced.load(Ordering::Relaxed), 1);
        assert_eq!(stats.service_sync.count(), 1);
        assert_eq!(stalls.faults.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn with_sync_latency_a_sync_fault_waits_out_the_model_and_counts_as_a_stall() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let config = PagerConfig {
            latency: LatencyModel::parse("50ms").unwrap(),
            sync_latency: true,
            ..Default::default()
        };
        let pager = Arc::new(zero_pager(&mem, config));
        let stalls = Arc::new(StallCounter::default());
        let toucher = {
            let (mem, pager, stalls) = (mem.clone(), pager.clone(), stalls.clone());
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                pager.add_sync_thread(unsafe { libc::gettid() }, stalls);
                mem.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap()
            })
        };
        assert_eq!(toucher.join().unwrap(), 0);
        pager.stop();
        let stats = pager.stats();
        assert_eq!(stats.faults_sync.load(Ordering::Relaxed), 1);
        assert_eq!(stats.service_sync.count(), 1);
        assert_eq!(stats.service_async.count(), 0);
        assert_eq!(stalls.faults.load(Ordering::Relaxed), 1);
        // Never before its due time (load can only make it later).
        assert!(
            stalls.ns.load(Ordering::Relaxed) >= 50_000_000,
            "waited {} ns",
            stalls.ns.load(Ordering::Relaxed)
        );
    }
}

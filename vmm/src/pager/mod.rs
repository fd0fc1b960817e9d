//! Host paging of guest RAM with userfaultfd: the part of apfvm that makes pages "not
//! present" and decides when, and in which order, they come back.
//!
//! One guest page fault, async PF on: the guest touches a missing page in user mode → KVM
//! hands the fault to a kworker and tells the guest "not present" → the kworker blocks in
//! userfaultfd → our reader gets the message → the fetch waits out the latency model in the
//! due-time queue → a worker copies the page in (UFFDIO_COPY) → the kworker returns → KVM
//! sends the guest "page ready". Faults raised by vCPU threads themselves are synchronous
//! (guest kernel mode: the vCPU cannot run anything until the page is there), so they skip
//! the latency model and are served at once by the reader, taking over the fetch if another
//! thread's fault on the same page is still waiting in the queue.
//!
//! Every page has one state, changed only under `Shared::pages`' lock, which is what keeps
//! eviction and fault-in of the same page from losing data: eviction only takes Resident
//! pages, a fault on a page being evicted waits for the eviction to finish and is then
//! served from the saved copy ("invalidation wins, the fault is served again"), and writes
//! during an eviction are held by userfaultfd write-protection until the page is gone.
//!
//! Pausing (`Pager::pause`, for a VM that pauses its guest) stops copies and evictions but
//! not the reading of faults: they queue up and complete after `resume`. Teardown first
//! releases everything (`Pager::release_all`: every fetch is served at once), so that no
//! vCPU thread or KVM kworker is left waiting on the pager.
//!
//! One concern per file: `pages` (the per-page state machine, plain data), `reader` (fault
//! messages in), `workers` (the due-time queue and the copies), `evictor` (eviction),
//! `lifecycle` (pause, drain and stop, and the work in progress), `stats`, and the pieces
//! they use: `latency` (the latency model), `ram` (guest RAM by page), `store` (first-touch
//! contents).

mod evictor;
mod latency;
mod lifecycle;
mod pages;
mod prefetch;
mod ram;
mod reader;
mod snapshot;
mod stats;
mod store;
#[cfg(test)]
mod test_support;
mod workers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::metrics::StallCounter;
use crate::seccomp::ThreadKind;
use lifecycle::Lifecycle;
use pages::PageTable;

pub use evictor::EvictPolicy;
pub use latency::{FaultOrder, LatencyError, LatencyModel, parse_duration};
pub use ram::RamLayout;
pub use snapshot::SnapshotPage;
pub use stats::{PagerStats, PagerSummary};
pub use store::{PageStore, StoreError, data_extents};

pub const PAGE_SIZE: usize = 4096;

/// UFFD_FEATURE_WP_HUGETLBFS_SHMEM: write-protection on shared memory (memfd backend); the
/// crate predates it.
const FEATURE_WP_SHMEM: u64 = 1 << 12;

/// How long `Pager::stop` waits for pending fetches to be served.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct PagerConfig {
    pub latency: LatencyModel,
    /// The latency model applies to synchronous faults too (a vCPU in guest kernel mode
    /// waits for a slow disk as well); off, they are served at once.
    pub sync_latency: bool,
    pub order: FaultOrder,
    pub workers: usize,
    pub evict: Option<EvictPolicy>,
    pub seed: u64,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            latency: LatencyModel::default(),
            sync_latency: false,
            order: FaultOrder::default(),
            workers: 2,
            evict: None,
            seed: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    #[error(
        "cannot create a userfaultfd: {0} (needs a kernel with userfaultfd, write-protect \
         support, and permission: root, CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1)"
    )]
    Create(userfaultfd::Error),
    #[error("registering guest RAM with userfaultfd: {0}")]
    Register(userfaultfd::Error),
    #[error("finding the guest RAM pages already in memory (mincore): {0}")]
    Residency(std::io::Error),
    #[error("starting a pager thread: {0}")]
    Thread(std::io::Error),
}

/// What the pager's threads share.
struct Shared {
    uffd: Uffd,
    ram: RamLayout,
    store: PageStore,
    pages: Mutex<PageTable>,
    lifecycle: Lifecycle,
    stats: PagerStats,
    /// Threads whose faults are synchronous (vCPU threads): served without latency, their
    /// wait counted on their stall counter.
    sync_threads: RwLock<HashMap<i32, Arc<StallCounter>>>,
    config: PagerConfig,
    on_fatal: Box<dyn Fn(String) + Send + Sync>,
    /// Pages served from the store, in order, while recording (a lazy restore's working set).
    first_touches: Mutex<Option<Vec<u64>>>,
    /// With `sync_latency`: the stall counters of vCPU threads whose fault waits in the queue.
    sync_waiting: Mutex<HashMap<u64, Arc<StallCounter>>>,
}

/// The running pager; dropping it stops its threads.
pub struct Pager {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<Option<()>>>>,
}

fn host_ptr(addr: usize) -> *mut libc::c_void {
    addr as *mut libc::c_void
}

impl Pager {
    /// Registers all of `mem` with a new userfaultfd and starts the reader, the workers and
    /// (with a policy) the evictor. Pages already written (the loaded kernel, boot data) stay
    /// as they are (and can be evicted); every other page faults in from `store` on first touch.
    /// `on_fatal` is called when paging cannot go on (e.g. the store cannot be read).
    pub fn start(
        mem: &GuestMemoryMmap,
        store: PageStore,
        config: PagerConfig,
        on_fatal: Box<dyn Fn(String) + Send + Sync>,
    ) -> Result<Pager, PagerError> {
        let ram = RamLayout::new(mem);
        let shared_memory = mem.iter().any(|r| r.file_offset().is_some());
        let mut features = FeatureFlags::THREAD_ID | FeatureFlags::PAGEFAULT_FLAG_WP;
        if shared_memory {
            features |=
                FeatureFlags::MISSING_SHMEM | FeatureFlags::from_bits_retain(FEATURE_WP_SHMEM);
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM touches guest RAM from kernel context (GUP): those faults must reach us.
            .user_mode_only(false)
            .require_features(features)
            .create()
            .map_err(PagerError::Create)?;
        for (host, len) in ram.host_ranges() {
            uffd.register_with_mode(
                host_ptr(host),
                len,
                RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
            )
            .map_err(PagerError::Register)?;
        }
        let pages = PageTable::new(ram.resident_pages().map_err(PagerError::Residency)?);
        let shared = Arc::new(Shared {
            uffd,
            store,
            pages: Mutex::new(pages),
            lifecycle: Lifecycle::new().map_err(PagerError::Thread)?,
            stats: PagerStats::default(),
            sync_threads: RwLock::new(HashMap::new()),
            config: config.clone(),
            on_fatal,
            ram,
            first_touches: Mutex::new(None),
            sync_waiting: Mutex::new(HashMap::new()),
        });
        log::info!(
            "pager: {} pages from {}, latency {:?}, order {:?}, {} workers, evict {:?}",
            shared.ram.pages(),
            shared.store.describe(),
            config.latency,
            config.order,
            config.workers,
            config.evict
        );

        let pager = Pager {
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
        };
        pager.spawn("pager-reader", ThreadKind::PagerReader, move |s| {
            s.reader_loop()
        })?;
        for i in 0..config.workers.max(1) {
            pager.spawn(
                &format!("pager-worker{i}"),
                ThreadKind::PagerWorker,
                move |s| s.worker_loop(),
            )?;
        }
        if let Some(policy) = config.evict {
            pager.spawn("pager-evictor", ThreadKind::PagerEvictor, move |s| {
                s.evictor_loop(policy)
            })?;
        }
        Ok(pager)
    }

    fn spawn(
        &self,
        name: &str,
        kind: ThreadKind,
        body: impl FnOnce(Arc<Shared>) + Send + 'static,
    ) -> Result<(), PagerError> {
        let shared = self.shared.clone();
        // A pager thread that dies leaves faults unserved and the guest wedged: stop the VM
        // with an error instead.
        let failed = self.shared.clone();
        let on_failure = Arc::new(move |message: String| failed.fatal(message));
        let handle = crate::thread::spawn(name, kind, on_failure, move || body(shared))
            .map_err(PagerError::Thread)?;
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
        Ok(())
    }

    /// Marks a thread whose faults block a vCPU outright (the vCPU's own thread); the time
    /// it waits for pages is added to `stalls`.
    pub fn add_sync_thread(&self, tid: i32, stalls: Arc<StallCounter>) {
        self.shared
            .sync_threads
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tid, stalls);
    }

    /// Starts recording the pages served from the store (first touches), in order.
    pub fn record_first_touches(&self) {
        let mut touches = self
            .shared
            .first_touches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        touches.get_or_insert_with(Vec::new);
    }

    /// How many first touches were recorded so far.
    pub fn first_touch_count(&self) -> usize {
        let touches = self
            .shared
            .first_touches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        touches.as_ref().map_or(0, Vec::len)
    }

    /// Ends the recording and hands over the pages, in the order they were served.
    pub fn take_first_touches(&self) -> Vec<u64> {
        let mut touches = self
            .shared
            .first_touches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        touches.take().unwrap_or_default()
    }

    /// Evicts the resident pages among `count` pages from guest-physical page frame
    /// `first_pfn`; returns how many were evicted (none while paused).
    pub fn evict_range(&self, first_pfn: u64, count: u64) -> u64 {
        let ram = &self.shared.ram;
        let pages: Vec<u64> = (first_pfn..first_pfn.saturating_add(count))
            .take(ram.pages() as usize)
            .filter_map(|pfn| ram.page_of_gpa(GuestAddress(pfn.checked_mul(PAGE_SIZE as u64)?)))
            .collect();
        self.shared.evict(&pages)
    }

    pub fn stats(&self) -> &PagerStats {
        &self.shared.stats
    }

    /// Pauses paging, for a paused guest: until `resume`, no page is copied in for an
    /// asynchronous fault and nothing is evicted (`evict_range` returns 0, the evictor skips
    /// its rounds). Returns once the copies and evictions under way have finished. Faults
    /// are still read and queued, and fetches that fall due meanwhile complete right after
    /// `resume`, in due order. Faults of sync threads are still served at once: the VM
    /// pauses its vCPUs first, so none should come, and one that does must not hang.
    pub fn pause(&self) {
        self.shared.lifecycle.pause();
    }

    /// Ends a pause.
    pub fn resume(&self) {
        self.shared.lifecycle.resume();
    }

    /// From now on every queued fetch and every new asynchronous fault is served at once,
    /// ignoring the latency model and any pause (evictions still wait out a pause); the
    /// threads keep running. There is no way back. The VM calls it before joining its vCPU
    /// threads, so that no vCPU thread or KVM kworker waits on the pager during teardown.
    pub fn release_all(&self) {
        self.shared.lifecycle.release_all();
    }

    /// Stops the pager, from any state (paused too). Fetches still pending are served at
    /// once first (`release_all`): a KVM kworker may be blocked on one of them, and KVM's VM
    /// teardown waits for its kworkers. Whatever is still waiting after that is released
    /// when the userfaultfd closes, so the owner must drop the pager before destroying the
    /// VM.
    pub fn stop(&self) {
        let lifecycle = &self.shared.lifecycle;
        if !lifecycle.lock().stopping {
            lifecycle.release_all();
            lifecycle.wait_drained(DRAIN_TIMEOUT);
        }
        lifecycle.stop();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn fatal(&self, message: String) {
        log::error!("pager: {message}");
        (self.on_fatal)(message);
    }

    fn lock_pages(&self) -> MutexGuard<'_, PageTable> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_thread(&self, tid: i32) -> Option<Arc<StallCounter>> {
        self.sync_threads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tid)
            .cloned()
    }

    /// Releases the threads waiting on a run of pages.
    fn wake(&self, first_page: u64, pages: u64) {
        let addr = self.ram.host_addr(first_page);
        if let Err(e) = self.uffd.wake(host_ptr(addr), pages as usize * PAGE_SIZE) {
            log::warn!("pager: wake of page {first_page} failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{
        eventually_at_least, pager_reporting_fatal, read_in_thread, zero_pager,
    };
    use super::*;
    use crate::memory::{MemoryBackend, create_guest_memory};
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::channel;
    use std::time::Instant;
    use vm_memory::Bytes;

    fn pager_with_latency(mem: &GuestMemoryMmap, latency: &str) -> Pager {
        let config = PagerConfig {
            latency: LatencyModel::parse(latency).unwrap(),
            ..Default::default()
        };
        zero_pager(mem, config)
    }

    #[test]
    fn stop_serves_pending_fetches_instead_of_leaving_waiters_blocked() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let pager = pager_with_latency(&mem, "100s");
        let toucher = read_in_thread(&mem, GuestAddress(0x30_0000));
        assert!(eventually_at_least(&pager.stats().faults_async, 1));
        let t0 = Instant::now();
        pager.stop();
        assert_eq!(toucher.join().unwrap(), 0, "served (zero-fill) at stop");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_pause_holds_copies_and_evictions_and_resume_releases_them() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let pager = pager_with_latency(&mem, "0ms");
        let stats = pager.stats();
        mem.write_obj(5u64, GuestAddress(0x10_0000)).unwrap();
        assert!(eventually_at_least(&stats.served_from_store, 1));
        pager.pause();
        assert_eq!(pager.evict_range(0x100, 1), 0, "no eviction while paused");
        let (done, returned) = channel();
        let toucher = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                done.send(mem.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap())
                    .unwrap()
            })
        };
        assert!(
            eventually_at_least(&stats.faults_async, 1),
            "read and queued"
        );
        // Asserting an absence: a bounded wait is all there is.
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            assert_eq!(
                stats.served_from_store.load(Ordering::Relaxed),
                1,
                "no copy"
            );
            assert!(returned.try_recv().is_err(), "the toucher waits");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(stats.pages_evicted.load(Ordering::Relaxed), 0);
        pager.resume();
        assert_eq!(returned.recv_timeout(Duration::from_secs(5)), Ok(0));
        toucher.join().unwrap();
        assert!(eventually_at_least(&stats.served_from_store, 2));
        assert_eq!(pager.evict_range(0x100, 1), 1, "evicts again");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 5);
    }

    #[test]
    fn stop_while_paused_releases_the_waiters() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let pager = pager_with_latency(&mem, "0ms");
        pager.pause();
        let toucher = read_in_thread(&mem, GuestAddress(0x30_0000));
        assert!(eventually_at_least(&pager.stats().faults_async, 1));
        let t0 = Instant::now();
        pager.stop();
        assert_eq!(toucher.join().unwrap(), 0);
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn release_all_serves_everything_at_once_and_keeps_serving() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let pager = pager_with_latency(&mem, "100s");
        let (done, returned) = channel();
        let toucher = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                done.send(mem.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap())
                    .unwrap()
            })
        };
        assert!(eventually_at_least(&pager.stats().faults_async, 1));
        pager.pause();
        pager.release_all();
        assert_eq!(returned.recv_timeout(Duration::from_secs(10)), Ok(0));
        toucher.join().unwrap();
        // Still running: a new fault is served at once too, paused or not.
        let (done, returned) = channel();
        let toucher = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                done.send(mem.read_obj::<u64>(GuestAddress(0x31_0000)).unwrap())
                    .unwrap()
            })
        };
        assert_eq!(returned.recv_timeout(Duration::from_secs(10)), Ok(0));
        toucher.join().unwrap();
        assert!(eventually_at_least(&pager.stats().served_from_store, 2));
    }

    #[test]
    fn a_pager_thread_that_panics_is_reported_as_fatal() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let (pager, fatal) = pager_reporting_fatal(&mem, PageStore::Zero);
        pager
            .spawn("pager-worker9", ThreadKind::PagerWorker, |_| {
                panic!("page table poisoned")
            })
            .unwrap();
        let message = fatal
            .recv_timeout(Duration::from_secs(5))
            .expect("fatal error");
        assert_eq!(
            message,
            "thread pager-worker9 panicked: page table poisoned"
        );
    }
}

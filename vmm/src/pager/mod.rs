//! Host paging of guest RAM with userfaultfd: the part of apfvm that makes pages "not
//! present" and decides when, and in which order, they come back.
//!
//! One guest page fault, async PF on: the guest touches a missing page in user mode → KVM
//! hands the fault to a kworker and tells the guest "not present" → the kworker blocks in
//! userfaultfd → our reader gets the message → the fetch waits out the latency model in the
//! due-time queue → a worker copies the page in (UFFDIO_COPY) → the kworker returns → KVM
//! sends the guest "page ready". Faults raised by vCPU threads themselves are synchronous
//! (guest kernel mode: the vCPU cannot run anything until the page is there), so they skip
//! the latency model and are served at once by the reader.
//!
//! Every page has one state, changed only under `Shared::pages`' lock, which is what keeps
//! eviction and fault-in of the same page from losing data: eviction only takes Resident
//! pages, a fault on a page being evicted waits for the eviction to finish and is then
//! served from the saved copy ("invalidation wins, the fault is served again"), and writes
//! during an eviction are held by userfaultfd write-protection until the page is gone.

mod latency;
mod ram;
mod store;

use crate::seccomp::{self, ThreadKind};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use crate::metrics::{LatencyHistogram, StallCounter};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use userfaultfd::{Event, FaultKind, FeatureFlags, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use latency::{FaultOrder, LatencyError, LatencyModel, parse_duration};
pub use ram::RamLayout;
pub use store::{PageStore, StoreError};

pub const PAGE_SIZE: usize = 4096;

/// UFFD_FEATURE_WP_HUGETLBFS_SHMEM: write-protection on shared memory (memfd backend); the
/// crate predates it.
const FEATURE_WP_SHMEM: u64 = 1 << 12;

/// Periodic eviction: every `period`, a `share` of the resident pages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvictPolicy {
    pub period: Duration,
    pub share: f64,
}

impl EvictPolicy {
    /// Parses `10ms:25%`.
    pub fn parse(spec: &str) -> Result<EvictPolicy, String> {
        let bad = || format!("bad --evict '{spec}': use PERIOD:SHARE, e.g. 10ms:25%");
        let (period, share) = spec.split_once(':').ok_or_else(bad)?;
        let period = parse_duration(period)
            .filter(|p| !p.is_zero())
            .ok_or_else(bad)?;
        let share: f64 = share
            .strip_suffix('%')
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if !(share > 0.0 && share <= 100.0) {
            return Err(bad());
        }
        Ok(EvictPolicy {
            period,
            share: share / 100.0,
        })
    }
}

#[derive(Debug, Clone)]
pub struct PagerConfig {
    pub latency: LatencyModel,
    pub order: FaultOrder,
    pub workers: usize,
    pub evict: Option<EvictPolicy>,
    pub seed: u64,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            latency: LatencyModel::default(),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageState {
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

struct PageTable {
    state: Vec<PageState>,
    /// Contents of evicted pages.
    swap: HashMap<u64, Box<[u8; PAGE_SIZE]>>,
    /// Pages that faulted while being evicted: fetched as soon as the eviction is done.
    refault_after_eviction: HashSet<u64>,
}

/// Counters of what the pager did; read at any time.
#[derive(Default)]
pub struct PagerStats {
    pub faults: AtomicU64,
    pub faults_sync: AtomicU64,
    pub faults_async: AtomicU64,
    pub faults_wp: AtomicU64,
    pub faults_coalesced: AtomicU64,
    pub served_from_store: AtomicU64,
    pub restored_from_swap: AtomicU64,
    pub pages_evicted: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub queue_depth_max: AtomicU64,
    /// Fault message to page mapped, for faults that stalled a vCPU thread outright.
    pub service_sync: LatencyHistogram,
    /// The same for faults the guest could wait for asynchronously (through the latency
    /// model and the queue).
    pub service_async: LatencyHistogram,
}

impl PagerStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn summary_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "faults": get(&self.faults),
            "faults_sync": get(&self.faults_sync),
            "faults_async": get(&self.faults_async),
            "faults_wp": get(&self.faults_wp),
            "faults_coalesced": get(&self.faults_coalesced),
            "served_from_store": get(&self.served_from_store),
            "restored_from_swap": get(&self.restored_from_swap),
            "pages_evicted": get(&self.pages_evicted),
            "bytes_in": get(&self.bytes_in),
            "bytes_out": get(&self.bytes_out),
            "queue_depth_max": get(&self.queue_depth_max),
            "service_sync": self.service_sync.summary(),
            "service_async": self.service_async.summary(),
        })
    }
}

/// A fetch waiting for its due time; ordered by (due, sequence); carries the page and when
/// its fault arrived.
type Pending = Reverse<(Instant, u64, u64, Instant)>;

/// Who waits for a page being served.
enum Waiter<'a> {
    /// A vCPU thread, stalled until the page is there.
    Sync(&'a StallCounter),
    /// A kworker (KVM async PF) or any other thread.
    Async,
}

struct FetchQueue {
    heap: Mutex<BinaryHeap<Pending>>,
    ready: Condvar,
}

struct Shared {
    uffd: Uffd,
    ram: RamLayout,
    store: PageStore,
    pages: Mutex<PageTable>,
    queue: FetchQueue,
    stats: PagerStats,
    /// Threads whose faults are synchronous (vCPU threads): served without latency, their
    /// wait counted on their stall counter.
    sync_threads: RwLock<HashMap<i32, Arc<StallCounter>>>,
    /// Shutting down: serve everything pending at once (see `Pager::stop`).
    draining: AtomicBool,
    stopping: AtomicBool,
    stop_event: EventFd,
    config: PagerConfig,
    sequence: AtomicU64,
    on_fatal: Box<dyn Fn(String) + Send + Sync>,
}

/// The running pager; dropping it stops its threads.
pub struct Pager {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
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
        let state = ram
            .resident_pages()
            .map_err(PagerError::Residency)?
            .into_iter()
            .map(|resident| {
                if resident {
                    PageState::Resident
                } else {
                    PageState::Untouched
                }
            })
            .collect::<Vec<_>>();
        let pages = state.len();
        let shared = Arc::new(Shared {
            uffd,
            ram,
            store,
            pages: Mutex::new(PageTable {
                state,
                swap: HashMap::new(),
                refault_after_eviction: HashSet::new(),
            }),
            queue: FetchQueue {
                heap: Mutex::new(BinaryHeap::new()),
                ready: Condvar::new(),
            },
            stats: PagerStats::default(),
            sync_threads: RwLock::new(HashMap::new()),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop_event: EventFd::new(EFD_NONBLOCK).map_err(PagerError::Thread)?,
            config: config.clone(),
            sequence: AtomicU64::new(0),
            on_fatal,
        });
        log::info!(
            "pager: {} pages from {}, latency {:?}, order {:?}, {} workers, evict {:?}",
            pages,
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
        let thread = name.to_string();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Err(e) = seccomp::confine(kind) {
                    shared.fatal(e.to_string());
                    return;
                }
                // A pager thread that dies leaves faults unserved and the guest wedged: stop
                // the VM with an error instead.
                let run = std::panic::AssertUnwindSafe(|| body(shared.clone()));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    shared.fatal(format!("pager thread {thread} died: {what}"));
                }
            })
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

    /// Evicts the resident pages among `count` pages from guest-physical page frame
    /// `first_pfn`; returns how many were evicted.
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

    /// Stops the pager. Fetches still pending are served at once first: a KVM kworker may be
    /// blocked on one of them, and KVM's VM teardown waits for its kworkers. Whatever is still
    /// waiting after that is released when the userfaultfd closes, so the owner must drop the
    /// pager before destroying the VM.
    pub fn stop(&self) {
        let s = &self.shared;
        if !s.draining.load(Ordering::SeqCst) {
            s.signal(&s.draining);
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while Instant::now() < deadline
                && !s
                    .queue
                    .heap
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty()
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        s.signal(&s.stopping);
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

/// How long `Pager::stop` waits for pending fetches to be served.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a partial reverse-order batch waits for more faults.
const REVERSE_BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Gap between completions of one reverse batch, so that the guest sees them in order.
const REVERSE_SPACING: Duration = Duration::from_micros(500);

impl Shared {
    /// Raises `flag` (draining or stopping) so that no thread misses it: workers check flags
    /// under the queue lock before they wait, and the reader checks them before each poll,
    /// which the event wakes.
    fn signal(&self, flag: &AtomicBool) {
        let heap = self.queue.heap.lock().unwrap_or_else(|e| e.into_inner());
        flag.store(true, Ordering::SeqCst);
        drop(heap);
        self.queue.ready.notify_all();
        let _ = self.stop_event.write(1);
    }

    fn fatal(&self, message: String) {
        log::error!("pager: {message}");
        (self.on_fatal)(message);
    }

    fn lock_pages(&self) -> std::sync::MutexGuard<'_, PageTable> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_thread(&self, tid: i32) -> Option<Arc<StallCounter>> {
        self.sync_threads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tid)
            .cloned()
    }

    fn reader_loop(self: Arc<Self>) {
        let mut rng = SmallRng::seed_from_u64(self.config.seed);
        let mut batch: Vec<(u64, Instant)> = Vec::new();
        let mut batch_deadline: Option<Instant> = None;
        let mut events = userfaultfd::EventBuffer::new(64);
        loop {
            // Checked before every poll: the stop event that woke an earlier poll may have
            // been consumed already.
            if self.stopping.load(Ordering::SeqCst) {
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
                    fd: self.stop_event.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let draining = self.draining.load(Ordering::SeqCst);
            if fds[1].revents & libc::POLLIN != 0 {
                let _ = self.stop_event.read();
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
                                _ => {
                                    let sync = self.sync_thread(thread_id.as_raw());
                                    if let Some(page) = self.on_missing_fault(page, sync.is_some())
                                    {
                                        match &sync {
                                            Some(stalls) => self.serve(
                                                page,
                                                Instant::now(),
                                                Waiter::Sync(stalls),
                                            ),
                                            None => batch.push((page, Instant::now())),
                                        }
                                    }
                                }
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
                    self.serve(page, arrived, Waiter::Async);
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
                            self.serve(page, arrived, Waiter::Async);
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

    /// Decides what a missing-page fault needs; returns the page if a fetch must start.
    fn on_missing_fault(&self, page: u64, sync: bool) -> Option<u64> {
        PagerStats::add(&self.stats.faults, 1);
        let mut table = self.lock_pages();
        let state = table.state[page as usize];
        match state {
            PageState::Untouched | PageState::Evicted => {
                table.state[page as usize] = PageState::InFlight;
                drop(table);
                let kind = if sync {
                    &self.stats.faults_sync
                } else {
                    &self.stats.faults_async
                };
                PagerStats::add(kind, 1);
                Some(page)
            }
            PageState::InFlight => {
                // The copy in progress wakes every thread waiting on this page.
                PagerStats::add(&self.stats.faults_coalesced, 1);
                None
            }
            PageState::Evicting => {
                table.refault_after_eviction.insert(page);
                PagerStats::add(&self.stats.faults_coalesced, 1);
                None
            }
            PageState::Resident => {
                // A message that raced the copy that already served it: just wake.
                drop(table);
                PagerStats::add(&self.stats.faults_coalesced, 1);
                self.wake(page, 1);
                None
            }
        }
    }

    /// A write hit a page under eviction: the writer is released once the page is gone and
    /// then faults it back in. Any other write-protect fault is stale; release it.
    fn on_wp_fault(&self, page: u64) {
        PagerStats::add(&self.stats.faults_wp, 1);
        let evicting = self.lock_pages().state[page as usize] == PageState::Evicting;
        if !evicting {
            self.wake(page, 1);
        }
    }

    fn wake(&self, first_page: u64, pages: u64) {
        let addr = self.ram.host_addr(first_page);
        if let Err(e) = self.uffd.wake(host_ptr(addr), pages as usize * PAGE_SIZE) {
            log::warn!("pager: wake of page {first_page} failed: {e}");
        }
    }

    fn enqueue(&self, page: u64, due: Instant, arrived: Instant) {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let mut heap = self.queue.heap.lock().unwrap_or_else(|e| e.into_inner());
        heap.push(Reverse((due, seq, page, arrived)));
        self.stats
            .queue_depth_max
            .fetch_max(heap.len() as u64, Ordering::Relaxed);
        drop(heap);
        self.queue.ready.notify_one();
    }

    fn worker_loop(self: Arc<Self>) {
        loop {
            let mut heap = self.queue.heap.lock().unwrap_or_else(|e| e.into_inner());
            let item = loop {
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                match heap.peek() {
                    Some(Reverse((due, ..))) => {
                        let now = Instant::now();
                        if *due <= now || self.draining.load(Ordering::SeqCst) {
                            break heap.pop().expect("peeked");
                        }
                        let wait = *due - now;
                        heap = self
                            .queue
                            .ready
                            .wait_timeout(heap, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                    None => {
                        heap = self
                            .queue
                            .ready
                            .wait(heap)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                }
            };
            drop(heap);
            // Another worker may now have an earlier item to wait for.
            self.queue.ready.notify_one();
            let Reverse((_, _, page, arrived)) = item;
            self.serve(page, arrived, Waiter::Async);
        }
    }

    /// Copies a page in (from swap if it was evicted, else from the store) and wakes every
    /// thread waiting for it.
    fn serve(&self, page: u64, arrived: Instant, waiter: Waiter) {
        let saved = self.lock_pages().swap.remove(&page);
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
            // The waiters are woken only once the page is marked Resident: a guest that goes
            // on to request an eviction of this very page must find it evictable.
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
        self.lock_pages().state[page as usize] = PageState::Resident;
        self.wake(page, 1);
        let stats = &self.stats;
        let counter = if from_swap {
            &stats.restored_from_swap
        } else {
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

    /// Evicts those of `pages` that are resident: write-protect, save, drop, then release
    /// writers that hit the protection (they fault the page back in). Returns the count.
    fn evict(&self, pages: &[u64]) -> u64 {
        let mut chosen: Vec<u64> = {
            let mut table = self.lock_pages();
            pages
                .iter()
                .copied()
                .filter(|&p| {
                    let resident = table.state[p as usize] == PageState::Resident;
                    if resident {
                        table.state[p as usize] = PageState::Evicting;
                    }
                    resident
                })
                .collect()
        };
        if chosen.is_empty() {
            return 0;
        }
        chosen.sort_unstable();
        let runs = self.ram.runs(&chosen);
        for run in &runs {
            let len = run.pages as usize * PAGE_SIZE;
            if let Err(e) = self.uffd.write_protect(host_ptr(run.host), len) {
                self.fatal(format!("write-protecting pages for eviction: {e}"));
                return 0;
            }
        }
        let mut saved = Vec::with_capacity(chosen.len());
        for &page in &chosen {
            let mut data = Box::new([0u8; PAGE_SIZE]);
            // SAFETY: the page is resident (state Evicting, set by us from Resident) and
            // write-protected, so it is mapped and nobody changes it while we copy.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.ram.host_addr(page) as *const u8,
                    data.as_mut_ptr(),
                    PAGE_SIZE,
                )
            };
            saved.push((page, data));
        }
        for run in &runs {
            if let Err(e) = self.ram.drop_pages(*run) {
                self.fatal(format!("dropping evicted pages: {e}"));
                return 0;
            }
        }
        let mut refetch = Vec::new();
        {
            let mut table = self.lock_pages();
            for (page, data) in saved {
                table.swap.insert(page, data);
                if table.refault_after_eviction.remove(&page) {
                    table.state[page as usize] = PageState::InFlight;
                    refetch.push(page);
                } else {
                    table.state[page as usize] = PageState::Evicted;
                }
            }
        }
        for run in &runs {
            self.wake(run.first_page, run.pages);
        }
        let now = Instant::now();
        for page in refetch {
            self.enqueue(page, now, now);
        }
        let n = chosen.len() as u64;
        PagerStats::add(&self.stats.pages_evicted, n);
        PagerStats::add(&self.stats.bytes_out, n * PAGE_SIZE as u64);
        n
    }

    fn evictor_loop(self: Arc<Self>, policy: EvictPolicy) {
        let mut rng = SmallRng::seed_from_u64(self.config.seed ^ 0x5eed);
        while !self.stopping.load(Ordering::SeqCst) {
            std::thread::sleep(policy.period);
            let victims: Vec<u64> = {
                let table = self.lock_pages();
                table
                    .state
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| **s == PageState::Resident)
                    .filter(|_| rng.random_bool(policy.share))
                    .map(|(p, _)| p as u64)
                    .collect()
            };
            if !victims.is_empty() {
                self.evict(&victims);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryBackend, create_guest_memory};
    use vm_memory::Bytes;

    #[test]
    fn stop_serves_pending_fetches_instead_of_leaving_waiters_blocked() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let config = PagerConfig {
            latency: LatencyModel::parse("100s").unwrap(),
            ..Default::default()
        };
        let pager = Arc::new(
            Pager::start(&mem, PageStore::Zero, config, Box::new(|m| panic!("{m}"))).unwrap(),
        );
        let toucher = {
            let mem = mem.clone();
            std::thread::spawn(move || mem.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap())
        };
        assert!(eventually_at_least(&pager.stats().faults_async, 1));
        let t0 = Instant::now();
        pager.stop();
        assert_eq!(toucher.join().unwrap(), 0, "served (zero-fill) at stop");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    /// Counters are bumped right after the copy that already woke the faulting thread.
    fn eventually_at_least(counter: &AtomicU64, n: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while counter.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn evict_policy_parsing() {
        let p = EvictPolicy::parse("10ms:25%").unwrap();
        assert_eq!(p.period, Duration::from_millis(10));
        assert!((p.share - 0.25).abs() < 1e-9);
        for bad in ["10ms", "0ms:5%", "10ms:0%", "10ms:150%", "10ms:25"] {
            assert!(EvictPolicy::parse(bad).is_err(), "{bad}");
        }
    }

    /// The pager serves host-thread faults too (no KVM needed): this is the floor a guest
    /// fault is compared against, and a check that eviction keeps data.
    #[test]
    fn faults_are_served_and_evicted_pages_come_back_intact() {
        for backend in [MemoryBackend::Anon, MemoryBackend::Memfd] {
            let mem = create_guest_memory(4 << 20, backend).unwrap();
            // Written before paging starts: stays as is.
            mem.write_obj(0xabcdu32, GuestAddress(0x1000)).unwrap();
            let config = PagerConfig {
                latency: LatencyModel::parse("1ms").unwrap(),
                ..Default::default()
            };
            let pager =
                Pager::start(&mem, PageStore::Zero, config, Box::new(|m| panic!("{m}"))).unwrap();
            assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xabcd);
            for i in 0..64u64 {
                let addr = GuestAddress(0x10_0000 + i * PAGE_SIZE as u64);
                assert_eq!(mem.read_obj::<u64>(addr).unwrap(), 0, "zero-filled");
                mem.write_obj(i * 7 + 1, addr).unwrap();
            }
            let stats = pager.stats();
            assert!(
                eventually_at_least(&stats.served_from_store, 64),
                "{backend:?}"
            );
            let evicted = pager.evict_range(0x100, 64);
            assert_eq!(evicted, 64, "{backend:?}");
            for i in 0..64u64 {
                let addr = GuestAddress(0x10_0000 + i * PAGE_SIZE as u64);
                assert_eq!(mem.read_obj::<u64>(addr).unwrap(), i * 7 + 1, "{backend:?}");
            }
            assert!(eventually_at_least(&pager.stats().restored_from_swap, 64));
            pager.stop();
        }
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

    /// A pager that captures its fatal errors, as the VM does to stop itself.
    fn pager_reporting_fatal(
        mem: &GuestMemoryMmap,
        store: PageStore,
    ) -> (Pager, std::sync::mpsc::Receiver<String>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let on_fatal = Box::new(move |m: String| {
            let _ = tx.lock().unwrap().send(m);
        });
        let pager = Pager::start(mem, store, PagerConfig::default(), on_fatal).unwrap();
        (pager, rx)
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
            "pager thread pager-worker9 died: page table poisoned"
        );
    }

    #[test]
    fn writes_racing_eviction_are_never_lost() {
        // A writer hammers pages while they are evicted over and over: each page's counter
        // must read back exactly as last written (write-protection holds the writer during
        // an eviction, and the fault after it brings back the saved copy).
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let config = PagerConfig {
            evict: Some(EvictPolicy::parse("1ms:50%").unwrap()),
            ..Default::default()
        };
        let pager =
            Pager::start(&mem, PageStore::Zero, config, Box::new(|m| panic!("{m}"))).unwrap();
        const PAGES: u64 = 32;
        let base = 0x20_0000u64;
        let deadline = Instant::now() + Duration::from_millis(400);
        let mut round = 0u64;
        while Instant::now() < deadline {
            round += 1;
            for p in 0..PAGES {
                let addr = GuestAddress(base + p * PAGE_SIZE as u64);
                let before = mem.read_obj::<u64>(addr).unwrap();
                assert_eq!(
                    before,
                    (round - 1) * 1000 + p * (round > 1) as u64,
                    "page {p}"
                );
                mem.write_obj(round * 1000 + p, addr).unwrap();
            }
        }
        assert!(pager.stats().pages_evicted.load(Ordering::Relaxed) > 0);
        assert!(pager.stats().restored_from_swap.load(Ordering::Relaxed) > 0);
    }
}

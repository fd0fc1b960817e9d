//! Helpers for the pager's tests that start a real pager.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use std::thread::JoinHandle;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{PageStore, Pager, PagerConfig};

/// Counters are bumped right after the copy that already woke the faulting thread.
pub fn eventually_at_least(counter: &AtomicU64, n: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while counter.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// A pager that captures its fatal errors, as the VM does to stop itself.
pub fn pager_reporting_fatal(mem: &GuestMemoryMmap, store: PageStore) -> (Pager, Receiver<String>) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let on_fatal = Box::new(move |m: String| {
        let _ = tx.lock().unwrap().send(m);
    });
    let pager = Pager::start(mem, store, PagerConfig::default(), on_fatal).unwrap();
    (pager, rx)
}

/// A pager serving zero-filled pages with `config`; a fatal error fails the test.
pub fn zero_pager(mem: &GuestMemoryMmap, config: PagerConfig) -> Pager {
    Pager::start(mem, PageStore::Zero, config, Box::new(|m| panic!("{m}"))).unwrap()
}

/// Reads the u64 at `addr` on a new thread (which waits there while the page is missing).
pub fn read_in_thread(mem: &GuestMemoryMmap, addr: GuestAddress) -> JoinHandle<u64> {
    let mem = mem.clone();
    std::thread::spawn(move || mem.read_obj::<u64>(addr).unwrap())
}

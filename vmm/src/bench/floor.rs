//! The floor a guest page fault is compared against: a host thread touching pages that are
//! missing in a userfaultfd-registered mapping, served by the same pager (same queue, same
//! workers, no latency added), with no KVM in the way.

use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use vmm::memory::{MemoryBackend, create_guest_memory};
use vmm::metrics::LatencyHistogram;
use vmm::pager::{PAGE_SIZE, PageStore, Pager, PagerConfig, PagerError};

pub struct FloorResult {
    /// Touch → page there, as the touching thread saw it.
    pub touch: LatencyHistogram,
    /// The pager's own service latency for the same faults.
    pub service: serde_json::Value,
    pub pages_per_sec: f64,
}

/// Touches `pages` fresh pages one after another and times each touch.
pub fn measure_floor(pages: u64, workers: usize) -> Result<FloorResult, PagerError> {
    let mem: GuestMemoryMmap = create_guest_memory(
        (pages * PAGE_SIZE as u64).next_multiple_of(2 << 20),
        MemoryBackend::Anon,
    )
    .expect("anonymous memory for the floor measurement");
    let config = PagerConfig {
        workers,
        ..Default::default()
    };
    let pager = Pager::start(&mem, PageStore::Zero, config, Box::new(|m| panic!("{m}")))?;
    let touch = LatencyHistogram::default();
    let start = Instant::now();
    for page in 0..pages {
        let addr = GuestAddress(page * PAGE_SIZE as u64);
        let t0 = Instant::now();
        let value: u8 = vm_memory::Bytes::read_obj(&mem, addr).expect("page inside memory");
        touch.record(t0.elapsed());
        std::hint::black_box(value);
    }
    let elapsed = start.elapsed().max(Duration::from_nanos(1));
    pager.stop();
    Ok(FloorResult {
        touch,
        service: pager.stats().service_async.summary(),
        pages_per_sec: pages as f64 / elapsed.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_serves_every_page_and_measures_each_touch() {
        let r = measure_floor(256, 2).unwrap();
        assert_eq!(r.touch.count(), 256);
        assert_eq!(r.service["count"], 256);
        assert!(r.pages_per_sec > 0.0);
    }
}

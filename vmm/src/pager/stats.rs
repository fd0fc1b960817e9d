//! What the pager did, counted as it happens (atomics and histograms, read at any time
//! without stopping anything) and summed up as one typed record for the metrics file and
//! the exit summary.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::LatencyHistogram;

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
    /// Pages copied in ahead of any fault (`--prefetch`), and the time spent on it.
    pub prefetched: AtomicU64,
    pub prefetch_ns: AtomicU64,
    /// Fault message to page mapped, for faults that stalled a vCPU thread outright.
    pub service_sync: LatencyHistogram,
    /// The same for faults the guest could wait for asynchronously (through the latency
    /// model and the queue).
    pub service_async: LatencyHistogram,
}

/// A snapshot of `PagerStats` (fields in docs/metrics.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PagerSummary {
    pub faults: u64,
    pub faults_sync: u64,
    pub faults_async: u64,
    pub faults_wp: u64,
    pub faults_coalesced: u64,
    pub served_from_store: u64,
    pub restored_from_swap: u64,
    pub pages_evicted: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub queue_depth_max: u64,
    pub prefetched: u64,
    /// Prefetched pages per second of prefetch work (reads and copies).
    pub prefetch_pages_per_sec: f64,
    /// `LatencyHistogram::summary`.
    pub service_sync: serde_json::Value,
    pub service_async: serde_json::Value,
}

impl PagerStats {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn summary(&self) -> PagerSummary {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PagerSummary {
            faults: get(&self.faults),
            faults_sync: get(&self.faults_sync),
            faults_async: get(&self.faults_async),
            faults_wp: get(&self.faults_wp),
            faults_coalesced: get(&self.faults_coalesced),
            served_from_store: get(&self.served_from_store),
            restored_from_swap: get(&self.restored_from_swap),
            pages_evicted: get(&self.pages_evicted),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            queue_depth_max: get(&self.queue_depth_max),
            prefetched: get(&self.prefetched),
            prefetch_pages_per_sec: match get(&self.prefetch_ns) {
                0 => 0.0,
                ns => get(&self.prefetched) as f64 * 1e9 / ns as f64,
            },
            service_sync: self.service_sync.summary(),
            service_async: self.service_async.summary(),
        }
    }

    pub fn summary_json(&self) -> serde_json::Value {
        serde_json::to_value(self.summary()).expect("numbers and JSON values always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_summary_has_every_counter_under_its_name() {
        let stats = PagerStats::default();
        PagerStats::add(&stats.faults, 3);
        PagerStats::add(&stats.bytes_out, 4096);
        stats.service_async.record(Duration::from_micros(10));
        let json = stats.summary_json();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        let mut expected = [
            "faults",
            "faults_sync",
            "faults_async",
            "faults_wp",
            "faults_coalesced",
            "served_from_store",
            "restored_from_swap",
            "pages_evicted",
            "bytes_in",
            "bytes_out",
            "queue_depth_max",
            "prefetched",
            "prefetch_pages_per_sec",
            "service_sync",
            "service_async",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(json["faults"], 3);
        assert_eq!(json["bytes_out"], 4096);
        assert_eq!(json["service_sync"]["count"], 0);
        assert_eq!(json["service_async"]["count"], 1);
    }
}

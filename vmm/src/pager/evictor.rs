//! Eviction: taking resident pages away from the guest so that its next touch faults them
//! back in (from the saved copy). `evict` does it for given pages (the guest's requests,
//! the periodic evictor's random picks): write-protect, save, drop, wake.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::stats::PagerStats;
use super::{PAGE_SIZE, Shared, host_ptr, parse_duration};

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

impl Shared {
    /// Evicts those of `pages` that are resident: write-protect, save, drop, then release
    /// writers that hit the protection (they fault the page back in). Returns the count;
    /// 0 while paused.
    pub(super) fn evict(&self, pages: &[u64]) -> u64 {
        let Some(_op) = self.lifecycle.try_begin_eviction() else {
            return 0;
        };
        let chosen = self.lock_pages().begin_eviction(pages);
        if chosen.is_empty() {
            return 0;
        }
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
        let refetch = self.lock_pages().finish_eviction(saved);
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

    pub(super) fn evictor_loop(self: Arc<Self>, policy: EvictPolicy) {
        let mut rng = SmallRng::seed_from_u64(self.config.seed ^ 0x5eed);
        // Waits on the lifecycle, not in a sleep: a stop must not wait out a long period.
        while self.lifecycle.sleep(policy.period) {
            let victims: Vec<u64> = self
                .lock_pages()
                .resident_pages()
                .filter(|_| rng.random_bool(policy.share))
                .collect();
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
    use crate::pager::test_support::{eventually_at_least, zero_pager};
    use crate::pager::{LatencyModel, PagerConfig};
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

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
            let pager = zero_pager(&mem, config);
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
    fn writes_racing_eviction_are_never_lost() {
        // A writer hammers pages while they are evicted over and over: each page's counter
        // must read back exactly as last written (write-protection holds the writer during
        // an eviction, and the fault after it brings back the saved copy).
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let config = PagerConfig {
            evict: Some(EvictPolicy::parse("1ms:50%").unwrap()),
            ..Default::default()
        };
        let pager = zero_pager(&mem, config);
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

    #[test]
    fn stop_does_not_wait_out_the_eviction_period() {
        let mem = create_guest_memory(4 << 20, MemoryBackend::Anon).unwrap();
        let config = PagerConfig {
            evict: Some(EvictPolicy::parse("3600s:1%").unwrap()),
            ..Default::default()
        };
        let pager = zero_pager(&mem, config);
        let t0 = Instant::now();
        pager.stop();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
}

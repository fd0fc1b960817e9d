//! The pager-control port: lets a test guest ask the VMM's pager to evict a range of its
//! memory now ("on demand from tests"), so the next touches fault the pages back in.
//!
//! Protocol (32-bit accesses): write the first guest page frame number to port 0xf8, then
//! the page count to port 0xfc, which evicts synchronously; a read of port 0xf8 returns how
//! many pages that request evicted. Without a pager the ports are unassigned (reads give
//! 0xffffffff), which is how a guest knows.

use std::sync::Arc;

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

pub const PAGER_CONTROL_PORT: u16 = 0xf8;
pub const PAGER_CONTROL_PORT_LEN: u16 = 8;

/// Implemented by the VMM's pager.
pub trait EvictionRequests: Send + Sync {
    /// Evicts the resident pages among `count` pages from frame `first_pfn`; returns how
    /// many were evicted.
    fn evict(&self, first_pfn: u64, count: u64) -> u64;
}

pub struct PagerControl {
    pager: Arc<dyn EvictionRequests>,
    first_pfn: u32,
    last_evicted: u32,
}

impl PagerControl {
    pub fn new(pager: Arc<dyn EvictionRequests>) -> Self {
        PagerControl {
            pager,
            first_pfn: 0,
            last_evicted: 0,
        }
    }
}

fn le_u32(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

impl MutDevicePio for PagerControl {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = if offset == 0 { self.last_evicted } else { 0 };
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.to_le_bytes().get(i).copied().unwrap_or(0);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match offset {
            0 => self.first_pfn = le_u32(data),
            4 => {
                let count = le_u32(data);
                let evicted = self
                    .pager
                    .evict(u64::from(self.first_pfn), u64::from(count));
                self.last_evicted = u32::try_from(evicted).unwrap_or(u32::MAX);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Recorder(Mutex<Vec<(u64, u64)>>);
    impl EvictionRequests for Recorder {
        fn evict(&self, first_pfn: u64, count: u64) -> u64 {
            self.0.lock().unwrap().push((first_pfn, count));
            count / 2
        }
    }

    #[test]
    fn first_pfn_then_count_evicts_and_result_reads_back() {
        let rec = Arc::new(Recorder(Mutex::new(vec![])));
        let mut dev = PagerControl::new(rec.clone());
        let base = PioAddress(PAGER_CONTROL_PORT);
        dev.pio_write(base, 0, &0x2000u32.to_le_bytes());
        dev.pio_write(base, 4, &100u32.to_le_bytes());
        assert_eq!(*rec.0.lock().unwrap(), vec![(0x2000, 100)]);
        let mut out = [0u8; 4];
        dev.pio_read(base, 0, &mut out);
        assert_eq!(u32::from_le_bytes(out), 50);
    }
}

//! The pager-control port: lets a test guest ask the VMM's pager to evict a range of its
//! memory now ("on demand from tests"), so the next touches fault the pages back in.
//!
//! Protocol: two little-endian 32-bit registers, the first guest page frame number at port
//! 0xf8 and the page count at port 0xfc. A write that sets the count's last byte (port 0xff)
//! evicts synchronously; a read of port 0xf8 returns how many pages that request evicted.
//! Registers are byte-addressable, so a 32-bit `out` works and so does Linux user space
//! writing 8 bytes at offset 0xf8 of /dev/port (one `outb` per byte, in order). Without a
//! pager the ports are unassigned (reads give 0xffffffff), which is how a guest knows.

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
    /// first_pfn (bytes 0..4) and count (bytes 4..8), as the guest wrote them.
    registers: [u8; PAGER_CONTROL_PORT_LEN as usize],
    last_evicted: u32,
}

impl PagerControl {
    pub fn new(pager: Arc<dyn EvictionRequests>) -> Self {
        PagerControl {
            pager,
            registers: [0; PAGER_CONTROL_PORT_LEN as usize],
            last_evicted: 0,
        }
    }

    fn register(&self, offset: usize) -> u32 {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&self.registers[offset..offset + 4]);
        u32::from_le_bytes(bytes)
    }
}

impl MutDevicePio for PagerControl {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = self.last_evicted.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            // Only the result register at 0xf8 reads back; the rest reads as 0.
            *b = value.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let start = offset as usize;
        let Some(end) = start
            .checked_add(data.len())
            .filter(|&end| end <= self.registers.len())
        else {
            return;
        };
        self.registers[start..end].copy_from_slice(data);
        if end == self.registers.len() {
            let (first_pfn, count) = (self.register(0), self.register(4));
            let evicted = self.pager.evict(u64::from(first_pfn), u64::from(count));
            self.last_evicted = u32::try_from(evicted).unwrap_or(u32::MAX);
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

    #[test]
    fn byte_writes_in_order_evict_once_the_count_is_complete() {
        let rec = Arc::new(Recorder(Mutex::new(vec![])));
        let mut dev = PagerControl::new(rec.clone());
        let base = PioAddress(PAGER_CONTROL_PORT);
        let request = [0x1234u32.to_le_bytes(), 3u32.to_le_bytes()].concat();
        for (i, b) in request.iter().enumerate() {
            dev.pio_write(base, i as PioAddressOffset, std::slice::from_ref(b));
            let expected = if i == 7 { vec![(0x1234, 3)] } else { vec![] };
            assert_eq!(*rec.0.lock().unwrap(), expected, "after byte {i}");
        }
        let mut out = [0u8; 1];
        dev.pio_read(base, 0, &mut out);
        assert_eq!(out[0], 1);
    }

    #[test]
    fn writes_past_the_registers_are_ignored() {
        let rec = Arc::new(Recorder(Mutex::new(vec![])));
        let mut dev = PagerControl::new(rec.clone());
        dev.pio_write(PioAddress(PAGER_CONTROL_PORT), 6, &[1, 2, 3, 4]);
        dev.pio_write(PioAddress(PAGER_CONTROL_PORT), PioAddressOffset::MAX, &[1]);
        assert!(rec.0.lock().unwrap().is_empty());
    }
}

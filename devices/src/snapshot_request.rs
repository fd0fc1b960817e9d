//! The snapshot-request port: a guest asks the VMM to snapshot it right here ("snapshot after
//! init", reproducible tests). The VMM pauses the VM (the vCPU's port write completes first,
//! so a restored guest does not repeat its request), saves it, then resumes or stops it as
//! its user chose. A request while one is being handled is folded into it.

use std::sync::Arc;

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

/// The port a guest writes (any value, any width) to ask for a snapshot.
pub const SNAPSHOT_REQUEST_PORT: u16 = 0xf0;
/// Ports covered, so that a 32-bit `outl` lands on the device.
pub const SNAPSHOT_REQUEST_PORT_LEN: u16 = 4;

/// Receives a guest's snapshot requests; implemented by the VMM.
pub trait SnapshotRequestHandler: Send + Sync {
    fn snapshot_requested(&self);
}

pub struct SnapshotRequest {
    handler: Arc<dyn SnapshotRequestHandler>,
}

impl SnapshotRequest {
    pub fn new(handler: Arc<dyn SnapshotRequestHandler>) -> Self {
        SnapshotRequest { handler }
    }
}

impl MutDevicePio for SnapshotRequest {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, _data: &[u8]) {
        if offset == 0 {
            self.handler.snapshot_requested();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl SnapshotRequestHandler for Count {
        fn snapshot_requested(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_write_at_the_base_port_is_a_request() {
        let count = Arc::new(Count::default());
        let mut dev = SnapshotRequest::new(count.clone());
        let base = PioAddress(SNAPSHOT_REQUEST_PORT);
        dev.pio_write(base, 0, &1u32.to_le_bytes());
        dev.pio_write(base, 0, &[0]);
        dev.pio_write(base, 1, &[1]); // not the base port: ignored
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }
}

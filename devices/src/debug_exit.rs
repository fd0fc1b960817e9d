//! The debug-exit port: a test guest ends the VM with an exit code of its choice.
//!
//! Like QEMU's `isa-debug-exit` at its common `iobase=0xf4`, but the code is passed through
//! unchanged: apfvm exits with `value & 0xff`, so a guest writing 0 makes apfvm exit 0.

use std::sync::Arc;

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

use crate::{GuestStop, GuestStopHandler};

/// The port test guests write their exit code to.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ports covered, so that a 32-bit `outl` lands on the device.
pub const DEBUG_EXIT_PORT_LEN: u16 = 4;

pub struct DebugExit {
    stop: Arc<dyn GuestStopHandler>,
}

impl DebugExit {
    pub fn new(stop: Arc<dyn GuestStopHandler>) -> Self {
        DebugExit { stop }
    }
}

impl MutDevicePio for DebugExit {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        // Only a write at the base port carries the code; the low byte is the exit code
        // whatever the access width.
        if offset == 0
            && let Some(&code) = data.first()
        {
            self.stop.guest_stop(GuestStop::ExitCode(code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Recorder;

    #[test]
    fn write_of_any_width_exits_with_low_byte() {
        let rec = Arc::new(Recorder::default());
        let mut dev = DebugExit::new(rec.clone());
        let base = PioAddress(DEBUG_EXIT_PORT);
        dev.pio_write(base, 0, &[7]);
        dev.pio_write(base, 0, &0x1234_5603u32.to_le_bytes());
        dev.pio_write(base, 2, &[9]); // not the base port: ignored
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![GuestStop::ExitCode(7), GuestStop::ExitCode(3)]
        );
        let mut buf = [0xffu8; 4];
        dev.pio_read(base, 0, &mut buf);
        assert_eq!(buf, [0; 4]);
    }
}

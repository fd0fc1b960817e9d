//! The i8042 keyboard controller, reduced to what a guest needs to reboot: the CPU reset
//! command (0xFE on port 0x64). Linux booted with `reboot=k` resets this way, and without ACPI
//! that is also how its poweroff ends up leaving the VM.

use std::sync::Arc;

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_superio::{I8042Device, Trigger};

use crate::{GuestStop, GuestStopHandler};

/// First port of the controller (data port); the command/status port is at +4 (0x64).
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u16 = 5;

/// Forwards vm-superio's reset trigger to the VMM as a guest reset.
struct ResetLine(Arc<dyn GuestStopHandler>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.guest_stop(GuestStop::Reset);
        Ok(())
    }
}

pub struct I8042 {
    inner: I8042Device<ResetLine>,
}

impl I8042 {
    pub fn new(stop: Arc<dyn GuestStopHandler>) -> Self {
        I8042 {
            inner: I8042Device::new(ResetLine(stop)),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        // Status 0: input buffer empty, so a guest polling before it sends a command
        // (as Linux's reboot path does) goes ahead at once.
        let value = u8::try_from(offset).map_or(0, |o| self.inner.read(o));
        data.fill(value);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            let Ok(()) = self.inner.write(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Recorder;

    #[test]
    fn reset_command_on_port_0x64_requests_reset() {
        let rec = Arc::new(Recorder::default());
        let mut dev = I8042::new(rec.clone());
        let base = PioAddress(I8042_PORT);
        dev.pio_write(base, 4, &[0x01]); // another command: ignored
        dev.pio_write(base, 0, &[0xfe]); // data port: ignored
        assert!(rec.0.lock().unwrap().is_empty());
        dev.pio_write(base, 4, &[0xfe]);
        assert_eq!(*rec.0.lock().unwrap(), vec![GuestStop::Reset]);
        let mut status = [0xffu8];
        dev.pio_read(base, 4, &mut status);
        assert_eq!(status, [0]);
    }
}

//! COM1: a 16550A (vm-superio) whose output goes to a host writer (the terminal) and whose
//! interrupt is an eventfd that the VMM registers as a KVM irqfd, so raising IRQ 4 costs no
//! exit to userspace.

use std::io::Write;

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORT_LEN: u16 = 8;
pub const COM1_IRQ: u32 = 4;

/// An interrupt line backed by an eventfd (a KVM irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A UART as it was saved in a snapshot (registers and receive FIFO); raises its
    /// interrupt again if one was pending.
    pub fn from_state(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        state: &vm_superio::serial::SerialState,
    ) -> Result<Self, String> {
        let uart = Serial::from_state(state, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("{e:?}"))?;
        Ok(SerialConsole { uart })
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: dropped input: {e:?}");
                0
            }
        }
    }

    /// Bytes the receive FIFO can still take.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl MutDevicePio for SerialConsole {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0xff, |o| self.uart.read(o));
        data.fill(value);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        // A host write error (closed terminal, full disk) must not stop the guest: the byte
        // is lost, as on a real UART with nothing attached.
        if let Err(e) = self.uart.write(offset, value) {
            log::debug!("serial: output byte lost: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_host_and_input_reaches_guest_with_irq() {
        let out = SharedBuf::default();
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut uart = SerialConsole::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        let base = PioAddress(COM1_PORT);
        for b in b"hi\n" {
            uart.pio_write(base, 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");

        uart.pio_write(base, 1, &[0x01]); // IER: received-data interrupt on
        while irq.read().is_ok() {} // drain THR-empty interrupts
        assert_eq!(uart.enqueue_input(b"ok"), 2);
        assert_eq!(irq.read().unwrap(), 1, "input raises the interrupt");
        let mut lsr = [0u8];
        uart.pio_read(base, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut got = Vec::new();
        for _ in 0..2 {
            let mut b = [0u8];
            uart.pio_read(base, 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"ok");
    }
}

//! Guest port I/O to every emulated device (16550 UART, i8042, debug exit, pager control),
//! in any order, width and value: the devices must never panic, whatever the guest writes.
//! Input: a sequence of 4-byte operations [device+kind, offset, value, width], run against
//! one set of devices.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::pager_control::PAGER_CONTROL_PORT;
use devices::{
    DebugExit, EvictionRequests, GuestStop, GuestStopHandler, I8042, PagerControl, SerialConsole,
};
use libfuzzer_sys::fuzz_target;
use vm_device::MutDevicePio;
use vm_device::bus::PioAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Stands in for the VM: records stop requests and eviction requests.
struct Host(Mutex<u64>);

impl GuestStopHandler for Host {
    fn guest_stop(&self, _: GuestStop) {
        *self.0.lock().unwrap() += 1;
    }
}

impl EvictionRequests for Host {
    fn evict(&self, _first_pfn: u64, count: u64) -> u64 {
        count / 2
    }
}

fuzz_target!(|data: &[u8]| {
    let host = Arc::new(Host(Mutex::new(0)));
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut devices: Vec<(u16, Box<dyn MutDevicePio>)> = vec![
        (
            0x3f8,
            Box::new(SerialConsole::new(irq, Box::new(std::io::sink()))),
        ),
        (0x60, Box::new(I8042::new(host.clone()))),
        (0xf4, Box::new(DebugExit::new(host.clone()))),
        (
            PAGER_CONTROL_PORT,
            Box::new(PagerControl::new(host.clone())),
        ),
    ];
    for op in data.chunks_exact(4) {
        let (device, offset, value, width) = (op[0], op[1], op[2], op[3]);
        let (base, dev) = &mut devices[usize::from(device >> 1) % 4];
        // Widths 1, 2, 4 as the CPU issues them, and odd ones a buggy bus might pass on.
        let len = [1, 2, 4, 3, 8, 0][usize::from(width) % 6];
        let offset = u16::from(offset % 16);
        let port = PioAddress(*base);
        if device & 1 == 0 {
            let bytes = [value; 8];
            dev.pio_write(port, offset, &bytes[..len]);
        } else {
            let mut bytes = [0u8; 8];
            dev.pio_read(port, offset, &mut bytes[..len]);
        }
    }
});

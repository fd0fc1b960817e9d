//! The host side of the serial console: stdin → guest UART input (through the event loop),
//! with the terminal in raw mode while the VM runs so that keys reach the guest unchanged.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use devices::SerialConsole;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

/// Puts stdin in raw mode for the life of this guard when it is a terminal.
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    pub fn enter() -> RawTerminal {
        let stdin = std::io::stdin().lock();
        let active = std::io::IsTerminal::is_terminal(&stdin) && stdin.set_raw_mode().is_ok();
        RawTerminal { active }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

/// Whether stdin can be watched with epoll: a terminal, pipe or socket. Regular files and
/// /dev/null cannot (epoll refuses them), and a closed stdin has nothing to give.
pub fn stdin_is_pollable() -> bool {
    let fd = std::io::stdin().as_raw_fd();
    // SAFETY: fstat on a raw fd with a valid out-pointer; the result is checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    matches!(
        st.st_mode & libc::S_IFMT,
        libc::S_IFCHR | libc::S_IFIFO | libc::S_IFSOCK
    ) && !is_dev_null(&st)
}

fn is_dev_null(st: &libc::stat) -> bool {
    std::fs::metadata("/dev/null").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.rdev() == st.st_rdev
    })
}

/// Forwards stdin to the guest's UART.
pub struct SerialInput {
    serial: Arc<Mutex<SerialConsole>>,
}

impl SerialInput {
    pub fn new(serial: Arc<Mutex<SerialConsole>>) -> Self {
        SerialInput { serial }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
            log::warn!("serial input disabled: cannot watch stdin: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        // Read no more than the UART FIFO can take; the rest stays in the pipe/terminal
        // until the guest has drained it (level-triggered epoll brings us back).
        let room = serial.input_capacity();
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        if want == 0 {
            // The guest has not drained its FIFO yet; back off instead of spinning on a
            // still-readable stdin.
            drop(serial);
            std::thread::sleep(std::time::Duration::from_millis(5));
            return;
        }
        // Read the fd itself: std's Stdin buffers, and bytes parked in that buffer would never
        // wake epoll again.
        let stdin_fd = std::io::stdin().as_raw_fd();
        // SAFETY: fd 0 stays open for the life of the process; ManuallyDrop keeps the File
        // from closing it.
        let mut raw = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(stdin_fd) });
        match raw.read(&mut buf[..want]) {
            Ok(0) => {
                // EOF: nothing more will come; stop watching.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("serial input stopped: {e}");
                let _ = ops.remove(events);
            }
        }
    }
}

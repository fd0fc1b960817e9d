//! The host side of the serial console: stdin → guest UART input (through the event loop),
//! with the terminal in raw mode while the VM runs so that keys reach the guest unchanged;
//! guest output → a bounded buffer → stdout (drained by the event loop), so that no write to
//! a terminal or pipe ever blocks a vCPU or the VM's teardown. apfvm's own stderr goes
//! through the same kind of non-blocking writer.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::SerialConsole;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
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

/// Holds the guest's console input while the VM is paused (devices quiet): stdin is not
/// read, its bytes wait in the pipe or terminal, and reading goes on when the VM resumes.
pub struct InputGate {
    held: AtomicBool,
    /// Written on release: wakes the event loop's `SerialInput` to watch stdin again.
    released: EventFd,
}

impl InputGate {
    pub fn new() -> std::io::Result<InputGate> {
        Ok(InputGate {
            held: AtomicBool::new(false),
            released: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        // A full counter still wakes the loop.
        let _ = self.released.write(1);
    }

    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }
}

/// Forwards stdin to the guest's UART, except while its gate is held.
pub struct SerialInput {
    serial: Arc<Mutex<SerialConsole>>,
    gate: Arc<InputGate>,
    /// stdin, or another readable fd (tests).
    input: RawFd,
    /// stdin is registered with the event loop (not while held, nor after EOF).
    watching: bool,
    ended: bool,
}

impl SerialInput {
    pub fn new(serial: Arc<Mutex<SerialConsole>>, gate: Arc<InputGate>) -> Self {
        Self::reading(std::io::stdin().as_raw_fd(), serial, gate)
    }

    /// Forwards `input` (an fd that stays open as long as this lives) instead of stdin.
    pub fn reading(input: RawFd, serial: Arc<Mutex<SerialConsole>>, gate: Arc<InputGate>) -> Self {
        SerialInput {
            serial,
            gate,
            input,
            watching: false,
            ended: false,
        }
    }

    fn watch_stdin(&mut self, ops: &mut EventOps) {
        match ops.add(Events::new_raw(self.input, EventSet::IN)) {
            Ok(()) => self.watching = true,
            Err(e) => {
                log::warn!("serial input disabled: cannot watch stdin: {e:?}");
                self.ended = true;
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.gate.released, EventSet::IN)) {
            log::warn!("cannot watch console input releases: {e:?}");
        }
        if !self.gate.is_held() {
            self.watch_stdin(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.gate.released.as_raw_fd() {
            let _ = self.gate.released.read();
            if !self.gate.is_held() && !self.watching && !self.ended {
                self.watch_stdin(ops);
            }
            return;
        }
        if self.gate.is_held() {
            // Paused: leave the bytes where they are until the release.
            let _ = ops.remove(events);
            self.watching = false;
            return;
        }
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
        // SAFETY: the input fd stays open as long as this subscriber (stdin: for the life of
        // the process); ManuallyDrop keeps the File from closing it.
        let mut raw =
            std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(self.input) });
        match raw.read(&mut buf[..want]) {
            Ok(0) => {
                // EOF: nothing more will come; stop watching.
                let _ = ops.remove(events);
                self.watching = false;
                self.ended = true;
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("serial input stopped: {e}");
                let _ = ops.remove(events);
                self.watching = false;
                self.ended = true;
            }
        }
    }
}

/// Where a host stream (stdout, stderr) really goes, so that writing to it never blocks.
enum Sink {
    /// A pipe, FIFO or terminal reopened through /proc with O_NONBLOCK: a description of our
    /// own, so the flag does not leak to whoever shares the original one.
    Reopened(std::fs::File),
    /// A socket: each send says MSG_DONTWAIT.
    Socket(RawFd),
    /// A regular file (writes do not wait for a reader) or whatever could not be reopened.
    Plain(RawFd),
}

/// A host output stream that never blocks its caller: what cannot be written now is left to
/// the caller (`try_write`) or dropped and counted (`Write`).
pub struct HostOutput {
    sink: Sink,
    dropped: AtomicU64,
}

impl HostOutput {
    fn open(fd: RawFd) -> HostOutput {
        // SAFETY: fstat of a raw fd with a valid out-pointer; the result is checked.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mode = if unsafe { libc::fstat(fd, &mut st) } == 0 {
            st.st_mode & libc::S_IFMT
        } else {
            0
        };
        let sink = match mode {
            libc::S_IFSOCK => Sink::Socket(fd),
            libc::S_IFIFO | libc::S_IFCHR => std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(format!("/proc/self/fd/{fd}"))
                .map_or(Sink::Plain(fd), Sink::Reopened),
            _ => Sink::Plain(fd),
        };
        HostOutput {
            sink,
            dropped: AtomicU64::new(0),
        }
    }

    fn fd(&self) -> RawFd {
        match &self.sink {
            Sink::Reopened(file) => file.as_raw_fd(),
            Sink::Socket(fd) | Sink::Plain(fd) => *fd,
        }
    }

    /// Writes what fits now; Ok(0) when the stream would block.
    pub fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        let fd = self.fd();
        loop {
            // SAFETY: writes at most `buf.len()` bytes from a valid buffer to an open fd.
            let n = unsafe {
                match self.sink {
                    Sink::Socket(_) => {
                        libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                    }
                    _ => libc::write(fd, buf.as_ptr().cast(), buf.len()),
                }
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(err),
            }
        }
    }

    /// Writes all of `buf` unless `deadline` passes first; returns how many bytes went.
    pub fn write_until(&self, buf: &[u8], deadline: Instant) -> usize {
        let mut written = 0;
        while written < buf.len() {
            match self.try_write(&buf[written..]) {
                Ok(0) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !self.wait_writable(left) {
                        break;
                    }
                }
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        written
    }

    /// Waits until the stream takes more output, at most `timeout`.
    fn wait_writable(&self, timeout: Duration) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.fd(),
            events: libc::POLLOUT,
            revents: 0,
        }];
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) > 0 }
    }

    /// Bytes dropped because the stream would have blocked.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Log lines and panic reports: what the stream cannot take now is dropped (and counted),
/// never waited for.
impl Write for &HostOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.try_write(buf)? {
            0 => {
                self.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
                Ok(buf.len())
            }
            n => Ok(n),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// apfvm's stdout, where the guest's console goes.
pub fn stdout() -> &'static HostOutput {
    static OUT: OnceLock<HostOutput> = OnceLock::new();
    OUT.get_or_init(|| HostOutput::open(libc::STDOUT_FILENO))
}

/// apfvm's stderr: logs, panic reports, summaries.
pub fn stderr() -> &'static HostOutput {
    static ERR: OnceLock<HostOutput> = OnceLock::new();
    ERR.get_or_init(|| HostOutput::open(libc::STDERR_FILENO))
}

/// Room for guest console output the host has not taken yet.
pub const CONSOLE_BUFFER_BYTES: usize = 256 << 10;

/// The guest's console output on its way to the host: the UART (on a vCPU thread) appends,
/// the main thread's event loop drains. When the host stops taking output (a stalled pipe),
/// the buffer fills and further bytes are dropped and counted: a vCPU never waits for the
/// host's terminal.
pub struct ConsoleOutput {
    queue: Mutex<VecDeque<u8>>,
    dropped: AtomicU64,
    /// Readable while output waits; the event loop listens on it.
    pub pending: EventFd,
}

impl ConsoleOutput {
    pub fn new() -> std::io::Result<ConsoleOutput> {
        Ok(ConsoleOutput {
            queue: Mutex::new(VecDeque::new()),
            dropped: AtomicU64::new(0),
            pending: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    fn push(&self, bytes: &[u8]) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = queue.is_empty();
        let room = CONSOLE_BUFFER_BYTES.saturating_sub(queue.len());
        let taken = room.min(bytes.len());
        queue.extend(&bytes[..taken]);
        drop(queue);
        if taken < bytes.len() {
            self.dropped
                .fetch_add((bytes.len() - taken) as u64, Ordering::Relaxed);
        }
        if was_empty && taken > 0 {
            let _ = self.pending.write(1);
        }
    }

    /// Writes what `out` takes now; returns whether output is still waiting.
    pub fn drain_to(&self, out: &HostOutput) -> bool {
        let _ = self.pending.read();
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while !queue.is_empty() {
            let (front, _) = queue.as_slices();
            match out.try_write(front) {
                Ok(0) => return true,
                Ok(n) => {
                    queue.drain(..n);
                }
                // Nobody to write to (closed pipe, full disk): the output is lost, as on a
                // UART with nothing attached.
                Err(_) => {
                    let lost = queue.len() as u64;
                    queue.clear();
                    self.dropped.fetch_add(lost, Ordering::Relaxed);
                }
            }
        }
        false
    }

    /// Writes out what is left, waiting for `out` at most until `deadline`; the rest is
    /// dropped and counted.
    pub fn flush_until(&self, out: &HostOutput, deadline: Instant) {
        let bytes: Vec<u8> = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        let written = out.write_until(&bytes, deadline);
        self.dropped
            .fetch_add((bytes.len() - written) as u64, Ordering::Relaxed);
    }

    /// Everything waiting, taken out (for a caller that reads the console itself).
    pub fn take(&self) -> Vec<u8> {
        let _ = self.pending.read();
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }

    /// Bytes the guest wrote that the host never took.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The UART's output.
    pub fn writer(self: &Arc<Self>) -> Box<dyn Write + Send> {
        Box::new(ConsoleWriter(self.clone()))
    }
}

struct ConsoleWriter(Arc<ConsoleOutput>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Drains the guest's console output to stdout from the event loop, waiting for stdout to
/// take more (EPOLLOUT) only while output is held back.
pub struct ConsoleDrain {
    output: Arc<ConsoleOutput>,
    waiting_for_stdout: bool,
}

impl ConsoleDrain {
    pub fn new(output: Arc<ConsoleOutput>) -> Self {
        ConsoleDrain {
            output,
            waiting_for_stdout: false,
        }
    }

    fn drain(&mut self, ops: &mut EventOps) {
        let out = stdout();
        let held_back = self.output.drain_to(out);
        let watch = Events::new_raw(out.fd(), EventSet::OUT);
        if held_back && !self.waiting_for_stdout {
            // A regular file never holds output back, and epoll refuses one: only pipes,
            // terminals and sockets get here.
            self.waiting_for_stdout = ops.add(watch).is_ok();
        } else if !held_back && self.waiting_for_stdout {
            let _ = ops.remove(watch);
            self.waiting_for_stdout = false;
        }
    }
}

impl MutEventSubscriber for ConsoleDrain {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.output.pending, EventSet::IN)) {
            log::warn!("guest console output disabled: cannot watch its buffer: {e:?}");
        }
    }

    fn process(&mut self, _: Events, ops: &mut EventOps) {
        self.drain(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_input_stays_in_the_pipe_until_the_gate_is_released() {
        use event_manager::{EventManager, SubscriberOps};
        let mut fds = [0; 2];
        // SAFETY: pipe() fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both ends are new and owned by nothing else.
        let (read_end, mut write_end) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            irq,
            Box::new(std::io::sink()),
        )));
        let fifo = serial.lock().unwrap().input_capacity();
        let gate = Arc::new(InputGate::new().unwrap());
        gate.hold();
        let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().unwrap();
        events.add_subscriber(Box::new(SerialInput::reading(
            read_end.as_raw_fd(),
            serial.clone(),
            gate.clone(),
        )));
        write_end.write_all(b"ls\n").unwrap();
        // Held: nothing watches the pipe, nothing reaches the UART.
        assert_eq!(events.run_with_timeout(50).unwrap(), 0);
        assert_eq!(serial.lock().unwrap().input_capacity(), fifo);
        gate.release();
        while serial.lock().unwrap().input_capacity() == fifo {
            assert!(
                events.run_with_timeout(1000).unwrap() > 0,
                "input after the release"
            );
        }
        assert_eq!(serial.lock().unwrap().input_capacity(), fifo - 3);
        // Held again mid-stream: what comes now waits too.
        gate.hold();
        write_end.write_all(b"pwd\n").unwrap();
        for _ in 0..3 {
            events.run_with_timeout(20).unwrap();
        }
        assert_eq!(serial.lock().unwrap().input_capacity(), fifo - 3);
        drop(read_end);
    }

    #[test]
    fn console_output_is_bounded_and_counts_what_it_drops() {
        let out = Arc::new(ConsoleOutput::new().unwrap());
        let mut w = out.writer();
        w.write_all(b"hello ").unwrap();
        assert_eq!(
            out.pending.read().unwrap(),
            1,
            "the first byte wakes the drain"
        );
        w.write_all(&vec![b'x'; CONSOLE_BUFFER_BYTES]).unwrap();
        assert_eq!(out.dropped(), 6);
        let taken = out.take();
        assert_eq!(taken.len(), CONSOLE_BUFFER_BYTES);
        assert!(taken.starts_with(b"hello x"));
    }

    #[test]
    fn a_stalled_pipe_holds_output_back_without_blocking() {
        let mut fds = [0; 2];
        // SAFETY: pipe() fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let host = HostOutput::open(fds[1]);
        let out = Arc::new(ConsoleOutput::new().unwrap());
        let mut w = out.writer();
        // More than a pipe holds (64 KiB): the drain writes what fits and keeps the rest.
        w.write_all(&vec![b'y'; 200 << 10]).unwrap();
        assert!(out.drain_to(&host), "held back");
        let start = Instant::now();
        out.flush_until(&host, Instant::now() + Duration::from_millis(50));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(out.dropped() > 0);
        // SAFETY: closing the two pipe ends made above.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}

//! Runs inside the Linux guest: toucher threads sweep memory that the host pages out under
//! them (checking every byte against a per-page fingerprint and rewriting it), busy threads
//! count work, and each first touch of a page that takes longer than `--stall-us` counts as
//! a stall together with how much busy work got done meanwhile. With async page faults the
//! busy threads keep running during a stall; without, the vCPU is halted and they do not.
//!
//! `--evict` makes the stalls happen where they are meant to: before every pass a toucher
//! asks apfvm's pager to evict exactly its own pages (frame numbers from /proc/self/pagemap,
//! written to the pager-control port 0xf8 after ioperm()), so the next user-mode touch of
//! each page is a fault the host must serve, which the guest may take asynchronously.
//! `--hotplug-cpu` takes a CPU offline and back online while the touchers' faults are pending.
//!
//! `apfvm-workload --snapshot-request` does nothing else: it asks apfvm for a snapshot (a write
//! to port 0xf0 after ioperm()) and exits 0 once the VM runs on, in the VM that was saved or
//! in one restored from the snapshot (/init's `apfvm.snapshot=1`). The guest kernel has no
//! /dev/port without PCI, and a shell cannot write a port by itself.
//!
//! Threads, not processes: every fork/exec costs seconds of emulated kernel time on hosts
//! that emulate guest kernel mode, and the guest kernel's async PF handling is the same for
//! threads (it parks the faulting task and runs another).
//!
//! Prints one line, `APFVM-WORKLOAD {json}`, and exits 0 when every byte checked out and no
//! task was left blocked; 1 otherwise; 2 on bad usage or a missing facility.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;
/// apfvm's pager-control registers (devices/src/pager_control.rs): first frame, count.
const PAGER_CONTROL_PORT: u16 = 0xf8;
/// apfvm's snapshot-request port (devices/src/snapshot_request.rs): any write asks for one.
const SNAPSHOT_REQUEST_PORT: u16 = 0xf0;

struct Options {
    touchers: usize,
    busy: usize,
    pages_per_toucher: usize,
    passes: u64,
    evict: bool,
    stall_us: u64,
    /// Toucher i and busy thread i run on cpus[i % len]; empty: unpinned.
    cpus: Vec<usize>,
    /// With no touchers: how long the busy threads run.
    seconds: f64,
    toucher_nice: i32,
    hotplug_cpu: Option<usize>,
    hotplug_cycles: u32,
    timeout_s: u64,
    counters: String,
    counter_prefix: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: apfvm-workload [--touchers N] [--busy N] [--mib N | --pages N] [--passes N] [--evict]\n\
         \x20                     [--stall-us U] [--cpu C[,C...]] [--toucher-nice N]\n\
         \x20                     [--hotplug-cpu C] [--hotplug-cycles N]\n\
         \x20                     [--seconds S] [--timeout-s S] [--counters FILE] [--counter-prefix P]\n\
         \x20      apfvm-workload --snapshot-request"
    );
    std::process::exit(2)
}

fn fail(message: &str) -> ! {
    eprintln!("apfvm-workload: {message}");
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut o = Options {
        touchers: 1,
        busy: 1,
        pages_per_toucher: 256,
        passes: 3,
        evict: false,
        stall_us: 1000,
        cpus: Vec::new(),
        seconds: 2.0,
        toucher_nice: 0,
        hotplug_cpu: None,
        hotplug_cycles: 1,
        timeout_s: 120,
        counters: "/proc/vmstat".into(),
        counter_prefix: "apf_".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        fn number<T: std::str::FromStr>(s: String) -> T {
            s.parse().unwrap_or_else(|_| usage())
        }
        match flag.as_str() {
            "--touchers" => o.touchers = number(value()),
            "--busy" => o.busy = number(value()),
            "--mib" => o.pages_per_toucher = number::<usize>(value()) * (1 << 20) / PAGE,
            "--pages" => o.pages_per_toucher = number(value()),
            "--passes" => o.passes = number(value()),
            "--evict" => o.evict = true,
            "--stall-us" => o.stall_us = number(value()),
            "--cpu" => o.cpus = value().split(',').map(|c| number(c.to_string())).collect(),
            "--seconds" => o.seconds = number(value()),
            "--toucher-nice" => o.toucher_nice = number(value()),
            "--hotplug-cpu" => o.hotplug_cpu = Some(number(value())),
            "--hotplug-cycles" => o.hotplug_cycles = number(value()),
            "--timeout-s" => o.timeout_s = number(value()),
            "--counters" => o.counters = value(),
            "--counter-prefix" => o.counter_prefix = value(),
            _ => usage(),
        }
    }
    o
}

/// The guest's async PF counters (`name value` lines with the prefix), e.g. from /proc/vmstat.
fn read_counters(path: &str, prefix: &str) -> Vec<(String, i64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace)?;
            let k = k.trim_end_matches(':');
            if !k.starts_with(prefix) {
                return None;
            }
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Content of word `w` of page `page` after `pass` (pass 0 = populate).
fn fingerprint(toucher: usize, page: usize, pass: u64, w: usize) -> u64 {
    let mut x = (toucher as u64) << 48 ^ (page as u64) << 20 ^ pass << 8 ^ w as u64;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// Keeps this thread on one CPU, so that a test can put a toucher and a busy thread on the
/// same vCPU (the case async page faults are about).
fn pin_to_cpu(cpu: usize) {
    if !try_pin_to_cpu(cpu) {
        fail(&format!("cannot pin to CPU {cpu}"));
    }
}

/// As pin_to_cpu(); false when the CPU is not online.
fn try_pin_to_cpu(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data, valid when zeroed; CPU_SET and sched_setaffinity
    // only read/write that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The CPU-time clock of a thread (the guest kernel's own accounting of when it ran).
fn cpu_clock<T>(thread: &std::thread::JoinHandle<T>) -> libc::clockid_t {
    use std::os::unix::thread::JoinHandleExt;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the thread is alive (joined only at the end), and `clock` is a valid out pointer.
    if unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) } != 0 {
        fail("pthread_getcpuclockid failed");
    }
    clock
}

/// CPU time the busy threads have had so far, ns. The share of a stall they ran for is the
/// guest scheduler's decision, whatever else slows the host down.
fn busy_cpu_ns(clocks: &[libc::clockid_t]) -> u64 {
    clocks
        .iter()
        .map(|&clock| {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `t` is a valid out pointer; a bad clock id only returns an error.
            unsafe { libc::clock_gettime(clock, &mut t) };
            t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
        })
        .sum()
}

/// Sets this thread's nice value. A toucher at -20 keeps its CPU whenever it can run: while
/// the host halts its vCPU on a fault (no async PF) the busy threads get nothing, so the
/// difference async PF makes is not blurred by timer-tick time slicing.
fn set_nice(nice: i32) {
    // SAFETY: plain syscalls on the calling thread (Linux's nice values are per thread).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc != 0 {
        fail(&format!(
            "cannot set nice {nice}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

/// A toucher's memory: page-aligned, so that every page is the toucher's alone and its frame
/// can be evicted without touching anyone else's data.
struct Pages {
    base: *mut u64,
    pages: usize,
}

// SAFETY: the mapping is owned by one toucher thread; the pointer is only moved, not shared.
unsafe impl Send for Pages {}

impl Pages {
    fn map(pages: usize) -> Pages {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            fail(&format!("cannot map {} KiB", pages * PAGE / 1024));
        }
        Pages {
            base: base.cast(),
            pages,
        }
    }

    fn page(&mut self, p: usize) -> &mut [u64] {
        assert!(p < self.pages);
        // SAFETY: page p lies inside the mapping, which lives as long as self, and the
        // &mut self borrow makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(p * WORDS_PER_PAGE), WORDS_PER_PAGE) }
    }

    /// Guest frame numbers of the pages (all populated), from /proc/self/pagemap: bits 0-54
    /// are the frame when bit 63 (present) is set; root is needed to see them.
    fn frames(&self) -> Vec<u64> {
        let pagemap = File::open("/proc/self/pagemap")
            .unwrap_or_else(|e| fail(&format!("/proc/self/pagemap: {e}")));
        let mut raw = vec![0u8; self.pages * 8];
        let offset = (self.base as u64 / PAGE as u64) * 8;
        pagemap
            .read_exact_at(&mut raw, offset)
            .unwrap_or_else(|e| fail(&format!("reading /proc/self/pagemap: {e}")));
        raw.chunks(8)
            .map(|entry| {
                let entry = u64::from_le_bytes(entry.try_into().unwrap());
                let frame = entry & ((1 << 55) - 1);
                if entry >> 63 == 0 || frame == 0 {
                    fail("/proc/self/pagemap shows no frame (not populated, or not root)");
                }
                frame
            })
            .collect()
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in map(); no reference outlives self.
        unsafe { libc::munmap(self.base.cast(), self.pages * PAGE) };
    }
}

/// apfvm's pager-control port, opened for this process with ioperm() (root).
struct PagerControl;

impl PagerControl {
    fn open() -> PagerControl {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        if unsafe { libc::ioperm(PAGER_CONTROL_PORT.into(), 8, 1) } != 0 {
            fail(&format!(
                "ioperm(0x{PAGER_CONTROL_PORT:x}): {}",
                std::io::Error::last_os_error()
            ));
        }
        let control = PagerControl;
        if control.read() == u32::MAX {
            fail("no pager-control port at 0xf8: run apfvm with --pager uffd");
        }
        control
    }

    fn write(&self, offset: u16, value: u32) {
        // SAFETY: ioperm granted this port range; the device has no memory side effects in
        // this process.
        unsafe {
            std::arch::asm!("out dx, eax", in("dx") PAGER_CONTROL_PORT + offset, in("eax") value,
                options(nostack, preserves_flags));
        }
    }

    fn read(&self) -> u32 {
        let value: u32;
        // SAFETY: as in write(); reading the result register has no side effects.
        unsafe {
            std::arch::asm!("in eax, dx", in("dx") PAGER_CONTROL_PORT, out("eax") value,
                options(nostack, preserves_flags));
        }
        value
    }

    /// Asks apfvm's pager to evict `frames` (runs of consecutive frames in one request each);
    /// returns how many pages it evicted.
    fn evict(&self, frames: &[u64]) -> u64 {
        let mut sorted = frames.to_vec();
        sorted.sort_unstable();
        let mut evicted = 0;
        let mut i = 0;
        while i < sorted.len() {
            let first = sorted[i];
            let mut count = 1;
            while i + count < sorted.len() && sorted[i + count] == first + count as u64 {
                count += 1;
            }
            i += count;
            self.write(
                0,
                u32::try_from(first).unwrap_or_else(|_| fail("frame above 2^32")),
            );
            self.write(4, count as u32);
            evicted += u64::from(self.read());
        }
        evicted
    }
}

#[derive(Default)]
struct TouchResult {
    pages_touched: u64,
    pages_evicted: u64,
    bad_words: u64,
    stalls: u64,
    stall_us: u64,
    busy_during_stalls: u64,
    busy_cpu_ns_during_stalls: u64,
    max_touch_us: u64,
}

struct Toucher {
    id: usize,
    pages: usize,
    passes: u64,
    evict: bool,
    /// Taking a CPU offline moves its tasks elsewhere for good: each pass pins again.
    cpu: Option<usize>,
    stall: Duration,
    busy_total: Arc<AtomicU64>,
    busy_clocks: Arc<Vec<libc::clockid_t>>,
    /// Counts passes begun, so the hotplug thread can strike while faults are pending.
    passes_begun: Arc<AtomicU64>,
}

impl Toucher {
    fn run(self) -> TouchResult {
        let mut mem = Pages::map(self.pages);
        let mut r = TouchResult::default();
        // Pass 0 populates: the guest kernel maps and zeroes each page first (in kernel mode,
        // so the host serves those faults synchronously).
        for p in 0..self.pages {
            for (w, word) in mem.page(p).iter_mut().enumerate() {
                *word = fingerprint(self.id, p, 0, w);
            }
        }
        // ioperm() is per thread: each toucher opens the port for itself.
        let control = self.evict.then(PagerControl::open);
        let frames = control.as_ref().map(|_| mem.frames());
        for pass in 1..=self.passes {
            if let Some(cpu) = self.cpu {
                try_pin_to_cpu(cpu);
            }
            if let (Some(control), Some(frames)) = (&control, &frames) {
                r.pages_evicted += control.evict(frames);
            }
            self.passes_begun.fetch_add(1, Ordering::Relaxed);
            for p in 0..self.pages {
                let page = mem.page(p);
                let busy_before = self.busy_total.load(Ordering::Relaxed);
                let busy_cpu_before = busy_cpu_ns(&self.busy_clocks);
                let t0 = Instant::now();
                // The first access is the one that may find the page gone from the host.
                // SAFETY: a read of an initialized u64 through a valid reference.
                let first = unsafe { std::ptr::read_volatile(&page[0]) };
                let took = t0.elapsed();
                if took >= self.stall {
                    r.stalls += 1;
                    r.stall_us += took.as_micros() as u64;
                    r.busy_during_stalls += self.busy_total.load(Ordering::Relaxed) - busy_before;
                    r.busy_cpu_ns_during_stalls +=
                        busy_cpu_ns(&self.busy_clocks).saturating_sub(busy_cpu_before);
                }
                r.max_touch_us = r.max_touch_us.max(took.as_micros() as u64);
                if first != fingerprint(self.id, p, pass - 1, 0) {
                    r.bad_words += 1;
                }
                for (w, word) in page.iter().enumerate().skip(1) {
                    if *word != fingerprint(self.id, p, pass - 1, w) {
                        r.bad_words += 1;
                    }
                }
                for (w, word) in page.iter_mut().enumerate() {
                    *word = fingerprint(self.id, p, pass, w);
                }
                r.pages_touched += 1;
            }
        }
        r
    }
}

/// Takes `cpu` offline and back online `cycles` times while the touchers run, once per pass
/// shortly after it began (faults pending); returns the cycles completed. Offline makes the
/// guest wake every task parked on that CPU.
fn hotplug(cpu: usize, cycles: u32, passes_begun: &AtomicU64, touchers_done: &AtomicBool) -> u32 {
    let online = format!("/sys/devices/system/cpu/cpu{cpu}/online");
    let mut done = 0;
    let mut seen = 0;
    for _ in 0..cycles {
        while passes_begun.load(Ordering::Relaxed) == seen && !touchers_done.load(Ordering::Relaxed)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        seen = passes_begun.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        if touchers_done.load(Ordering::Relaxed) {
            break;
        }
        for state in ["0", "1"] {
            std::fs::write(&online, state)
                .unwrap_or_else(|e| fail(&format!("echo {state} > {online}: {e}")));
        }
        done += 1;
    }
    done
}

/// Tasks in uninterruptible sleep ('D'), system-wide, as "pid/tid comm wchan".
fn blocked_tasks() -> Vec<String> {
    let mut blocked = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return blocked;
    };
    for process in processes.flatten() {
        let Ok(tasks) = std::fs::read_dir(process.path().join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // "tid (comm) S ...": comm may hold spaces, the state follows the last ')'.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if rest.trim_start().starts_with('D') {
                let wchan = std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
                blocked.push(format!(
                    "{}/{} {}) {wchan}",
                    process.file_name().to_string_lossy(),
                    task.file_name().to_string_lossy(),
                    head.split_once(' ').map_or(head, |(_, comm)| comm),
                ));
            }
        }
    }
    blocked
}

/// Asks apfvm for a snapshot of the VM, taken right after this port write; returns once the
/// VM runs again (resumed, or restored from the snapshot in a new apfvm). Exits 2 when there is
/// no snapshot-request port (not apfvm, or one without snapshots).
fn snapshot_request() -> ! {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(SNAPSHOT_REQUEST_PORT.into(), 1, 1) } != 0 {
        fail(&format!(
            "ioperm(0x{SNAPSHOT_REQUEST_PORT:x}): {}",
            std::io::Error::last_os_error()
        ));
    }
    let present: u8;
    // SAFETY: ioperm granted the port; reading it has no side effects (apfvm's device reads
    // 0, an unassigned port 0xff).
    unsafe {
        std::arch::asm!("in al, dx", in("dx") SNAPSHOT_REQUEST_PORT, out("al") present,
            options(nostack, preserves_flags));
    }
    if present == 0xff {
        fail("no snapshot-request port at 0xf0 (an apfvm without snapshots?)");
    }
    // SAFETY: as above; the write only makes apfvm pause, save and resume (or stop) the VM.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") SNAPSHOT_REQUEST_PORT, in("al") 1u8,
            options(nostack, preserves_flags));
    }
    std::process::exit(0)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--snapshot-request") {
        if std::env::args().len() != 2 {
            usage();
        }
        snapshot_request();
    }
    let o = parse_options();
    if o.pages_per_toucher == 0 || o.seconds.is_nan() || o.seconds < 0.0 {
        usage();
    }
    let before = read_counters(&o.counters, &o.counter_prefix);
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let busy_total = Arc::new(AtomicU64::new(0));

    let mut busy_threads = Vec::new();
    let cpu_of = |i: usize| (!o.cpus.is_empty()).then(|| o.cpus[i % o.cpus.len()]);
    for i in 0..o.busy {
        let (stop, busy_total, cpu) = (stop.clone(), busy_total.clone(), cpu_of(i));
        busy_threads.push(std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin_to_cpu(cpu);
            }
            let mut local = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..1000 {
                    local = std::hint::black_box(local.wrapping_add(1));
                }
                busy_total.fetch_add(1000, Ordering::Relaxed);
            }
        }));
    }
    let busy_clocks: Arc<Vec<libc::clockid_t>> =
        Arc::new(busy_threads.iter().map(cpu_clock).collect());
    let passes_begun = Arc::new(AtomicU64::new(0));
    let (results, finished) = mpsc::channel();
    for id in 0..o.touchers {
        let toucher = Toucher {
            id,
            pages: o.pages_per_toucher,
            passes: o.passes,
            evict: o.evict,
            cpu: cpu_of(id),
            stall: Duration::from_micros(o.stall_us),
            busy_total: busy_total.clone(),
            busy_clocks: busy_clocks.clone(),
            passes_begun: passes_begun.clone(),
        };
        let (results, cpu, nice) = (results.clone(), cpu_of(id), o.toucher_nice);
        std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin_to_cpu(cpu);
            }
            set_nice(nice);
            let _ = results.send(toucher.run());
        });
    }
    drop(results);
    let touchers_done = Arc::new(AtomicBool::new(false));
    let hotplugger = o.hotplug_cpu.map(|cpu| {
        let (cycles, begun, done) = (
            o.hotplug_cycles,
            passes_begun.clone(),
            touchers_done.clone(),
        );
        std::thread::spawn(move || hotplug(cpu, cycles, &begun, &done))
    });

    // A toucher that never comes back is parked on a page-ready that never came: report the
    // blocked tasks instead of hanging.
    let deadline = start + Duration::from_secs(o.timeout_s);
    let mut total = TouchResult::default();
    let mut stuck_touchers = 0;
    for _ in 0..o.touchers {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(r) = finished.recv_timeout(left) else {
            stuck_touchers += 1;
            continue;
        };
        total.pages_touched += r.pages_touched;
        total.pages_evicted += r.pages_evicted;
        total.bad_words += r.bad_words;
        total.stalls += r.stalls;
        total.stall_us += r.stall_us;
        total.busy_during_stalls += r.busy_during_stalls;
        total.busy_cpu_ns_during_stalls += r.busy_cpu_ns_during_stalls;
        total.max_touch_us = total.max_touch_us.max(r.max_touch_us);
    }
    if o.touchers == 0 {
        // Busy threads alone: the baseline a stall is measured against.
        std::thread::sleep(Duration::from_secs_f64(o.seconds));
    }
    touchers_done.store(true, Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    let busy_ops = busy_total.load(Ordering::Relaxed);
    let hotplug_cycles = if stuck_touchers == 0 {
        stop.store(true, Ordering::Relaxed);
        for b in busy_threads {
            b.join().expect("busy thread");
        }
        hotplugger.map_or(0, |h| h.join().expect("hotplug thread"))
    } else {
        0
    };
    let blocked = blocked_tasks();
    let after = read_counters(&o.counters, &o.counter_prefix);
    let counters: Vec<String> = after
        .iter()
        .map(|(k, v)| {
            // Gauges are reported as they are now, everything else as the change over the run.
            let was = before.iter().find(|(bk, _)| bk == k).map_or(0, |(_, b)| *b);
            let gauge = k.ends_with("_now") || k.ends_with("_max") || k.ends_with("_cpus");
            format!("\"{k}\":{}", if gauge { *v } else { v - was })
        })
        .collect();
    let ok = total.bad_words == 0 && stuck_touchers == 0 && blocked.is_empty();
    let stall_s = total.stall_us as f64 / 1e6;
    let busy_rate_during_stalls = if stall_s > 0.0 {
        total.busy_during_stalls as f64 / stall_s
    } else {
        0.0
    };
    println!(
        "APFVM-WORKLOAD {{\"verdict\":\"{}\",\"touchers\":{},\"busy\":{},\"passes\":{},\
         \"seconds\":{seconds:.3},\"pages_touched\":{},\"pages_evicted\":{},\"bad_words\":{},\
         \"stalls\":{},\"stall_seconds\":{stall_s:.3},\"max_touch_us\":{},\"busy_ops\":{busy_ops},\
         \"busy_ops_during_stalls\":{},\"busy_rate\":{:.0},\
         \"busy_rate_during_stalls\":{:.0},\"busy_share_during_stalls\":{:.3},\
         \"hotplug_cycles\":{hotplug_cycles},\"stuck_touchers\":{stuck_touchers},\
         \"blocked_tasks\":[{}],\"counters\":{{{}}}}}",
        if ok { "pass" } else { "fail" },
        o.touchers,
        o.busy,
        o.passes,
        total.pages_touched,
        total.pages_evicted,
        total.bad_words,
        total.stalls,
        total.max_touch_us,
        total.busy_during_stalls,
        busy_ops as f64 / seconds,
        busy_rate_during_stalls,
        if stall_s > 0.0 {
            total.busy_cpu_ns_during_stalls as f64 / 1e9 / stall_s
        } else {
            0.0
        },
        blocked
            .iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(","),
        counters.join(",")
    );
    std::process::exit(if ok { 0 } else { 1 });
}

//! Runs inside the Linux guest: toucher threads sweep memory the host pages out under them
//! (checking every byte against a per-page fingerprint and rewriting it), busy threads count
//! work, and each touch that takes longer than `--stall-us` counts as a stall together with
//! how much busy work got done meanwhile. With async page faults the busy threads keep
//! running during a stall; without, the vCPU is halted and they do not.
//!
//! Threads, not processes: every fork/exec costs seconds of emulated kernel time on hosts
//! that emulate guest kernel mode, and the guest kernel's async PF handling is the same for
//! threads (it parks the faulting task and runs another).
//!
//! Prints one line: `APFVM-WORKLOAD {json}` and exits 0 when every byte checked out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

struct Options {
    touchers: usize,
    busy: usize,
    mib_per_toucher: usize,
    seconds: f64,
    stall_us: u64,
    counters: String,
    counter_prefix: String,
    cpus: Option<usize>,
}

fn usage() -> ! {
    eprintln!(
        "usage: apfvm-workload [--touchers N] [--busy N] [--mib N] [--seconds S] [--stall-us U]\n\
         \x20                     [--counters FILE] [--counter-prefix P] [--pin-cpus N]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut o = Options {
        touchers: 2,
        busy: 1,
        mib_per_toucher: 8,
        seconds: 10.0,
        stall_us: 2000,
        counters: "/proc/vmstat".into(),
        counter_prefix: "apf_".into(),
        cpus: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--touchers" => o.touchers = value().parse().unwrap_or_else(|_| usage()),
            "--busy" => o.busy = value().parse().unwrap_or_else(|_| usage()),
            "--mib" => o.mib_per_toucher = value().parse().unwrap_or_else(|_| usage()),
            "--seconds" => o.seconds = value().parse().unwrap_or_else(|_| usage()),
            "--stall-us" => o.stall_us = value().parse().unwrap_or_else(|_| usage()),
            "--counters" => o.counters = value(),
            "--counter-prefix" => o.counter_prefix = value(),
            "--pin-cpus" => o.cpus = Some(value().parse().unwrap_or_else(|_| usage())),
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

#[derive(Default)]
struct TouchResult {
    pages_touched: u64,
    bad_words: u64,
    stalls: u64,
    busy_during_stalls: u64,
    max_touch_us: u64,
}

/// Keeps this thread on one CPU, so that a test can put a toucher and a busy thread on the
/// same vCPU (the case async page faults are about).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, valid when zeroed; CPU_SET and sched_setaffinity
    // only read/write that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("apfvm-workload: cannot pin to CPU {cpu}");
        }
    }
}

fn toucher(
    id: usize,
    mib: usize,
    deadline: Instant,
    stall: Duration,
    busy_total: Arc<AtomicU64>,
) -> TouchResult {
    let pages = mib * 1024 * 1024 / PAGE;
    let words = PAGE / 8;
    let mut mem = vec![0u64; pages * words];
    let mut r = TouchResult::default();
    // Pass 0 populates: the guest kernel maps and zeroes each page first.
    for (p, page) in mem.chunks_mut(words).enumerate() {
        for (w, word) in page.iter_mut().enumerate() {
            *word = fingerprint(id, p, 0, w);
        }
    }
    let mut pass = 0u64;
    while Instant::now() < deadline {
        pass += 1;
        for (p, page) in mem.chunks_mut(words).enumerate() {
            let busy_before = busy_total.load(Ordering::Relaxed);
            let t0 = Instant::now();
            // The first access is the one that may find the page gone from the host.
            // SAFETY: a read of an initialized u64 through a valid reference.
            let first = unsafe { std::ptr::read_volatile(&page[0]) };
            let took = t0.elapsed();
            if took >= stall {
                r.stalls += 1;
                r.busy_during_stalls += busy_total.load(Ordering::Relaxed) - busy_before;
            }
            r.max_touch_us = r.max_touch_us.max(took.as_micros() as u64);
            if first != fingerprint(id, p, pass - 1, 0) {
                r.bad_words += 1;
            }
            for (w, word) in page.iter_mut().enumerate().skip(1) {
                if *word != fingerprint(id, p, pass - 1, w) {
                    r.bad_words += 1;
                }
            }
            for (w, word) in page.iter_mut().enumerate() {
                *word = fingerprint(id, p, pass, w);
            }
            r.pages_touched += 1;
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    // A partially rewritten last pass is fine: the check above is per page, before rewrite.
    std::hint::black_box(&mem);
    r
}

fn main() {
    let o = parse_options();
    let before = read_counters(&o.counters, &o.counter_prefix);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.seconds);
    let stall = Duration::from_micros(o.stall_us);
    let stop = Arc::new(AtomicBool::new(false));
    let busy_total = Arc::new(AtomicU64::new(0));

    let mut busy_threads = Vec::new();
    for i in 0..o.busy {
        let (stop, busy_total) = (stop.clone(), busy_total.clone());
        let cpus = o.cpus;
        busy_threads.push(std::thread::spawn(move || {
            if let Some(n) = cpus {
                pin_to_cpu(i % n);
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
    let mut touchers = Vec::new();
    for id in 0..o.touchers {
        let busy_total = busy_total.clone();
        let (mib, cpus) = (o.mib_per_toucher, o.cpus);
        touchers.push(std::thread::spawn(move || {
            if let Some(n) = cpus {
                pin_to_cpu(id % n);
            }
            toucher(id, mib, deadline, stall, busy_total)
        }));
    }
    let mut total = TouchResult::default();
    for t in touchers {
        let r = t.join().expect("toucher thread");
        total.pages_touched += r.pages_touched;
        total.bad_words += r.bad_words;
        total.stalls += r.stalls;
        total.busy_during_stalls += r.busy_during_stalls;
        total.max_touch_us = total.max_touch_us.max(r.max_touch_us);
    }
    stop.store(true, Ordering::Relaxed);
    for b in busy_threads {
        b.join().expect("busy thread");
    }
    let after = read_counters(&o.counters, &o.counter_prefix);
    let deltas: Vec<String> = after
        .iter()
        .map(|(k, v)| {
            let was = before.iter().find(|(bk, _)| bk == k).map_or(0, |(_, b)| *b);
            format!("\"{k}\":{}", v - was)
        })
        .collect();
    let verdict = if total.bad_words == 0 { "pass" } else { "fail" };
    println!(
        "APFVM-WORKLOAD {{\"verdict\":\"{verdict}\",\"touchers\":{},\"busy\":{},\"seconds\":{:.2},\
         \"pages_touched\":{},\"bad_words\":{},\"stalls\":{},\"max_touch_us\":{},\"busy_ops\":{},\
         \"busy_ops_during_stalls\":{},\"counters\":{{{}}}}}",
        o.touchers,
        o.busy,
        start.elapsed().as_secs_f64(),
        total.pages_touched,
        total.bad_words,
        total.stalls,
        total.max_touch_us,
        busy_total.load(Ordering::Relaxed),
        total.busy_during_stalls,
        deltas.join(",")
    );
    std::process::exit(if total.bad_words == 0 { 0 } else { 1 });
}

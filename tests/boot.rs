//! Booting guests with the real `apfvm` binary under KVM: the reference guest on 1 and 2
//! vCPUs, exit codes, guest crashes, bad input, and Debian's packaged kernel.

mod common;

use std::time::Duration;

use common::*;

const GUEST_LIMIT: Duration = Duration::from_secs(60);

fn assert_reference_guest_booted(run: &Run, cpus: usize) {
    assert_eq!(
        run.lines_with("apfvm-ref: mptable"),
        vec![format!("apfvm-ref: mptable cpus={cpus} bsp_apic=0").as_str()],
        "{}",
        run.describe()
    );
    let mut up = run.lines_with("apfvm-ref: cpu ");
    up.sort_unstable();
    let expected: Vec<String> = (0..cpus)
        .map(|i| format!("apfvm-ref: cpu {i} apic {i} long mode"))
        .collect();
    assert_eq!(up, expected, "{}", run.describe());
    assert!(
        run.stdout
            .contains(&format!("apfvm-ref: all {cpus} cpus up")),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains(&format!(
            r#"APFVM-RESULT {{"verdict":"pass","cpus":{cpus}}}"#
        )),
        "{}",
        run.describe()
    );
}

/// Boots with `args` and checks the reference guest came up on `cpus` CPUs and apfvm exited
/// with `code`; returns the run (None when KVM tests are skipped).
fn boots_and_exits(args: &[&str], cpus: usize, code: i32) -> Option<Run> {
    if !kvm_available() {
        return None;
    }
    let run = apfvm(args, GUEST_LIMIT);
    assert_reference_guest_booted(&run, cpus);
    assert_eq!(run.code(), Some(code), "{}", run.describe());
    Some(run)
}

#[test]
fn reference_guest_boots_on_one_vcpu() {
    boots_and_exits(&["run", "--kernel", REFERENCE_GUEST, "--vcpus", "1"], 1, 0);
}

#[test]
fn reference_guest_boots_all_vcpus_through_init_sipi() {
    boots_and_exits(&["run", "--kernel", REFERENCE_GUEST, "--vcpus", "2"], 2, 0);
}

#[test]
fn demo_command_boots_the_built_in_guest_on_memfd_ram() {
    boots_and_exits(
        &["demo", "--vcpus", "2", "--memory", "memfd", "--mem", "64M"],
        2,
        0,
    );
}

#[test]
fn debug_exit_port_sets_the_exit_code_and_cmdline_reaches_the_guest() {
    let args = [
        "run",
        "--kernel",
        REFERENCE_GUEST,
        "--cmdline",
        "exit=42 hello",
    ];
    if let Some(run) = boots_and_exits(&args, 1, 42) {
        let line = r#"apfvm-ref: boot cmdline="exit=42 hello""#;
        assert!(run.stdout.contains(line), "{}", run.describe());
    }
}

#[test]
fn config_file_settings_apply_and_flags_win() {
    let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let toml =
        format!("kernel = {REFERENCE_GUEST:?}\nvcpus = 2\ncmdline = \"exit=5\"\nmem = \"64M\"\n");
    std::fs::write(file.as_path(), toml).unwrap();
    let config = file.as_path().to_str().unwrap();
    boots_and_exits(&["run", "--config", config], 2, 5);
    boots_and_exits(&["run", "--config", config, "--vcpus", "1"], 1, 5);
}

#[test]
fn apf_switch_shows_or_hides_async_pf_in_the_guests_cpuid() {
    if !kvm_available() {
        return;
    }
    let line = |run: &Run| run.lines_with("apfvm-ref: kvm signature=").concat();
    let on = apfvm(&["demo", "--apf", "on"], GUEST_LIMIT);
    assert_eq!(on.code(), Some(0), "{}", on.describe());
    assert!(
        line(&on).contains(r#"signature="KVMKVMKVM""#),
        "{}",
        on.describe()
    );
    assert!(
        line(&on).ends_with("async_pf=1 async_pf_int=1"),
        "{}",
        on.describe()
    );
    let off = apfvm(&["demo", "--apf", "off"], GUEST_LIMIT);
    assert_eq!(off.code(), Some(0), "{}", off.describe());
    assert!(
        line(&off).ends_with("async_pf=0 async_pf_int=0"),
        "{}",
        off.describe()
    );
}

#[test]
fn writes_to_unassigned_ports_are_ignored() {
    boots_and_exits(
        &["run", "--kernel", REFERENCE_GUEST, "--cmdline", "fail=port"],
        1,
        0,
    );
}

#[test]
fn guest_triple_fault_stops_the_vm_with_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let run = apfvm(
        &[
            "run",
            "--kernel",
            REFERENCE_GUEST,
            "--cmdline",
            "fail=triple",
        ],
        GUEST_LIMIT,
    );
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    let err = &run.stderr;
    assert!(
        err.contains("vCPU 0 stopped the VM: triple fault (KVM_EXIT_SHUTDOWN)"),
        "{}",
        run.describe()
    );
    assert!(err.contains("at RIP 0x"), "{}", run.describe());
    // The guest faults on `ud2` (0f 0b).
    assert!(
        err.contains("instruction bytes: 0f 0b"),
        "{}",
        run.describe()
    );
}

#[test]
fn sigterm_stops_the_vm_with_exit_code_143() {
    if !kvm_available() {
        return;
    }
    // The guest parks its CPUs without exiting when told to wait (`hold`), so only the signal
    // can end it.
    let vm = watch(&["run", "--kernel", REFERENCE_GUEST, "--cmdline", "hold"]);
    vm.wait_for_stdout("apfvm-ref: holding", GUEST_LIMIT);
    vm.signal(libc::SIGTERM);
    let run = vm.finish(GUEST_LIMIT);
    assert_eq!(run.code(), Some(143), "{}", run.describe());
}

/// Once the VM runs, every apfvm thread is under its seccomp filter with no-new-privileges,
/// and apfvm holds no descriptor it inherited nor /dev/kvm itself; with --no-seccomp none is.
#[test]
fn running_vm_is_confined_and_holds_only_its_own_descriptors() {
    if !kvm_available() {
        return;
    }
    // A descriptor the child inherits (dup() clears close-on-exec), of a file it would
    // never open itself.
    let inherited = std::fs::File::open(APFVM).unwrap();
    // SAFETY: dup of a descriptor we own; the copy is closed below.
    let leaked = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&inherited)) };
    assert!(leaked > 2);
    for (flags, confined) in [(&[][..], true), (&["--no-seccomp"][..], false)] {
        let mut args = vec![
            "demo",
            "--vcpus",
            "2",
            "--pager",
            "uffd",
            "--cmdline",
            "hold",
        ];
        args.extend_from_slice(flags);
        let vm = watch(&args);
        let pid = vm.pid();
        vm.wait_for_stdout("apfvm-ref: holding", GUEST_LIMIT);
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| {
                let target = std::fs::read_link(e.path()).unwrap_or_default();
                format!(
                    "{} -> {}",
                    e.file_name().to_string_lossy(),
                    target.display()
                )
            })
            .collect();
        let threads: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|t| {
                let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                (name.trim().to_string(), status)
            })
            .collect();
        vm.signal(libc::SIGTERM);
        let run = vm.finish(GUEST_LIMIT);
        assert_eq!(run.code(), Some(143), "{}", run.describe());
        assert!(
            !fds.iter()
                .any(|f| f.ends_with(APFVM) || f.ends_with("/dev/kvm")),
            "{fds:?}"
        );
        let apfvm_threads: Vec<_> = threads
            .iter()
            .filter(|(name, _)| {
                ["apfvm", "vcpu", "pager"]
                    .iter()
                    .any(|p| name.starts_with(p))
            })
            .collect();
        assert!(apfvm_threads.len() >= 5, "{threads:?}");
        for (name, status) in apfvm_threads {
            let line = |key: &str| status.lines().find(|l| l.starts_with(key)).unwrap_or("");
            let (seccomp, nnp) = (line("Seccomp:"), line("NoNewPrivs:"));
            if confined {
                assert!(
                    seccomp.ends_with('2') && nnp.ends_with('1'),
                    "{name}: {seccomp} {nnp}"
                );
            } else {
                assert!(seccomp.ends_with('0'), "{name}: {seccomp}");
            }
        }
    }
    // SAFETY: closing the duplicate made above.
    unsafe { libc::close(leaked) };
}

fn assert_clear_error(args: &[&str], code: i32, needle: &str) {
    let run = apfvm(args, Duration::from_secs(20));
    assert_eq!(run.code(), Some(code), "{args:?}: {}", run.describe());
    assert!(
        run.stderr.contains(needle),
        "{args:?}: stderr should name the problem ({needle:?}): {}",
        run.describe()
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.describe());
}

#[test]
fn bad_input_gets_a_clear_error_and_nonzero_exit() {
    assert_clear_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        1,
        "kernel image /nonexistent/vmlinux: No such file",
    );
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    assert_clear_error(
        &["run", "--kernel", manifest],
        1,
        "neither an ELF (vmlinux) nor a bzImage",
    );
    assert_clear_error(&["demo", "--vcpus", "0"], 1, "--vcpus 0 is out of range");
    assert_clear_error(&["demo", "--mem", "1M"], 1, "--mem 1M is too small");
    assert_clear_error(&["demo", "--mem", "lots"], 1, "bad memory size 'lots'");
    assert_clear_error(
        &["demo", "--cpu-features", "-warp"],
        1,
        "unknown CPU feature 'warp'",
    );
    assert_clear_error(&["run", "--vcpus", "1"], 1, "no kernel given");
    assert_clear_error(
        &["demo", "--kvm-device", "/nonexistent/kvm"],
        1,
        "/nonexistent/kvm does not exist",
    );
    assert_clear_error(
        &["demo", "--kvm-device", "/dev/null"],
        1,
        "it is not a KVM device",
    );
    assert_clear_error(
        &["run", "--frobnicate"],
        2,
        "unexpected argument '--frobnicate'",
    );
    assert_clear_error(
        &["run", "--config", "/nonexistent/vm.toml"],
        1,
        "cannot read config file /nonexistent/vm.toml",
    );
    assert_clear_error(
        &[
            "demo",
            "--pager",
            "uffd",
            "--fault-latency",
            "9300000000000000000s",
        ],
        1,
        "is longer than the longest modelled fetch, 1 hour",
    );
    let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
    image.as_file().set_len(256 << 20).unwrap();
    let image = image.as_path().to_str().unwrap().to_string();
    assert_clear_error(
        &["demo", "--pager", "uffd", "--memory-image", &image],
        1,
        "larger than guest RAM (134217728 bytes)",
    );
    assert_clear_error(
        &["bench", "--floor-pages", "0"],
        1,
        "--floor-pages must be at least 1",
    );
}

/// Debian's real cloud kernel (fetched with apt: needs the network). On hosts that emulate
/// guest kernel mode it prints its banner and then executes an instruction the emulator lacks
/// (cmpxchg16b): apfvm must say so clearly and exit 1. On a stock KVM host it gets further,
/// panics on the missing root filesystem and reboots after `panic=1`: exit 0.
#[test]
fn debian_cloud_kernel_from_the_network_prints_its_banner_and_ends_cleanly() {
    if !kvm_available() {
        return;
    }
    let (_bzimage, vmlinux) = debian_kernel();
    let run = apfvm(
        &[
            "run",
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--mem",
            "256M",
            "--cmdline",
            "earlyprintk=serial console=ttyS0 panic=1 reboot=k",
        ],
        Duration::from_secs(300),
    );
    assert!(
        run.stdout.contains("Linux version 6.1"),
        "{}",
        run.describe()
    );
    if !host_emulates_guest_kernel_mode() {
        assert_eq!(run.code(), Some(0), "{}", run.describe());
        assert!(run.stdout.contains("Kernel panic"), "{}", run.describe());
        return;
    }
    assert_eq!(run.code(), Some(1), "{}", run.describe());
    assert!(
        run.stderr
            .contains("vCPU 0 stopped the VM: KVM internal error: emulation failure"),
        "{}",
        run.describe()
    );
    assert!(run.stderr.contains("at RIP 0x"), "{}", run.describe());
    // lock cmpxchg16b (f0 48 0f c7 ..), the first instruction the emulator lacks.
    assert!(
        run.stderr.contains("instruction bytes: f0 48 0f c7"),
        "{}",
        run.describe()
    );
}

/// Debian's vmlinux (fetched with apt: needs the network) does not fit in 16 MiB.
#[test]
fn memory_too_small_for_a_real_kernel_from_the_network_is_reported() {
    if !kvm_available() {
        return;
    }
    // Debian's vmlinux loads up to 62 MiB.
    let (_bzimage, vmlinux) = debian_kernel();
    assert_clear_error(
        &["run", "--kernel", vmlinux.to_str().unwrap(), "--mem", "16M"],
        1,
        "guest memory is too small for kernel",
    );
}

/// Debian's bzImage (fetched with apt: needs the network) is accepted, entered and kept
/// running until apfvm is told to stop (the loader's unit tests check the bzImage layout
/// itself). Without `panic=`, a kernel that gets as far as the missing root filesystem waits
/// there too, so the signal ends the run on every host.
#[test]
fn bzimage_from_the_network_is_loaded_and_entered() {
    if !kvm_available() {
        return;
    }
    let (bzimage, _vmlinux) = debian_kernel();
    let metrics = vmm_sys_util::tempfile::TempFile::new().unwrap();
    let vm = watch(&[
        "run",
        "--kernel",
        bzimage.to_str().unwrap(),
        "--mem",
        "256M",
        "--cmdline",
        "console=ttyS0",
        "--metrics-file",
        metrics.as_path().to_str().unwrap(),
        "--metrics-interval",
        "20ms",
    ]);
    // Running: the metrics writer starts with the vCPU threads. (A bzImage's decompressor
    // may run for minutes without an exit, so KVM_RUN need not have returned yet.)
    vm.wait_for_metrics(metrics.as_path(), GUEST_LIMIT, |lines| {
        lines.iter().any(|l| l["type"] == "interval")
    });
    vm.signal(libc::SIGTERM);
    let run = vm.finish(GUEST_LIMIT);
    assert_eq!(run.code(), Some(143), "{}", run.describe());
}

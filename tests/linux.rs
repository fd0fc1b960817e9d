//! Linux under apfvm: the project's own kernel (Debian's linux-source-6.1 + the patch series
//! in guest-kernel-patches/, built by resources/linux/build.sh), an initramfs with busybox and
//! the static `apfvm-workload`, booted by the real apfvm binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(300);

/// What the guest kernel needs on hosts that emulate guest kernel mode (see
/// resources/linux/README.md); harmless elsewhere.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 noxsave nofsgsbase noinvpcid \
    nopcid clearcpuid=308,295,151,158,306,534,297,580 tsc=reliable rodata=off quiet";

struct LinuxGuest {
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Builds (once, cached across runs by build.sh's stamps) the workload program statically,
/// then the kernel and the initramfs that carries it.
fn linux_guest() -> &'static LinuxGuest {
    static GUEST: OnceLock<LinuxGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let target_dir = repo().join("target/workload-static");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "apfvm-workload", "--target-dir"])
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(repo())
            .status()
            .expect("run cargo for the workload");
        assert!(status.success(), "building apfvm-workload failed");
        let extra = cache_dir().join("linux-initramfs-extra");
        std::fs::create_dir_all(extra.join("bin")).unwrap();
        std::fs::copy(
            target_dir.join("release/apfvm-workload"),
            extra.join("bin/apfvm-workload"),
        )
        .unwrap();
        let out = cache_dir().join("linux");
        let status = Command::new("bash")
            .arg(repo().join("resources/linux/build.sh"))
            .arg(&out)
            .env("APFVM_INITRAMFS_EXTRA", &extra)
            .status()
            .expect("run resources/linux/build.sh");
        assert!(status.success(), "building the Linux guest failed");
        LinuxGuest {
            vmlinux: out.join("vmlinux"),
            initramfs: out.join("initramfs.cpio"),
        }
    })
}

/// Boots Linux with `flags`, runs `command` as its /init payload, and checks it reached
/// userspace on `vcpus` CPUs, ran the command with exit status 0 and rebooted (apfvm 0).
fn boot_linux(vcpus: u8, flags: &[&str], command: &str) -> Option<Run> {
    if !kvm_available() {
        return None;
    }
    let guest = linux_guest();
    let _one_at_a_time = exclusive();
    let cmdline = format!("{BASE_CMDLINE} apfvm.cmd=\"{command}\"");
    let vcpus = vcpus.to_string();
    let mut args = vec![
        "run",
        "--kernel",
        guest.vmlinux.to_str().unwrap(),
        "--initrd",
        guest.initramfs.to_str().unwrap(),
        "--vcpus",
        &vcpus,
        "--mem",
        "256M",
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(flags);
    let run = apfvm(&args, LIMIT);
    let up = format!("APFVM-LINUX: userspace up cpus={vcpus}");
    assert!(run.stdout.contains(&up), "{}", run.describe());
    assert!(
        run.stdout.contains("APFVM-LINUX: exit 0"),
        "{}",
        run.describe()
    );
    assert_eq!(run.code(), Some(0), "{}", run.describe());
    Some(run)
}

#[test]
fn linux_boots_runs_a_command_and_powers_off_on_one_and_two_vcpus() {
    for vcpus in [1, 2] {
        let Some(run) = boot_linux(vcpus, &[], "cat /sys/devices/system/cpu/online") else {
            return;
        };
        let online = if vcpus == 1 { "0" } else { "0-1" };
        assert!(
            run.stdout.lines().any(|l| l.trim() == online),
            "{}",
            run.describe()
        );
    }
}

//! The project's Linux guest as programs drive it (resources/linux: kernel, initramfs with
//! /init and apfvm-workload): where build.sh puts it, the kernel command line it needs, and
//! how to read what it prints.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The kernel command line for the project's Linux guest. Everything after `panic=-1` is for
/// hosts that emulate guest kernel mode (resources/linux/README.md says why for each); on
/// ordinary KVM hosts it costs nothing that matters.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 noxsave nofsgsbase noinvpcid \
    nopcid clearcpuid=308,295,151,158,306,534,297,580 tsc=reliable rodata=off quiet \
    percpu_alloc=page";

/// /init's line once user space runs: `APFVM-LINUX: userspace up cpus=N ...`.
pub const USERSPACE_UP: &str = "APFVM-LINUX: userspace up cpus=";
/// /init's line after the command: `APFVM-LINUX: exit STATUS`.
pub const COMMAND_EXIT: &str = "APFVM-LINUX: exit ";
/// The kernel command line word that makes /init ask for a snapshot right after "userspace up"
/// and then take its commands from the console.
pub const SNAPSHOT_WORD: &str = "apfvm.snapshot=1";
/// /init's line just before it asks apfvm for a snapshot.
pub const SNAPSHOT_REQUESTED: &str = "APFVM-LINUX: snapshot requested";
/// /init's line whenever it waits for a command line on the console.
pub const READY: &str = "APFVM-LINUX: ready";
/// /init's line after each command from the console: `APFVM-LINUX: done STATUS`.
pub const COMMAND_DONE: &str = "APFVM-LINUX: done ";
const WORKLOAD_RESULT: &str = "APFVM-WORKLOAD ";

/// build.sh's default output directory under a repository checkout.
pub fn default_dir(repo: &Path) -> PathBuf {
    repo.join(".cache/linux")
}

pub fn vmlinux(dir: &Path) -> PathBuf {
    dir.join("vmlinux")
}

/// The uncompressed initramfs (the gzip one costs a minute of emulated inflate on PVM).
pub fn initramfs(dir: &Path) -> PathBuf {
    dir.join("initramfs.cpio")
}

/// The command line that makes /init run `command` (one line, no `"`), then reboot.
pub fn cmdline_running(command: &str) -> Result<String, String> {
    if command.contains('"') || command.contains('\n') {
        return Err(format!(
            "a command for apfvm.cmd= cannot hold '\"' or newlines: {command}"
        ));
    }
    Ok(format!("{BASE_CMDLINE} apfvm.cmd=\"{command}\""))
}

/// The command line that makes /init ask for a snapshot once user space is up, then run
/// the commands it reads from the console.
pub fn cmdline_snapshot_then_console() -> String {
    format!("{BASE_CMDLINE} {SNAPSHOT_WORD}")
}

/// The exit status /init reported for the command, if it got that far.
pub fn command_status(stdout: &str) -> Option<i32> {
    status_after(stdout, COMMAND_EXIT)
}

/// The status of the first console command /init finished in `stdout` (its
/// `APFVM-LINUX: done STATUS` line).
pub fn console_command_status(stdout: &str) -> Option<i32> {
    status_after(stdout, COMMAND_DONE)
}

fn status_after(stdout: &str, marker: &str) -> Option<i32> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(marker)?.trim().parse().ok())
}

/// apfvm-workload's `APFVM-WORKLOAD {json}` line.
pub fn workload_result(stdout: &str) -> Option<Value> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(WORKLOAD_RESULT))
        .and_then(|json| serde_json::from_str(json.trim()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_the_command_and_refuses_quotes_inside() {
        let line = cmdline_running("apfvm-workload --pages 8").unwrap();
        assert!(line.starts_with("console=ttyS0 "));
        assert!(line.ends_with(" apfvm.cmd=\"apfvm-workload --pages 8\""));
        assert!(cmdline_running("echo \"hi\"").is_err());
    }

    #[test]
    fn reads_the_exit_status_and_the_workload_line_among_kernel_output() {
        let out =
            "[    1.0] reboot\nAPFVM-WORKLOAD {\"verdict\":\"pass\"}\r\nAPFVM-LINUX: exit 3\r\n";
        assert_eq!(command_status(out), Some(3));
        assert_eq!(workload_result(out).unwrap()["verdict"], "pass");
        assert_eq!(command_status("APFVM-LINUX: userspace up cpus=1"), None);
        let console =
            "APFVM-LINUX: ready\r\nfalse\r\nAPFVM-LINUX: done 1\r\nAPFVM-LINUX: ready\r\n";
        assert_eq!(console_command_status(console), Some(1));
        assert_eq!(command_status(console), None);
        assert!(cmdline_snapshot_then_console().ends_with(" apfvm.snapshot=1"));
        assert!(workload_result("APFVM-WORKLOAD {broken").is_none());
    }
}

//! The `apfvm` command line: parse, hand a validated config to the library, map the result
//! to an exit code. Exit codes: the guest's own code from the debug-exit port; 0 when the
//! guest reboots or powers off; 128+N when stopped by signal N; 1 on any error (bad input,
//! KVM trouble, a guest that crashed the vCPU); 2 on bad command-line usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{KernelImage, Settings, Switch};
use vmm::memory::MemoryBackend;
use vmm::vm::{self, VmOutcome};

#[derive(Parser)]
#[command(
    name = "apfvm",
    version,
    about = "A KVM virtual machine monitor built around async page faults"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel (ELF vmlinux or bzImage) with its serial console on this terminal.
    Run(RunArgs),
    /// Boot the built-in reference guest (the same flags as `run`; --kernel is optional).
    Demo(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Kernel image: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    vcpus: Option<u32>,
    /// Guest RAM, e.g. 256M or 1G; a bare number is MiB [default: 128M].
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// What backs guest RAM [default: anon].
    #[arg(long, value_enum)]
    memory: Option<MemoryBackend>,
    /// CPUID edits: +feature/-feature, comma-separated, or a template (emulated-kernel).
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    cpu_features: Option<String>,
    /// Advertise KVM async page faults to the guest [default: on].
    #[arg(long, value_enum)]
    apf: Option<Switch>,
    /// Read settings from a TOML file; flags given here win over it.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// KVM device to open.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: String,
}

impl RunArgs {
    fn settings(&self) -> Result<Settings, vmm::config::ConfigError> {
        let flags = Settings {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            mem: self.mem.clone(),
            memory: self.memory,
            cpu_features: self.cpu_features.clone(),
            apf: self.apf,
        };
        Ok(match &self.config {
            Some(path) => flags.merge(Settings::from_toml_file(path)?),
            None => flags,
        })
    }
}

fn run(
    args: &RunArgs,
    builtin: Option<KernelImage>,
) -> Result<VmOutcome, Box<dyn std::error::Error>> {
    let config = args.settings()?.into_config(builtin)?;
    Ok(vm::run(&config, &args.kvm_device)?)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run(args, None),
        Command::Demo(args) => run(
            args,
            Some(KernelImage::Embedded {
                name: "reference guest",
                bytes: vmm::REFERENCE_GUEST,
            }),
        ),
    };
    match result {
        Ok(VmOutcome::GuestReset) => ExitCode::SUCCESS,
        Ok(VmOutcome::GuestExit(code)) => ExitCode::from(code),
        Ok(VmOutcome::Signal(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        Err(e) => {
            eprintln!("apfvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

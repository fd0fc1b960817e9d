//! The `apfvm` command line: parse, hand a validated config to the library, map the result
//! to an exit code. Exit codes: the guest's own code from the debug-exit port; 0 when the
//! guest reboots or powers off; 128+N when stopped by signal N; 1 on any error (bad input,
//! KVM trouble, a guest that crashed the vCPU); 2 on bad command-line usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::config::{KernelImage, Settings};
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
    #[command(flatten)]
    settings: Settings,
    /// Read settings from a TOML file; flags given here win over it.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// KVM device to open.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: String,
}

impl RunArgs {
    fn settings(&self) -> Result<Settings, vmm::config::ConfigError> {
        let flags = self.settings.clone();
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

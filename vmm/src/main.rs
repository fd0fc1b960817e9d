//! The `apfvm` command line: parse, hand a validated config to the library, map the result
//! to an exit code. Exit codes: the guest's own code from the debug-exit port; 0 when the
//! guest reboots or powers off; 128+N when stopped by signal N; 1 on any error (bad input,
//! KVM trouble, a guest that crashed the vCPU); 2 on bad command-line usage.

/// `apfvm bench`: the binary's, not the library's (it runs this binary as child processes).
mod bench;

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
    /// Bring back a VM saved in a snapshot directory (guest RAM read from its memory file).
    Restore(RestoreArgs),
    /// Measure guest stalls: busy-task ops rate and fault latency with async PF off/on
    /// against a no-fault baseline and the bare userfaultfd floor (JSON + SVG report).
    Bench(BenchArgs),
    /// Control a running apfvm through its API socket (--api-socket).
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// The API socket of the apfvm to control.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// How long to wait for the answer.
    #[arg(long, value_name = "DURATION", default_value = "300s")]
    timeout: String,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand)]
enum CtlAction {
    /// Pause the VM (PATCH /vm {"state":"Paused"}).
    Pause,
    /// Resume the VM (PATCH /vm {"state":"Resumed"}).
    Resume,
    /// Snapshot the paused VM into a directory (PUT /snapshot/create).
    Snapshot {
        /// The snapshot directory (created if needed).
        dir: PathBuf,
    },
    /// Load a snapshot into an apfvm started with --api-socket and no kernel
    /// (PUT /snapshot/load).
    Load {
        /// The snapshot directory.
        dir: PathBuf,
        /// Run the VM once loaded (resume_vm); else it waits, paused, for `resume`.
        #[arg(long)]
        resume: bool,
    },
    /// Print the VM's state, vCPUs, memory and async PF setting as JSON (GET /).
    Info,
}

#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("bad --timeout '{0}': use a duration such as 30s or 500ms")]
    BadTimeout(String),
    #[error(transparent)]
    Client(#[from] vmm::api::client::ClientError),
}

fn ctl(args: &CtlArgs) -> Result<(), CtlError> {
    use vmm::api::RequestedState;
    let limit = vmm::pager::parse_duration(&args.timeout)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| CtlError::BadTimeout(args.timeout.clone()))?;
    let client = vmm::api::client::Client::new(&args.api_socket, limit);
    match &args.action {
        CtlAction::Pause => client.set_state(RequestedState::Paused)?,
        CtlAction::Resume => client.set_state(RequestedState::Resumed)?,
        CtlAction::Snapshot { dir } => client.create_snapshot(dir)?,
        CtlAction::Load { dir, resume } => client.load_snapshot(dir, None, *resume)?,
        CtlAction::Info => {
            let info = client.info()?;
            println!(
                "{}",
                serde_json::to_string_pretty(&info).expect("the info serializes")
            );
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchGuestKind {
    /// The built-in reference guest.
    Reference,
    /// The project's Linux guest with apfvm-workload (build it with resources/linux/build.sh).
    Linux,
}

#[derive(Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
enum BenchSuite {
    /// Guest stalls with async PF off and on (the default).
    #[default]
    Stalls,
    /// Snapshot create and restore times against `cp` of the memory file.
    Snapshot,
    /// Restore modes (eager, file, lazy on demand, working set, all) against eager.
    Restore,
}

#[derive(Args)]
struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "stalls")]
    suite: BenchSuite,
    /// Guest RAM sizes of the snapshot bench.
    #[arg(long, value_name = "LIST", default_value = "128M,1G")]
    snapshot_sizes: String,
    /// Runs per size of the snapshot bench and per mode of the restore bench (medians).
    #[arg(long, value_name = "N", default_value_t = 5)]
    runs: usize,
    /// Fetch latencies of the restore bench's lazy modes.
    #[arg(long, value_name = "LIST", default_value = "0,1ms")]
    restore_latencies: String,
    /// Region pages of the restore bench's workload (all vCPUs together).
    #[arg(long, value_name = "N", default_value_t = 8192)]
    restore_pages: u32,
    /// The guest every case boots.
    #[arg(long, value_enum, default_value = "reference")]
    guest: BenchGuestKind,
    /// resources/linux/build.sh's output directory (vmlinux, initramfs.cpio), for --guest linux.
    #[arg(long, value_name = "DIR", default_value = ".cache/linux")]
    linux_dir: PathBuf,
    /// Directory for bench.json and bench.svg.
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    output: PathBuf,
    /// vCPU counts to run every case with.
    #[arg(long, value_name = "LIST", default_value = "1,2")]
    vcpus_list: String,
    /// Fetch latencies of the paging cases.
    #[arg(long, value_name = "LIST", default_value = bench::DEFAULT_LATENCIES)]
    latencies: String,
    /// Pages faulted in per vCPU in each case.
    #[arg(long, value_name = "N", default_value_t = bench::DEFAULT_PAGES_PER_VCPU)]
    pages_per_vcpu: u32,
    /// Pages the floor measurement faults in.
    #[arg(long, value_name = "N", default_value_t = bench::DEFAULT_FLOOR_PAGES)]
    floor_pages: u64,
    /// KVM device to open.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: String,
}

fn run_bench(args: &BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.floor_pages == 0 {
        return Err(bench::BenchError::BadFloorPages.into());
    }
    if args.suite == BenchSuite::Restore {
        let opts = bench::snapshot::RestoreBenchOptions {
            sizes: bench::parse_list(&args.snapshot_sizes),
            latencies: bench::parse_list(&args.restore_latencies),
            runs: args.runs.max(1),
            pages: args.restore_pages.max(16),
            output: args.output.clone(),
            kvm_device: args.kvm_device.clone(),
        };
        let report = bench::snapshot::run_restore(&opts)?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        eprint!("{}", bench::snapshot::restore_table(&report));
        eprintln!(
            "apfvm bench restore: wrote {}",
            args.output.join("restore.json").display()
        );
        return Ok(());
    }
    if args.suite == BenchSuite::Snapshot {
        let opts = bench::snapshot::SnapshotBenchOptions {
            sizes: bench::parse_list(&args.snapshot_sizes),
            runs: args.runs.max(1),
            output: args.output.clone(),
            kvm_device: args.kvm_device.clone(),
        };
        let report = bench::snapshot::run(&opts)?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        eprint!("{}", bench::snapshot::table(&report));
        eprintln!(
            "apfvm bench snapshot: wrote {}",
            args.output.join("snapshot.json").display()
        );
        return Ok(());
    }
    let vcpus = bench::parse_list(&args.vcpus_list)
        .iter()
        .map(|v| v.parse::<u8>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bench::BenchError::BadVcpus)?;
    let guest = match args.guest {
        BenchGuestKind::Reference => bench::BenchGuest::Reference,
        BenchGuestKind::Linux => bench::BenchGuest::Linux {
            dir: args.linux_dir.clone(),
        },
    };
    let opts = bench::BenchOptions {
        guest,
        output: args.output.clone(),
        vcpus,
        latencies: bench::parse_list(&args.latencies),
        pages_per_vcpu: args.pages_per_vcpu,
        floor_pages: args.floor_pages,
        kvm_device: args.kvm_device.clone(),
    };
    let report = bench::run(&opts)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!(
        "apfvm bench: wrote {} and {}",
        args.output.join("bench.json").display(),
        args.output.join("bench.svg").display()
    );
    Ok(())
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

#[derive(Args)]
struct RestoreArgs {
    /// The snapshot directory (its state file and memory file).
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    #[command(flatten)]
    run: RunArgs,
}

fn restore(args: &RestoreArgs) -> Result<VmOutcome, Box<dyn std::error::Error>> {
    let snapshot = vmm::snapshot::load(&args.snapshot)?;
    let config = args
        .run
        .settings()?
        .into_restore_config(std::sync::Arc::new(snapshot))?;
    Ok(vm::run(config, &args.run.kvm_device)?)
}

fn run(
    args: &RunArgs,
    builtin: Option<KernelImage>,
) -> Result<VmOutcome, Box<dyn std::error::Error>> {
    let settings = args.settings()?;
    // Without a kernel, an API socket means: wait for a snapshot to load (PUT /snapshot/load).
    if settings.kernel.is_none() && builtin.is_none() && settings.api_socket.is_some() {
        return Ok(vm::run_awaiting_snapshot(settings, &args.kvm_device)?);
    }
    let config = settings.into_config(builtin)?;
    Ok(vm::run(config, &args.kvm_device)?)
}

/// Says what went wrong on stderr, waiting for a stalled stderr no longer than a VM's stop.
fn report_error(e: &dyn std::fmt::Display) {
    let deadline = std::time::Instant::now() + vm::STOP_BUDGET;
    vmm::console::stderr().write_until(format!("apfvm: error: {e}\n").as_bytes(), deadline);
}

fn main() -> ExitCode {
    // Descriptors inherited from whoever started apfvm are not the guest's business: close
    // all but stdin, stdout and stderr before anything is opened.
    // SAFETY: nothing in this process has opened a descriptor yet that it would miss.
    unsafe { libc::close_range(3, u32::MAX, 0) };
    // Logs never wait for a stderr nobody reads: what it cannot take is dropped.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .target(env_logger::Target::Pipe(Box::new(vmm::console::stderr())))
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Bench(args) => {
            return match run_bench(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report_error(&e);
                    ExitCode::FAILURE
                }
            };
        }
        Command::Ctl(args) => {
            return match ctl(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    report_error(&e);
                    ExitCode::FAILURE
                }
            };
        }
        Command::Run(args) => run(args, None),
        Command::Restore(args) => restore(args),
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
        Ok(VmOutcome::Stopped) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e);
            ExitCode::FAILURE
        }
    }
}

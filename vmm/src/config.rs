//! `VmConfig`: everything needed to build a VM, from command-line flags and an optional TOML
//! file (flags win), validated once here so the rest of the VMM can trust it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::arch::x86_64::cpuid::{self, FeatureEdit};
use crate::arch::x86_64::loader::{self, LoaderError};
use crate::arch::x86_64::mptable;
use crate::memory::MemoryBackend;
use crate::pager::{EvictPolicy, FaultOrder, LatencyModel, PagerConfig};
use crate::snapshot::{self, LoadedSnapshot};

/// Command line given to a kernel when the user gives none: serial console, reboot through
/// the i8042 (what ends apfvm cleanly), and reboot one second after a panic so that a dead
/// guest does not sit there forever.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
pub const DEFAULT_MEM_SIZE: u64 = 128 << 20;
/// Below this, not even the boot structures and a tiny kernel fit.
pub const MIN_MEM_SIZE: u64 = 2 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

/// Who backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PagerKind {
    /// Plain memory: every page is there from the start.
    None,
    /// Host paging through userfaultfd: pages fault in on first touch, can be evicted.
    Uffd,
}

/// Host paging settings (`--pager uffd`).
#[derive(Debug, Clone)]
pub struct PagingConfig {
    /// Initial RAM contents; zero-fill when absent.
    pub memory_image: Option<PathBuf>,
    pub pager: PagerConfig,
}

/// Where the kernel image comes from.
#[derive(Debug, Clone)]
pub enum KernelImage {
    File(PathBuf),
    /// An image built into apfvm (the reference guest).
    Embedded {
        name: &'static str,
        bytes: &'static [u8],
    },
    /// Nothing to load: the VM is restored from this snapshot, booted kernel and all.
    Snapshot(std::sync::Arc<LoadedSnapshot>),
}

impl KernelImage {
    pub fn describe(&self) -> String {
        match self {
            KernelImage::File(p) => p.display().to_string(),
            KernelImage::Embedded { name, .. } => format!("<built-in {name}>"),
            KernelImage::Snapshot(s) => format!("<snapshot {}>", s.dir.display()),
        }
    }
}

/// What apfvm does after a snapshot the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AfterSnapshot {
    /// The VM runs on.
    #[default]
    Resume,
    /// apfvm stops the VM and exits 0.
    Stop,
}

/// What a lazy restore streams in ahead of the guest's faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Prefetch {
    /// Nothing: every page comes on its first touch, and those touches are recorded as the
    /// snapshot's working set.
    #[default]
    None,
    /// The working set recorded by an earlier on-demand restore of this snapshot.
    WorkingSet,
    /// Every page of the memory file that holds data, in order.
    All,
}

/// When an on-demand restore stops recording its working set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RecordEnd {
    /// The guest first-touched fewer than this many pages per second, over one second.
    Idle { pages_per_sec: u32 },
    /// This long after the vCPUs started.
    After(std::time::Duration),
}

impl RecordEnd {
    pub const DEFAULT: RecordEnd = RecordEnd::Idle { pages_per_sec: 10 };

    /// `idle`, `idle:N` (first touches per second) or a duration (`10s`).
    pub fn parse(spec: &str) -> Option<RecordEnd> {
        match spec.strip_prefix("idle") {
            Some("") => Some(RecordEnd::DEFAULT),
            Some(rest) => rest
                .strip_prefix(':')?
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .map(|pages_per_sec| RecordEnd::Idle { pages_per_sec }),
            None => crate::pager::parse_duration(spec)
                .filter(|d| !d.is_zero())
                .map(RecordEnd::After),
        }
    }
}

/// A restore through the pager: what it prefetches, and where its working set is.
#[derive(Debug, Clone)]
pub struct LazyRestore {
    pub prefetch: Prefetch,
    pub working_set: PathBuf,
    pub record_end: RecordEnd,
}

/// `--snapshot-on-request`: where guest-requested snapshots go, and what follows them.
#[derive(Debug, Clone)]
pub struct SnapshotOnRequest {
    pub dir: PathBuf,
    pub after: AfterSnapshot,
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: KernelImage,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_size: u64,
    pub memory_backend: MemoryBackend,
    pub cpu_features: Vec<FeatureEdit>,
    pub apf: bool,
    pub paging: Option<PagingConfig>,
    pub metrics: Option<MetricsConfig>,
    pub kvm_trace: bool,
    /// Confine every thread with seccomp-bpf once set up (off: `--no-seccomp`).
    pub seccomp: bool,
    pub snapshot_on_request: Option<SnapshotOnRequest>,
    /// Set for `apfvm restore --pager uffd`.
    pub lazy_restore: Option<LazyRestore>,
    /// Serve the control API on a Unix socket at this path (`api`).
    pub api_socket: Option<PathBuf>,
}

/// Where and how often metrics are written (`--metrics-file`).
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub path: PathBuf,
    pub interval: std::time::Duration,
}

/// Settings as given by the user, each optional: the CLI's flags and the TOML file
/// (`--config`) have exactly these names, and `merge` lets the flags win.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Kernel image: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Guest RAM, e.g. 256M or 1G; a bare number is MiB [default: 128M].
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// What backs guest RAM [default: anon].
    #[arg(long, value_enum)]
    pub memory: Option<MemoryBackend>,
    /// CPUID edits: +feature/-feature, comma-separated, or a template (emulated-kernel).
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    pub cpu_features: Option<String>,
    /// Advertise KVM async page faults to the guest [default: on].
    #[arg(long, value_enum)]
    pub apf: Option<Switch>,
    /// Host paging of guest RAM [default: none].
    #[arg(long, value_enum)]
    pub pager: Option<PagerKind>,
    /// Raw image of guest RAM to serve first-touch pages from (else zero-fill).
    #[arg(long, value_name = "PATH")]
    pub memory_image: Option<PathBuf>,
    /// Fetch latency: 5ms, a range 5ms-30ms, or exp:5ms [default: 0].
    #[arg(long, value_name = "SPEC")]
    pub fault_latency: Option<String>,
    /// Apply --fault-latency to synchronous faults too (a vCPU in guest kernel mode waits for
    /// a slow disk as well; for restore benchmarks) [default: served at once].
    #[arg(long)]
    #[serde(default)]
    pub sync_fault_latency: bool,
    /// Completion order: arrival, or reverse:N (batches of N in reverse) [default: arrival].
    #[arg(long, value_name = "ORDER")]
    pub fault_order: Option<String>,
    /// Pager worker threads [default: 2].
    #[arg(long, value_name = "N")]
    pub pager_workers: Option<usize>,
    /// Periodic eviction PERIOD:SHARE, e.g. 10ms:25% [default: none].
    #[arg(long, value_name = "SPEC")]
    pub evict: Option<String>,
    /// Seed of the pager's random choices (latency samples, eviction victims) [default: 1].
    #[arg(long, value_name = "N")]
    pub pager_seed: Option<u64>,
    /// Write metrics as JSON lines to this file (fields: docs/metrics.md).
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// How often a metrics line is written [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub metrics_interval: Option<String>,
    /// Classify host faults with KVM's async PF tracepoints (needs root; docs/metrics.md).
    #[arg(long)]
    #[serde(default)]
    pub kvm_trace: bool,
    /// Do not confine apfvm's threads with seccomp filters (for debugging on a new host).
    #[arg(long)]
    #[serde(default)]
    pub no_seccomp: bool,
    /// Snapshot the VM into this directory when the guest asks (a write to port 0xf0).
    #[arg(long, value_name = "DIR")]
    pub snapshot_on_request: Option<PathBuf>,
    /// After a guest-requested snapshot: resume the VM, or stop it [default: resume].
    #[arg(long, value_enum)]
    pub after_snapshot: Option<AfterSnapshot>,
    /// Restore with --pager uffd: stream pages in ahead of faults [default: none].
    #[arg(long, value_enum)]
    pub prefetch: Option<Prefetch>,
    /// Restore with --pager uffd: the working set file [default: DIR/working-set].
    #[arg(long, value_name = "PATH")]
    pub working_set: Option<PathBuf>,
    /// When an on-demand restore stops recording its working set: idle, idle:N (first
    /// touches/s over 1 s), or a duration [default: idle:10].
    #[arg(long, value_name = "END")]
    pub working_set_end: Option<String>,
    /// Serve the control API (HTTP/1.1 + JSON) on a new Unix socket at this path (mode
    /// 0600; an existing path is refused). `run` without --kernel then waits for
    /// PUT /snapshot/load.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("bad config file {path}: {message}")]
    ParseFile { path: String, message: String },
    #[error("no kernel given: use --kernel PATH (or `kernel = \"PATH\"` in the config file)")]
    NoKernel,
    #[error("kernel image {path}: {source}")]
    KernelFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] LoaderError),
    #[error("initrd {path}: {source}")]
    InitrdFile {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "bad memory size '{0}': use a number with a unit, like 256M or 1G (a bare number is MiB)"
    )]
    BadSize(String),
    #[error("memory size {0} is not a multiple of 4 KiB")]
    UnalignedSize(u64),
    #[error("--mem {given} is too small: apfvm needs at least {min} MiB", min = MIN_MEM_SIZE >> 20)]
    MemTooSmall { given: String },
    #[error("--vcpus {0} is out of range: a VM has 1 to {max} vCPUs", max = mptable::MAX_CPUS)]
    BadVcpuCount(u32),
    #[error(transparent)]
    CpuFeatures(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Paging(#[from] crate::pager::LatencyError),
    #[error("{0}")]
    Evict(String),
    #[error("{0} needs --pager uffd")]
    NeedsPager(&'static str),
    #[error("memory image {path}: {source}")]
    MemoryImage {
        path: String,
        source: std::io::Error,
    },
    #[error("bad --metrics-interval '{0}': use a duration of at least 10ms, e.g. 500ms or 2s")]
    BadMetricsInterval(String),
    #[error(
        "memory image {path} is {len} bytes, larger than guest RAM ({mem_size} bytes): raise \
         --mem or pass the image of a VM this size"
    )]
    ImageTooLarge {
        path: String,
        len: u64,
        mem_size: u64,
    },
    #[error("--pager-workers must be between 1 and 64")]
    BadWorkerCount,
    #[error(
        "bad --working-set-end '{0}': use idle, idle:N (first touches per second) or a duration \
         like 10s"
    )]
    BadWorkingSetEnd(String),
    #[error("{flag} needs {needs}")]
    Needs {
        flag: &'static str,
        needs: &'static str,
    },
    #[error("{flag} cannot be used with restore: {why}")]
    NotWithRestore {
        flag: &'static str,
        why: &'static str,
    },
    #[error("{flag} {given} contradicts the snapshot, which was taken with {saved}")]
    RestoreConflict {
        flag: &'static str,
        given: String,
        saved: String,
    },
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
}

/// Parses a memory size: `512K`, `256M`, `1G`, `1T` (binary units; `MiB`, `GB`, ... also
/// accepted), or a bare number of MiB as in QEMU's `-m`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "B" => 0,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes % 4096 != 0 {
        return Err(ConfigError::UnalignedSize(bytes));
    }
    Ok(bytes)
}

impl Settings {
    pub fn from_toml_file(path: &Path) -> Result<Settings, ConfigError> {
        let read_err = |source| ConfigError::ReadFile {
            path: path.display().to_string(),
            source,
        };
        check_readable_file(path).map_err(read_err)?;
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// `self` (the flags) over `file`.
    pub fn merge(self, file: Settings) -> Settings {
        Settings {
            kernel: self.kernel.or(file.kernel),
            initrd: self.initrd.or(file.initrd),
            cmdline: self.cmdline.or(file.cmdline),
            vcpus: self.vcpus.or(file.vcpus),
            mem: self.mem.or(file.mem),
            memory: self.memory.or(file.memory),
            cpu_features: self.cpu_features.or(file.cpu_features),
            apf: self.apf.or(file.apf),
            pager: self.pager.or(file.pager),
            memory_image: self.memory_image.or(file.memory_image),
            fault_latency: self.fault_latency.or(file.fault_latency),
            fault_order: self.fault_order.or(file.fault_order),
            pager_workers: self.pager_workers.or(file.pager_workers),
            evict: self.evict.or(file.evict),
            pager_seed: self.pager_seed.or(file.pager_seed),
            metrics_file: self.metrics_file.or(file.metrics_file),
            metrics_interval: self.metrics_interval.or(file.metrics_interval),
            kvm_trace: self.kvm_trace || file.kvm_trace,
            sync_fault_latency: self.sync_fault_latency || file.sync_fault_latency,
            no_seccomp: self.no_seccomp || file.no_seccomp,
            snapshot_on_request: self.snapshot_on_request.or(file.snapshot_on_request),
            after_snapshot: self.after_snapshot.or(file.after_snapshot),
            prefetch: self.prefetch.or(file.prefetch),
            working_set: self.working_set.or(file.working_set),
            working_set_end: self.working_set_end.or(file.working_set_end),
            api_socket: self.api_socket.or(file.api_socket),
        }
    }

    /// Validates the settings into a `VmConfig`. `builtin` supplies the kernel when no path
    /// is given (the `demo` command).
    pub fn into_config(self, builtin: Option<KernelImage>) -> Result<VmConfig, ConfigError> {
        let paging = self.paging_config()?;
        let metrics = self.metrics_config()?;
        let snapshot_on_request = self.snapshot_on_request_config()?;
        if self.memory == Some(MemoryBackend::File) {
            return Err(ConfigError::Needs {
                flag: "--memory file",
                needs: "`apfvm restore` (it maps a snapshot's memory file)",
            });
        }
        let restore_only = [
            (self.prefetch.is_some(), "--prefetch"),
            (self.working_set.is_some(), "--working-set"),
            (self.working_set_end.is_some(), "--working-set-end"),
        ];
        if let Some((_, flag)) = restore_only.iter().find(|(given, _)| *given) {
            return Err(ConfigError::Needs {
                flag,
                needs: "`apfvm restore --pager uffd`",
            });
        }
        let kernel = match (self.kernel, builtin) {
            (Some(path), _) => {
                check_readable_file(&path).map_err(|source| ConfigError::KernelFile {
                    path: path.display().to_string(),
                    source,
                })?;
                check_kernel_format(&path)?;
                KernelImage::File(path)
            }
            (None, Some(image)) => image,
            (None, None) => return Err(ConfigError::NoKernel),
        };
        if let Some(path) = &self.initrd {
            check_readable_file(path).map_err(|source| ConfigError::InitrdFile {
                path: path.display().to_string(),
                source,
            })?;
        }
        let vcpus = self.vcpus.unwrap_or(1);
        if vcpus == 0 || vcpus > u32::from(mptable::MAX_CPUS) {
            return Err(ConfigError::BadVcpuCount(vcpus));
        }
        let mem_size = match &self.mem {
            Some(s) => parse_size(s)?,
            None => DEFAULT_MEM_SIZE,
        };
        if mem_size < MIN_MEM_SIZE {
            return Err(ConfigError::MemTooSmall {
                given: self.mem.unwrap_or_default(),
            });
        }
        if let Some(image) = paging.as_ref().and_then(|p| p.memory_image.as_ref()) {
            check_image_size(image, mem_size)?;
        }
        let cmdline = self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        let max = crate::arch::x86_64::layout::CMDLINE_MAX_SIZE - 1;
        if cmdline.len() > max {
            return Err(ConfigError::CmdlineTooLong {
                len: cmdline.len(),
                max,
            });
        }
        Ok(VmConfig {
            kernel,
            initrd: self.initrd,
            cmdline,
            vcpus: vcpus as u8,
            mem_size,
            memory_backend: self.memory.unwrap_or_default(),
            cpu_features: cpuid::parse_feature_edits(self.cpu_features.as_deref().unwrap_or(""))?,
            apf: self.apf.unwrap_or(Switch::On) == Switch::On,
            paging,
            metrics,
            kvm_trace: self.kvm_trace,
            seccomp: !self.no_seccomp,
            snapshot_on_request,
            lazy_restore: None,
            api_socket: self.api_socket,
        })
    }

    fn snapshot_on_request_config(&self) -> Result<Option<SnapshotOnRequest>, ConfigError> {
        match (&self.snapshot_on_request, self.after_snapshot) {
            (Some(dir), after) => Ok(Some(SnapshotOnRequest {
                dir: dir.clone(),
                after: after.unwrap_or_default(),
            })),
            (None, Some(_)) => Err(ConfigError::Needs {
                flag: "--after-snapshot",
                needs: "--snapshot-on-request",
            }),
            (None, None) => Ok(None),
        }
    }

    /// Validates the settings of `apfvm restore` against the snapshot: what the snapshot
    /// fixes (vCPUs, RAM, async PF, CPU features) may be given only as it was saved; what a
    /// boot needs (kernel, initrd, command line, a memory image) is refused. With
    /// `--pager uffd` the restore is lazy: the pager serves first touches from the memory file.
    pub fn into_restore_config(
        self,
        snapshot: std::sync::Arc<LoadedSnapshot>,
    ) -> Result<VmConfig, ConfigError> {
        self.check_for_restore()?;
        let saved = &snapshot.state.vm;
        // With a pager, first touches are served from the memory file: a lazy restore.
        let paging = self.paging_config()?.map(|paging| PagingConfig {
            memory_image: Some(snapshot.memory_path.clone()),
            ..paging
        });
        let lazy_restore = match &paging {
            Some(_) => Some(LazyRestore {
                prefetch: self.prefetch.unwrap_or_default(),
                working_set: snapshot::working_set::path(
                    &snapshot.dir,
                    self.working_set.as_deref(),
                ),
                record_end: match &self.working_set_end {
                    Some(spec) => RecordEnd::parse(spec)
                        .ok_or_else(|| ConfigError::BadWorkingSetEnd(spec.clone()))?,
                    None => RecordEnd::DEFAULT,
                },
            }),
            // Flags that need the pager were refused without one (`check_for_restore`).
            None => None,
        };
        let conflict = |flag: &'static str, given: String, saved: String| {
            ConfigError::RestoreConflict { flag, given, saved }
        };
        if let Some(vcpus) = self.vcpus
            && vcpus != u32::from(saved.vcpus)
        {
            return Err(conflict(
                "--vcpus",
                vcpus.to_string(),
                saved.vcpus.to_string(),
            ));
        }
        if let Some(mem) = &self.mem
            && parse_size(mem)? != saved.mem_size
        {
            return Err(conflict(
                "--mem",
                mem.clone(),
                format!("{} MiB", saved.mem_size >> 20),
            ));
        }
        let on_off = |on: bool| if on { "on" } else { "off" }.to_string();
        if let Some(apf) = self.apf
            && (apf == Switch::On) != saved.apf
        {
            return Err(conflict(
                "--apf",
                on_off(apf == Switch::On),
                on_off(saved.apf),
            ));
        }
        if let Some(list) = &self.cpu_features {
            let given = cpuid::describe_feature_edits(&cpuid::parse_feature_edits(list)?);
            if given != saved.cpu_features {
                return Err(conflict(
                    "--cpu-features",
                    list.clone(),
                    saved.cpu_features.join(","),
                ));
            }
        }
        let metrics = self.metrics_config()?;
        let snapshot_on_request = self.snapshot_on_request_config()?;
        Ok(VmConfig {
            initrd: None,
            cmdline: saved.cmdline.clone(),
            vcpus: saved.vcpus,
            mem_size: saved.mem_size,
            memory_backend: self.memory.unwrap_or_default(),
            cpu_features: cpuid::parse_feature_edits(&saved.cpu_features.join(","))?,
            apf: saved.apf,
            paging,
            metrics,
            kvm_trace: self.kvm_trace,
            seccomp: !self.no_seccomp,
            snapshot_on_request,
            lazy_restore,
            api_socket: self.api_socket,
            kernel: KernelImage::Snapshot(snapshot),
        })
    }

    /// What can be checked of a restore's settings before the snapshot is known (`apfvm run
    /// --api-socket` without a kernel checks them before it waits for PUT /snapshot/load):
    /// what a boot needs is refused, lazy-restore flags need the pager, and every value
    /// given must parse. Returns the metrics settings.
    pub fn check_for_restore(&self) -> Result<Option<MetricsConfig>, ConfigError> {
        let booted = "the snapshot holds the booted guest";
        let paged = "pages come from the snapshot's memory file";
        let not_with_restore = [
            (self.kernel.is_some(), "--kernel", booted),
            (self.initrd.is_some(), "--initrd", booted),
            (self.cmdline.is_some(), "--cmdline", booted),
            (self.memory_image.is_some(), "--memory-image", paged),
        ];
        if let Some(&(_, flag, why)) = not_with_restore.iter().find(|(given, ..)| *given) {
            return Err(ConfigError::NotWithRestore { flag, why });
        }
        let paging = self.paging_config()?;
        if paging.is_some() && self.memory == Some(MemoryBackend::File) {
            return Err(ConfigError::NotWithRestore {
                flag: "--memory file",
                why: "with --pager uffd (userfaultfd cannot register a file mapping)",
            });
        }
        if paging.is_none() {
            let needs_pager = [
                (self.prefetch.is_some(), "--prefetch"),
                (self.working_set.is_some(), "--working-set"),
                (self.working_set_end.is_some(), "--working-set-end"),
            ];
            if let Some((_, flag)) = needs_pager.iter().find(|(given, _)| *given) {
                return Err(ConfigError::NeedsPager(flag));
            }
        }
        if let Some(spec) = &self.working_set_end
            && RecordEnd::parse(spec).is_none()
        {
            return Err(ConfigError::BadWorkingSetEnd(spec.clone()));
        }
        if let Some(vcpus) = self.vcpus
            && (vcpus == 0 || vcpus > u32::from(mptable::MAX_CPUS))
        {
            return Err(ConfigError::BadVcpuCount(vcpus));
        }
        if let Some(mem) = &self.mem {
            parse_size(mem)?;
        }
        if let Some(list) = &self.cpu_features {
            cpuid::parse_feature_edits(list)?;
        }
        self.snapshot_on_request_config()?;
        self.metrics_config()
    }

    fn metrics_config(&self) -> Result<Option<MetricsConfig>, ConfigError> {
        let interval = match &self.metrics_interval {
            Some(spec) => crate::pager::parse_duration(spec)
                .filter(|d| *d >= std::time::Duration::from_millis(10))
                .ok_or_else(|| ConfigError::BadMetricsInterval(spec.clone()))?,
            None => std::time::Duration::from_secs(1),
        };
        Ok(self.metrics_file.as_ref().map(|path| MetricsConfig {
            path: path.clone(),
            interval,
        }))
    }

    fn paging_config(&self) -> Result<Option<PagingConfig>, ConfigError> {
        if self.pager.unwrap_or(PagerKind::None) == PagerKind::None {
            let pager_only = [
                (self.memory_image.is_some(), "--memory-image"),
                (self.fault_latency.is_some(), "--fault-latency"),
                (self.fault_order.is_some(), "--fault-order"),
                (self.sync_fault_latency, "--sync-fault-latency"),
                (self.pager_workers.is_some(), "--pager-workers"),
                (self.evict.is_some(), "--evict"),
            ];
            return match pager_only.iter().find(|(given, _)| *given) {
                Some((_, flag)) => Err(ConfigError::NeedsPager(flag)),
                None => Ok(None),
            };
        }
        if let Some(path) = &self.memory_image {
            check_readable_file(path).map_err(|source| ConfigError::MemoryImage {
                path: path.display().to_string(),
                source,
            })?;
        }
        let defaults = PagerConfig::default();
        let workers = self.pager_workers.unwrap_or(defaults.workers);
        if !(1..=64).contains(&workers) {
            return Err(ConfigError::BadWorkerCount);
        }
        let pager = PagerConfig {
            latency: match &self.fault_latency {
                Some(spec) => LatencyModel::parse(spec)?,
                None => defaults.latency,
            },
            sync_latency: self.sync_fault_latency,
            order: match &self.fault_order {
                Some(spec) => FaultOrder::parse(spec)?,
                None => defaults.order,
            },
            workers,
            evict: self
                .evict
                .as_deref()
                .map(EvictPolicy::parse)
                .transpose()
                .map_err(ConfigError::Evict)?,
            seed: self.pager_seed.unwrap_or(defaults.seed),
        };
        Ok(Some(PagingConfig {
            memory_image: self.memory_image.clone(),
            pager,
        }))
    }
}

/// A memory image larger than RAM is refused (its end would be silently ignored); a smaller
/// one is allowed with a warning (the pages past its end are zeros).
fn check_image_size(path: &Path, mem_size: u64) -> Result<(), ConfigError> {
    let len = std::fs::metadata(path)
        .map_err(|source| ConfigError::MemoryImage {
            path: path.display().to_string(),
            source,
        })?
        .len();
    if len > mem_size {
        return Err(ConfigError::ImageTooLarge {
            path: path.display().to_string(),
            len,
            mem_size,
        });
    }
    if len < mem_size {
        log::warn!(
            "memory image {} is {len} bytes, smaller than guest RAM ({mem_size} bytes): the \
             pages past its end read as zeros",
            path.display()
        );
    }
    Ok(())
}

/// Tells a user who passed the wrong file before anything else is set up.
fn check_kernel_format(path: &Path) -> Result<(), ConfigError> {
    let io_err = |source| ConfigError::KernelFile {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    match loader::detect_format(&mut file).map_err(io_err)? {
        Some(_) => Ok(()),
        None => Err(ConfigError::Kernel(LoaderError::UnknownFormat {
            path: path.display().to_string(),
        })),
    }
}

/// Fails early, with the OS's reason, on a missing or unreadable file, and on anything that
/// cannot be read as a plain file: a directory, a FIFO (reading it could wait forever), a
/// socket or a device.
pub fn check_readable_file(path: &Path) -> std::io::Result<()> {
    if let Some(err) = not_a_regular_file(std::fs::metadata(path)?.file_type()) {
        return Err(err);
    }
    std::fs::File::open(path).map(drop)
}

/// The error for a file that is not a regular file (directory, FIFO, socket, device).
pub fn not_a_regular_file(kind: std::fs::FileType) -> Option<std::io::Error> {
    use std::os::unix::fs::FileTypeExt;
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        return None;
    };
    Some(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("is {what}, not a regular file"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_set_end_specs() {
        use std::time::Duration;
        assert_eq!(RecordEnd::parse("idle"), Some(RecordEnd::DEFAULT));
        assert_eq!(
            RecordEnd::parse("idle:50"),
            Some(RecordEnd::Idle { pages_per_sec: 50 })
        );
        assert_eq!(
            RecordEnd::parse("10s"),
            Some(RecordEnd::After(Duration::from_secs(10)))
        );
        for bad in ["idle:", "idle:0", "idlex", "0", "soon"] {
            assert_eq!(RecordEnd::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size("300").unwrap(), 300 << 20);
        assert_eq!(parse_size(" 2T ").unwrap(), 2 << 40);
        assert!(matches!(parse_size("12X"), Err(ConfigError::BadSize(_))));
        assert!(matches!(parse_size("M"), Err(ConfigError::BadSize(_))));
        assert!(matches!(parse_size("-1M"), Err(ConfigError::BadSize(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(ConfigError::BadSize(_))
        ));
        assert!(matches!(
            parse_size("1000B"),
            Err(ConfigError::UnalignedSize(1000))
        ));
    }

    fn kernel_file() -> vmm_sys_util::tempfile::TempFile {
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(f.as_path(), b"\x7fELF").unwrap();
        f
    }

    #[test]
    fn flags_win_over_file_and_defaults_fill_the_rest() {
        let k = kernel_file();
        let file: Settings = toml::from_str(&format!(
            "kernel = {:?}\nvcpus = 4\nmem = \"1G\"\nmemory = \"memfd\"\napf = \"off\"\n\
             cpu_features = \"-xsave\"",
            k.as_path()
        ))
        .unwrap();
        let flags = Settings {
            vcpus: Some(2),
            ..Default::default()
        };
        let cfg = flags.merge(file).into_config(None).unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.mem_size, 1 << 30);
        assert_eq!(cfg.memory_backend, MemoryBackend::Memfd);
        assert!(!cfg.apf);
        assert_eq!(cfg.cpu_features.len(), 1);
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
        assert!(cfg.paging.is_none());
    }

    #[test]
    fn the_api_socket_comes_from_the_flags_or_the_file() {
        let k = kernel_file();
        let file: Settings = toml::from_str(&format!(
            "kernel = {:?}\napi_socket = \"/run/a.sock\"",
            k.as_path()
        ))
        .unwrap();
        let cfg = Settings::default()
            .merge(file.clone())
            .into_config(None)
            .unwrap();
        assert_eq!(cfg.api_socket, Some(PathBuf::from("/run/a.sock")));
        let flags = Settings {
            api_socket: Some("/run/b.sock".into()),
            ..Default::default()
        };
        let cfg = flags.merge(file).into_config(None).unwrap();
        assert_eq!(cfg.api_socket, Some(PathBuf::from("/run/b.sock")));
    }

    /// What `run --api-socket` without a kernel checks before it waits for a snapshot.
    #[test]
    fn restore_settings_are_checked_before_the_snapshot_is_known() {
        let with = |f: fn(&mut Settings)| {
            let mut s = Settings::default();
            f(&mut s);
            s.check_for_restore()
                .map(|m| m.is_some())
                .map_err(|e| e.to_string())
        };
        assert_eq!(with(|_| ()), Ok(false));
        assert_eq!(with(|s| s.metrics_file = Some("/tmp/m".into())), Ok(true));
        let err = with(|s| s.initrd = Some("/x".into())).unwrap_err();
        assert!(
            err.contains("--initrd cannot be used with restore"),
            "{err}"
        );
        assert_eq!(with(|s| s.pager = Some(PagerKind::Uffd)), Ok(false));
        let err = with(|s| s.prefetch = Some(Prefetch::All)).unwrap_err();
        assert!(err.contains("--prefetch needs --pager uffd"), "{err}");
        let err = with(|s| s.memory_image = Some("/x".into())).unwrap_err();
        assert!(
            err.contains("--memory-image cannot be used with restore"),
            "{err}"
        );
        assert!(with(|s| s.mem = Some("12X".into())).is_err());
        assert!(with(|s| s.vcpus = Some(0)).is_err());
        assert!(with(|s| s.cpu_features = Some("-bogus".into())).is_err());
        assert!(with(|s| s.after_snapshot = Some(AfterSnapshot::Stop)).is_err());
        assert!(with(|s| s.metrics_interval = Some("1h?".into())).is_err());
    }

    #[test]
    fn pager_settings_validate_into_a_pager_config() {
        let k = kernel_file();
        let s: Settings = toml::from_str(&format!(
            "kernel = {:?}\npager = \"uffd\"\nfault_latency = \"5ms-30ms\"\n\
             fault_order = \"reverse:8\"\nevict = \"10ms:25%\"\npager_workers = 3",
            k.as_path()
        ))
        .unwrap();
        let paging = s.into_config(None).unwrap().paging.unwrap();
        assert_eq!(paging.pager.order, FaultOrder::Reverse(8));
        assert_eq!(paging.pager.workers, 3);
        assert!(paging.pager.evict.is_some());
        assert!(paging.memory_image.is_none());
    }

    #[test]
    fn bad_settings_are_named() {
        let k = kernel_file();
        let with = |f: &dyn Fn(&mut Settings)| {
            let mut s = Settings {
                kernel: Some(k.as_path().to_path_buf()),
                ..Default::default()
            };
            f(&mut s);
            s.into_config(None).unwrap_err().to_string()
        };
        assert!(with(&|s| s.vcpus = Some(0)).contains("--vcpus 0"));
        assert!(with(&|s| s.mem = Some("1M".into())).contains("too small"));
        assert!(
            with(&|s| s.kernel = Some("/nonexistent/vmlinux".into()))
                .contains("/nonexistent/vmlinux")
        );
        assert!(with(&|s| s.kernel = Some("/".into())).contains("directory"));
        assert!(
            with(&|s| s.kernel = Some("/dev/null".into()))
                .contains("/dev/null: is a device, not a regular file")
        );
        let fifo = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let fifo = fifo.as_path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        for set in [
            &(|s: &mut Settings, p: &Path| s.kernel = Some(p.into()))
                as &dyn Fn(&mut Settings, &Path),
            &|s, p| s.initrd = Some(p.into()),
            &|s, p| {
                s.pager = Some(PagerKind::Uffd);
                s.memory_image = Some(p.into())
            },
        ] {
            let err = with(&|s| set(s, &fifo));
            assert!(err.contains("is a FIFO, not a regular file"), "{err}");
        }
        let err = Settings::from_toml_file(&fifo).unwrap_err().to_string();
        assert!(err.contains("is a FIFO, not a regular file"), "{err}");
        assert!(with(&|s| s.initrd = Some("/nonexistent/initrd".into())).contains("initrd"));
        assert!(with(&|s| s.cpu_features = Some("-bogus".into())).contains("bogus"));
        assert!(with(&|s| s.cmdline = Some("x".repeat(5000))).contains("command line"));
        assert!(with(&|s| s.fault_latency = Some("5ms".into())).contains("needs --pager uffd"));
        let paged = |f: fn(&mut Settings)| {
            with(&|s| {
                s.pager = Some(PagerKind::Uffd);
                f(s)
            })
        };
        assert!(paged(|s| s.fault_latency = Some("fast".into())).contains("--fault-latency"));
        assert!(paged(|s| s.fault_order = Some("reverse:0".into())).contains("--fault-order"));
        assert!(paged(|s| s.evict = Some("10ms".into())).contains("--evict"));
        assert!(paged(|s| s.pager_workers = Some(0)).contains("--pager-workers"));
        assert!(
            paged(|s| s.memory_image = Some("/nonexistent/ram".into()))
                .contains("/nonexistent/ram")
        );
        assert!(matches!(
            Settings::default().into_config(None),
            Err(ConfigError::NoKernel)
        ));
        let err = toml::from_str::<Settings>("kernal = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernal"), "{err}");
    }
}

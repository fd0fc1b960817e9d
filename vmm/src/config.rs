//! `VmConfig`: everything needed to build a VM, from command-line flags and an optional TOML
//! file (flags win), validated once here so the rest of the VMM can trust it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::arch::x86_64::cpuid::{self, FeatureEdit};
use crate::arch::x86_64::loader::{self, LoaderError};
use crate::arch::x86_64::mptable;
use crate::memory::MemoryBackend;

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

/// Where the kernel image comes from.
#[derive(Debug, Clone)]
pub enum KernelImage {
    File(PathBuf),
    /// An image built into apfvm (the reference guest).
    Embedded {
        name: &'static str,
        bytes: &'static [u8],
    },
}

impl KernelImage {
    pub fn describe(&self) -> String {
        match self {
            KernelImage::File(p) => p.display().to_string(),
            KernelImage::Embedded { name, .. } => format!("<built-in {name}>"),
        }
    }
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
}

/// Settings as given by the user, each optional; the CLI fills one from flags and one from
/// `--config FILE.toml`, and `merge` lets the flags win.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub vcpus: Option<u32>,
    /// A size such as "256M" (see `parse_size`).
    pub mem: Option<String>,
    pub memory: Option<MemoryBackend>,
    /// A `--cpu-features` list, e.g. "-xsave,-cx16" or "emulated-kernel".
    pub cpu_features: Option<String>,
    pub apf: Option<Switch>,
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.display().to_string(),
            source,
        })?;
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
        }
    }

    /// Validates the settings into a `VmConfig`. `builtin` supplies the kernel when no path
    /// is given (the `demo` command).
    pub fn into_config(self, builtin: Option<KernelImage>) -> Result<VmConfig, ConfigError> {
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
        })
    }
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

/// Fails early, with the OS's reason, on a missing, unreadable or non-regular file.
fn check_readable_file(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a directory, not a file",
        ));
    }
    std::fs::File::open(path).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn bad_settings_are_named() {
        let k = kernel_file();
        let with = |f: fn(&mut Settings)| {
            let mut s = Settings {
                kernel: Some(k.as_path().to_path_buf()),
                ..Default::default()
            };
            f(&mut s);
            s.into_config(None).unwrap_err().to_string()
        };
        assert!(with(|s| s.vcpus = Some(0)).contains("--vcpus 0"));
        assert!(with(|s| s.mem = Some("1M".into())).contains("too small"));
        assert!(
            with(|s| s.kernel = Some("/nonexistent/vmlinux".into()))
                .contains("/nonexistent/vmlinux")
        );
        assert!(with(|s| s.kernel = Some("/".into())).contains("directory"));
        assert!(with(|s| s.kernel = Some("/dev/null".into())).contains("neither an ELF"));
        assert!(with(|s| s.initrd = Some("/nonexistent/initrd".into())).contains("initrd"));
        assert!(with(|s| s.cpu_features = Some("-bogus".into())).contains("bogus"));
        assert!(with(|s| s.cmdline = Some("x".repeat(5000))).contains("command line"));
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

//! Snapshots: a paused VM saved to a directory, and loaded back for a restore.
//!
//! A snapshot directory holds `state` (the state file: a versioned container with a CRC,
//! `container.rs`, around the JSON of `state::SnapshotState`) and one memory file,
//! `memory-<id>` (guest RAM, sparse, `memory.rs`). Writing never overwrites a memory file: a
//! new snapshot writes its own, then replaces `state` atomically (rename), then removes the
//! memory file the old state named. A crash at any point leaves either the old snapshot or
//! the new one, and a VM that maps an old memory file (`--memory file`) keeps its mapping.
//! docs/snapshot.md says what is saved, in which order, and how to restore.

pub mod container;
pub mod memory;
pub mod state;
pub mod working_set;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use vm_memory::GuestMemoryMmap;

use crate::pager::{PAGE_SIZE, Pager};
use container::ContainerError;
use state::{MemoryLayout, SnapshotState};

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path}: {source}")]
    Container {
        path: String,
        source: ContainerError,
    },
    #[error("state file {path}: {message}")]
    BadState { path: String, message: String },
    #[error("memory file {path} is {found} bytes, but the snapshot's guest RAM is {expected}")]
    MemorySize {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("can only snapshot a paused VM (this one is {0})")]
    NotPaused(String),
    #[error("saving the VM: {0}")]
    Save(String),
}

/// A snapshot read from disk and checked: its state, and where its memory file is.
#[derive(Debug)]
pub struct LoadedSnapshot {
    pub dir: PathBuf,
    pub state: SnapshotState,
    pub memory_path: PathBuf,
}

/// What a snapshot that was just written holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub dir: PathBuf,
    pub memory_file: PathBuf,
    pub mem_size: u64,
    pub data_pages: u64,
    /// Wall time from the pause's end to the directory's fsync.
    pub millis: f64,
}

/// A new snapshot id: 16 random hex digits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No entropy source: time and pid still make a clash unlikely on one host.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        bytes = (now ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `state` (its `memory` filled in here) and guest RAM into `dir`, creating it if
/// needed, every file fsynced before it is named. On error the directory holds what it held
/// before (plus, at worst, a stray temporary file).
pub fn write(
    dir: &Path,
    mut state: SnapshotState,
    mem: &GuestMemoryMmap,
    pager: Option<&Pager>,
) -> Result<u64, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let previous = load_state(dir).ok();
    let memory_name = format!("memory-{}", state.id);
    let memory_path = dir.join(&memory_name);
    let memory_file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&memory_path)
        .map_err(write_err(&memory_path))?;
    let written = (|| {
        let data_pages = memory::write(&memory_file, mem, pager)?;
        memory_file.sync_all()?;
        Ok(data_pages)
    })();
    let data_pages = match written {
        Ok(pages) => pages,
        Err(e) => {
            let _ = std::fs::remove_file(&memory_path);
            return Err(write_err(&memory_path)(e));
        }
    };
    state.memory = MemoryLayout {
        file: memory_name,
        size: memory_file
            .metadata()
            .map_err(write_err(&memory_path))?
            .len(),
        page_size: PAGE_SIZE as u64,
        data_pages,
    };
    let payload = serde_json::to_vec(&state).expect("the state serializes");
    let state_path = dir.join(STATE_FILE);
    let temp_path = dir.join(format!(".{STATE_FILE}.{}", state.id));
    let result = (|| {
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp_path)?;
        file.write_all(&container::encode(container::STATE_FILE, &payload))?;
        file.sync_all()?;
        std::fs::rename(&temp_path, &state_path)?;
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp_path);
        let _ = std::fs::remove_file(&memory_path);
        return Err(write_err(&state_path)(e));
    }
    if let Some(old) = previous
        && old.memory.file != state.memory.file
    {
        // Unlinking is safe even if a VM maps it: the mapping keeps the file alive.
        let _ = std::fs::remove_file(dir.join(&old.memory.file));
    }
    Ok(data_pages)
}

fn load_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let name = path.display().to_string();
    crate::config::check_readable_file(&path).map_err(|source| SnapshotError::Read {
        path: name.clone(),
        source,
    })?;
    let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Read {
        path: name.clone(),
        source,
    })?;
    let payload = container::decode(container::STATE_FILE, &bytes).map_err(|source| {
        SnapshotError::Container {
            path: name.clone(),
            source,
        }
    })?;
    let state: SnapshotState =
        serde_json::from_slice(payload).map_err(|e| SnapshotError::BadState {
            path: name.clone(),
            message: e.to_string(),
        })?;
    check_state(&state).map_err(|message| SnapshotError::BadState {
        path: name,
        message,
    })?;
    Ok(state)
}

/// What a well-formed state must hold beyond its JSON shape.
fn check_state(state: &SnapshotState) -> Result<(), String> {
    if state.vm.vcpus == 0 || state.vcpus.len() != usize::from(state.vm.vcpus) {
        return Err(format!(
            "{} vCPUs configured, {} saved",
            state.vm.vcpus,
            state.vcpus.len()
        ));
    }
    if let Some((i, v)) = state
        .vcpus
        .iter()
        .enumerate()
        .find(|(i, v)| usize::from(v.index) != *i)
    {
        return Err(format!("vCPU {i} is saved as vCPU {}", v.index));
    }
    if state.memory.page_size != PAGE_SIZE as u64 {
        return Err(format!(
            "page size {} (apfvm uses {PAGE_SIZE})",
            state.memory.page_size
        ));
    }
    if state.memory.size != state.vm.mem_size {
        return Err(format!(
            "memory file of {} bytes for {} bytes of RAM",
            state.memory.size, state.vm.mem_size
        ));
    }
    let name = Path::new(&state.memory.file);
    if name.components().count() != 1 || name.file_name().is_none() {
        return Err(format!(
            "memory file name {:?} is not a plain file name",
            state.memory.file
        ));
    }
    Ok(())
}

/// Reads and checks the snapshot in `dir`: the state file's container, JSON and contents, and
/// that the memory file is there with the size the state says. Nothing is created yet.
pub fn load(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    if !dir.is_dir() {
        return Err(SnapshotError::Dir {
            path: dir.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a directory (a snapshot is a directory with a state file and a memory file)",
            ),
        });
    }
    let state = load_state(dir)?;
    let memory_path = dir.join(&state.memory.file);
    let read_err = |source| SnapshotError::Read {
        path: memory_path.display().to_string(),
        source,
    };
    crate::config::check_readable_file(&memory_path).map_err(read_err)?;
    let found = std::fs::metadata(&memory_path).map_err(read_err)?.len();
    if found != state.memory.size {
        return Err(SnapshotError::MemorySize {
            path: memory_path.display().to_string(),
            found,
            expected: state.memory.size,
        });
    }
    Ok(LoadedSnapshot {
        dir: dir.to_path_buf(),
        state,
        memory_path,
    })
}

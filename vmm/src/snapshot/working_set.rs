//! A snapshot's working set: the pages a lazy restore faulted in, in order, so that the next
//! restore can stream them in first (`--prefetch working-set`).
//!
//! The file is `working-set` in the snapshot directory (or `--working-set PATH` where the
//! directory is read-only), in the snapshot container (`container::WORKING_SET`: magic
//! "APFVMWSF", version, CRC) around JSON: the snapshot's id (a working set is only used
//! with the snapshot it was recorded on, or a copy of it), the page size, how the recording
//! ended, and the pages. It is written to a temporary name and renamed, so a reader sees a
//! whole file or none.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::container::{self, WORKING_SET};
use crate::pager::PAGE_SIZE;

/// The file's name in a snapshot directory.
pub const FILE: &str = "working-set";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSet {
    pub snapshot_id: String,
    pub page_size: u64,
    /// What ended the recording (`idle: under N first touches/s for 1 s`, `after 10s`, `the
    /// VM stopped`).
    pub ended_by: String,
    /// Milliseconds from the start of the restore to the end of the recording.
    pub recorded_ms: u64,
    /// Page numbers (RAM offset / page size), in the order they were first touched.
    pub pages: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    #[error("working set {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("working set {path}: {source}")]
    Container {
        path: String,
        source: container::ContainerError,
    },
    #[error("working set {path}: {message}")]
    Bad { path: String, message: String },
}

/// Where the working set of the snapshot in `dir` lives: `explicit`, or the directory's.
pub fn path(dir: &Path, explicit: Option<&Path>) -> PathBuf {
    explicit.map_or_else(|| dir.join(FILE), Path::to_path_buf)
}

/// Reads the working set at `path` and checks it belongs to snapshot `id` and lists only
/// pages of its `pages` of RAM.
pub fn read(path: &Path, id: &str, pages: u64) -> Result<WorkingSet, WorkingSetError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| WorkingSetError::Io {
        path: name.clone(),
        source,
    })?;
    let payload =
        container::decode(WORKING_SET, &bytes).map_err(|source| WorkingSetError::Container {
            path: name.clone(),
            source,
        })?;
    let set: WorkingSet = serde_json::from_slice(payload).map_err(|e| WorkingSetError::Bad {
        path: name.clone(),
        message: e.to_string(),
    })?;
    let bad = |message: String| WorkingSetError::Bad {
        path: name.clone(),
        message,
    };
    if set.snapshot_id != id {
        return Err(bad(format!(
            "recorded on snapshot {}, not this one ({id})",
            set.snapshot_id
        )));
    }
    if set.page_size != PAGE_SIZE as u64 {
        return Err(bad(format!("page size {}", set.page_size)));
    }
    if let Some(page) = set.pages.iter().find(|&&p| p >= pages) {
        return Err(bad(format!(
            "lists page {page}, outside the snapshot's {pages} pages of RAM"
        )));
    }
    Ok(set)
}

/// Writes `set` to `path` through a temporary file in the same directory.
pub fn write(path: &Path, set: &WorkingSet) -> Result<(), WorkingSetError> {
    let io = |source| WorkingSetError::Io {
        path: path.display().to_string(),
        source,
    };
    let payload = serde_json::to_vec(set).expect("the working set serializes");
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&container::encode(WORKING_SET, &payload))?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> WorkingSet {
        WorkingSet {
            snapshot_id: "abc".into(),
            page_size: PAGE_SIZE as u64,
            ended_by: "the VM stopped".into(),
            recorded_ms: 12,
            pages: vec![5, 1, 9],
        }
    }

    #[test]
    fn written_and_read_back_for_its_snapshot_only() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let p = dir.as_path().join(FILE);
        write(&p, &set()).unwrap();
        assert_eq!(read(&p, "abc", 10).unwrap(), set());
        let other = read(&p, "xyz", 10).unwrap_err().to_string();
        assert!(other.contains("recorded on snapshot abc"), "{other}");
        let outside = read(&p, "abc", 9).unwrap_err().to_string();
        assert!(outside.contains("lists page 9, outside"), "{outside}");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let truncated = read(&p, "abc", 10).unwrap_err().to_string();
        assert!(truncated.contains("truncated"), "{truncated}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.as_path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left");
    }
}

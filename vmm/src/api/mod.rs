//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-socket PATH`), with
//! Firecracker's endpoints and bodies for what apfvm supports, so that its users recognise
//! them:
//!
//! | request | body | answer |
//! |---|---|---|
//! | `GET /` | none | 200, `InstanceInfo` |
//! | `PATCH /vm` | `{"state": "Paused"}` or `{"state": "Resumed"}` | 204 |
//! | `PUT /snapshot/create` | `{"snapshot_path": DIR}` (the VM must be paused) | 204 |
//! | `PUT /snapshot/load` | `{"snapshot_path": DIR, "resume_vm": bool}` (only before a VM exists) | 204 |
//!
//! An apfvm snapshot is one directory (the state file and the memory file, `snapshot`), so
//! `snapshot_path` names that directory; `mem_file_path` (create) is refused, and
//! `mem_backend` (load) may only name the snapshot's own memory file. Errors are Firecracker's
//! `{"fault_message": "..."}`: 400 for a bad request (bad JSON, an unknown field or value, a
//! VM in the wrong state, a snapshot that failed), 404 for an unknown path, 405 for a method
//! a path does not take. The VM runs on after any of them.
//!
//! The `api` thread (`server.rs`) only parses requests: each one goes to the thread that owns
//! the VM (the main thread's event loop, `vm::run`) as an `ApiCall`, and its `ApiReply`
//! comes back the same way. `client.rs` is the other end, for `apfvm ctl`.

pub mod client;
mod server;
mod socket;

use std::path::PathBuf;

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

pub use server::{ApiCall, ApiServer, ApiShared, Responder};
pub use socket::ApiSocket;

/// The largest request body the API reads.
pub const MAX_BODY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "API socket {path} already exists: apfvm does not replace it (remove it if no apfvm \
         is using it)"
    )]
    Exists { path: String },
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("API socket {path} has mode {mode:o} after creation, not 600")]
    Mode { path: String, mode: u32 },
    #[error("starting the API server: {0}")]
    Start(std::io::Error),
}

/// `PATCH /vm`'s body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateBody {
    pub state: RequestedState,
}

/// The states a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestedState {
    Paused,
    Resumed,
}

/// Firecracker's snapshot types; apfvm writes full snapshots only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/create`'s body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateBody {
    /// The snapshot directory (created if needed; a snapshot already there is replaced).
    pub snapshot_path: PathBuf,
    /// Firecracker's separate memory file: refused, the memory file is in the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// Where a loaded snapshot's memory comes from (Firecracker's `mem_backend`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_path: PathBuf,
    pub backend_type: MemBackendType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// `PUT /snapshot/load`'s body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadBody {
    /// The snapshot directory.
    pub snapshot_path: PathBuf,
    /// If given: `File`, and the snapshot's own memory file (`DIR/memory-<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Run the VM once loaded; else it stays paused until `PATCH /vm {"state":"Resumed"}`.
    #[serde(default)]
    pub resume_vm: bool,
    /// Firecracker's dirty-page tracking: only `false` (apfvm has no diff snapshots).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_diff_snapshots: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub track_dirty_pages: bool,
}

/// Where the VM is, as Firecracker says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// No VM yet: an apfvm waiting for `PUT /snapshot/load`.
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    /// Paused, or loaded from a snapshot and not resumed yet.
    Paused,
}

/// `GET /`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// "apfvm".
    pub app_name: String,
    pub vmm_version: String,
    pub state: InstanceState,
    /// The VM's shape, once there is a VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// Whether async page faults are advertised to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apf: Option<bool>,
    /// Host paging: "uffd" or "none".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pager: Option<String>,
    /// The id of the snapshot this VM was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
}

/// Firecracker's error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

/// A request the API thread parsed and checked, for the VM's owner to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    Info,
    SetState(RequestedState),
    CreateSnapshot {
        dir: PathBuf,
    },
    LoadSnapshot {
        dir: PathBuf,
        /// `mem_backend.backend_path`, to check against the snapshot's memory file.
        memory_file: Option<PathBuf>,
        resume: bool,
    },
}

/// A request that cannot be carried out: its HTTP status and the message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFault {
    pub status: StatusCode,
    pub message: String,
}

impl ApiFault {
    pub fn bad_request(message: impl Into<String>) -> ApiFault {
        ApiFault {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// The VM owner's answer to an `ApiRequest`.
#[derive(Debug, Clone)]
pub enum ApiReply {
    Info(Box<InstanceInfo>),
    /// Done; nothing to say (204).
    Done,
    Fault(ApiFault),
}

impl ApiReply {
    pub fn bad_request(message: impl Into<String>) -> ApiReply {
        ApiReply::Fault(ApiFault::bad_request(message))
    }
}

impl From<Result<(), String>> for ApiReply {
    fn from(result: Result<(), String>) -> ApiReply {
        match result {
            Ok(()) => ApiReply::Done,
            Err(message) => ApiReply::bad_request(message),
        }
    }
}

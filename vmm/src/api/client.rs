//! A client of the control API (`apfvm ctl`): one request per connection over the Unix
//! socket, through hyper's HTTP/1.1 client on a single-threaded tokio runtime, with a time
//! limit on the whole exchange.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use super::{
    Fault, InstanceInfo, MemBackend, MemBackendType, RequestedState, SnapshotCreateBody,
    SnapshotLoadBody, VmStateBody,
};

/// The largest response body the client reads.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("starting the client: {0}")]
    Runtime(std::io::Error),
    #[error("talking to {path}: {source}")]
    Http { path: String, source: hyper::Error },
    #[error("no answer from {path} within {limit:?}")]
    Timeout { path: String, limit: Duration },
    #[error("{status}: {message}")]
    Fault { status: StatusCode, message: String },
    #[error("unexpected answer ({status}): {message}")]
    BadResponse { status: StatusCode, message: String },
    #[error("{what}: {source}")]
    Path {
        what: String,
        source: std::io::Error,
    },
}

/// A control API client for the socket at `path`.
pub struct Client {
    path: PathBuf,
    limit: Duration,
}

impl Client {
    /// A client whose every request must be answered within `limit`.
    pub fn new(path: &Path, limit: Duration) -> Client {
        Client {
            path: path.to_path_buf(),
            limit,
        }
    }

    /// `GET /`.
    pub fn info(&self) -> Result<InstanceInfo, ClientError> {
        let (status, body) = self.request(Method::GET, "/", None)?;
        serde_json::from_slice(&body).map_err(|e| ClientError::BadResponse {
            status,
            message: format!("{e}: {}", String::from_utf8_lossy(&body)),
        })
    }

    /// `PATCH /vm`.
    pub fn set_state(&self, state: RequestedState) -> Result<(), ClientError> {
        self.send(Method::PATCH, "/vm", &VmStateBody { state })
    }

    /// `PUT /snapshot/create` into `dir` (made absolute here: apfvm may run elsewhere).
    pub fn create_snapshot(&self, dir: &Path) -> Result<(), ClientError> {
        let body = SnapshotCreateBody {
            snapshot_path: absolute(dir)?,
            mem_file_path: None,
            snapshot_type: None,
        };
        self.send(Method::PUT, "/snapshot/create", &body)
    }

    /// `PUT /snapshot/load` from `dir`; `memory_file`, if given, must be its memory file.
    pub fn load_snapshot(
        &self,
        dir: &Path,
        memory_file: Option<&Path>,
        resume: bool,
    ) -> Result<(), ClientError> {
        let body = SnapshotLoadBody {
            snapshot_path: absolute(dir)?,
            mem_backend: memory_file
                .map(|path| {
                    Ok::<_, ClientError>(MemBackend {
                        backend_path: absolute(path)?,
                        backend_type: MemBackendType::File,
                    })
                })
                .transpose()?,
            resume_vm: resume,
            enable_diff_snapshots: false,
            track_dirty_pages: false,
        };
        self.send(Method::PUT, "/snapshot/load", &body)
    }

    /// A request whose success has no body (204).
    fn send(&self, method: Method, uri: &str, body: &impl Serialize) -> Result<(), ClientError> {
        let body = serde_json::to_vec(body).expect("request bodies serialize");
        self.request(method, uri, Some(body)).map(drop)
    }

    /// Sends one request; a 2xx answer's status and body, else the fault it names.
    pub fn request(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ClientError::Runtime)?;
        let exchange = self.exchange(method, uri, body);
        let (status, body) = runtime
            .block_on(async { tokio::time::timeout(self.limit, exchange).await })
            .map_err(|_| ClientError::Timeout {
                path: self.path.display().to_string(),
                limit: self.limit,
            })??;
        if status.is_success() {
            return Ok((status, body));
        }
        Err(match serde_json::from_slice::<Fault>(&body) {
            Ok(fault) => ClientError::Fault {
                status,
                message: fault.fault_message,
            },
            Err(_) => ClientError::BadResponse {
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            },
        })
    }

    async fn exchange(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let path = || self.path.display().to_string();
        let http = |source| ClientError::Http {
            path: path(),
            source,
        };
        let stream = tokio::net::UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let connection = tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(HOST, "localhost");
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a request from a valid method and path");
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::BadResponse {
                status,
                message: format!("reading the body: {e}"),
            })?
            .to_bytes();
        drop(sender);
        connection.abort();
        Ok((status, body))
    }
}

fn absolute(path: &Path) -> Result<PathBuf, ClientError> {
    std::path::absolute(path).map_err(|source| ClientError::Path {
        what: path.display().to_string(),
        source,
    })
}

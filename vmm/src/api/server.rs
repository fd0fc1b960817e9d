//! The `api` thread: hyper serves HTTP/1.1 on the API socket from a single-threaded tokio
//! runtime (built, and the socket registered with it, before the thread is confined: its
//! epoll and eventfd exist by then). The
//! thread parses and checks each request, hands it to the VM's owner as an `ApiCall` (a
//! queue and an eventfd that the owner's event loop watches), waits for the reply and
//! answers. Connections are served side by side, so one client that sends nothing holds
//! only its own connection (and hyper drops it once its headers are 30 s late).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, oneshot};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::socket::SocketFile;
use super::{
    ApiError, ApiFault, ApiReply, ApiRequest, ApiSocket, Fault, MAX_BODY, MemBackendType,
    SnapshotCreateBody, SnapshotLoadBody, SnapshotType, VmStateBody,
};
use crate::seccomp::ThreadKind;

/// How long a client may take to send a request's headers, then its body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the API waits before accepting again after accept failed (out of descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A request on its way to the VM's owner, with where its reply goes.
pub struct ApiCall {
    pub request: ApiRequest,
    pub reply: Responder,
}

/// Where a call's reply goes: the connection that waits for it.
pub struct Responder(oneshot::Sender<ApiReply>);

impl Responder {
    /// Sends the reply (nobody takes it if the client hung up meanwhile).
    pub fn answer(self, reply: ApiReply) {
        let _ = self.0.send(reply);
    }
}

/// What the API thread and the VM's owner share.
pub struct ApiShared {
    calls: Mutex<VecDeque<ApiCall>>,
    /// Readable when a call is queued or the API thread failed; the owner's loop watches it.
    pub event: EventFd,
    failure: Mutex<Option<String>>,
}

impl ApiShared {
    /// The oldest call not answered yet.
    pub fn next_call(&self) -> Option<ApiCall> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Why the API thread ended, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn push(&self, call: ApiCall) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(call);
        // A full eventfd counter still wakes the owner; nothing to do on error.
        let _ = self.event.write(1);
    }

    /// Records why the API cannot serve (the first reason wins) and wakes the owner.
    pub fn fail(&self, message: String) {
        log::error!("API: {message}");
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(message);
        let _ = self.event.write(1);
    }
}

/// The running API: its thread, and the socket file it removes when stopped.
pub struct ApiServer {
    shared: Arc<ApiShared>,
    shutdown: Arc<Notify>,
    thread: Option<JoinHandle<Option<()>>>,
    /// Dropped after the thread is joined (field order): removes the socket file.
    _file: SocketFile,
}

impl ApiServer {
    /// Starts the `api` thread serving `socket`.
    pub fn start(socket: ApiSocket) -> Result<ApiServer, ApiError> {
        let ApiSocket { listener, file } = socket;
        let shared = Arc::new(ApiShared {
            calls: Mutex::new(VecDeque::new()),
            event: EventFd::new(EFD_NONBLOCK).map_err(ApiError::Start)?,
            failure: Mutex::new(None),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ApiError::Start)?;
        // Registered with the runtime here, before the thread is confined.
        let listener = {
            let _context = runtime.enter();
            tokio::net::UnixListener::from_std(listener).map_err(ApiError::Start)?
        };
        let shutdown = Arc::new(Notify::new());
        let on_failure = {
            let shared = shared.clone();
            Arc::new(move |message| shared.fail(message))
        };
        let thread = {
            let (shared, shutdown) = (shared.clone(), shutdown.clone());
            crate::thread::spawn("api", ThreadKind::Api, on_failure, move || {
                runtime.block_on(serve(listener, shared, shutdown))
            })
            .map_err(ApiError::Start)?
        };
        Ok(ApiServer {
            shared,
            shutdown,
            thread: Some(thread),
            _file: file,
        })
    }

    pub fn shared(&self) -> &Arc<ApiShared> {
        &self.shared
    }

    /// Stops accepting, drops the connections and ends the thread; calls not answered yet
    /// are told that the VM is stopping. Also `Drop`.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        while let Some(call) = self.shared.next_call() {
            call.reply.answer(stopping());
        }
        self.shutdown.notify_one();
        let _ = thread.join();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stopping() -> ApiReply {
    ApiReply::Fault(ApiFault {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the VM is stopping".into(),
    })
}

async fn serve(listener: tokio::net::UnixListener, shared: Arc<ApiShared>, shutdown: Arc<Notify>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    loop {
        let stream = tokio::select! {
            _ = shutdown.notified() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    log::warn!("API: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| handle(request, shared.clone())),
        );
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("API connection: {e}");
            }
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<ApiShared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let endpoint = match route(&parts.method, parts.uri.path()) {
        Ok(endpoint) => endpoint,
        Err(Misrouted { fault, allow }) => {
            let mut response = response(ApiReply::Fault(fault));
            if let Some(allow) = allow.and_then(|m| HeaderValue::from_str(m.as_str()).ok()) {
                response.headers_mut().insert(ALLOW, allow);
            }
            return Ok(response);
        }
    };
    let parsed = match read_body(body).await {
        Ok(body) => parse_body(endpoint, &body),
        Err(fault) => Err(fault),
    };
    let reply = match parsed {
        Ok(request) => forward(&shared, request).await,
        Err(fault) => ApiReply::Fault(fault),
    };
    Ok(response(reply))
}

/// Hands `request` to the VM's owner and waits for its reply.
async fn forward(shared: &ApiShared, request: ApiRequest) -> ApiReply {
    let (reply, answer) = oneshot::channel();
    shared.push(ApiCall {
        request,
        reply: Responder(reply),
    });
    answer.await.unwrap_or_else(|_| stopping())
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn response(reply: ApiReply) -> Response<Full<Bytes>> {
    match reply {
        ApiReply::Info(info) => json_response(
            StatusCode::OK,
            serde_json::to_vec(&info).expect("the instance info serializes"),
        ),
        ApiReply::Done => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        ApiReply::Fault(fault) => json_response(
            fault.status,
            serde_json::to_vec(&Fault {
                fault_message: fault.message,
            })
            .expect("a fault serializes"),
        ),
    }
}

/// The API's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Info,
    Vm,
    SnapshotCreate,
    SnapshotLoad,
}

const ENDPOINTS: [(&str, Method, Endpoint); 4] = [
    ("/", Method::GET, Endpoint::Info),
    ("/vm", Method::PATCH, Endpoint::Vm),
    ("/snapshot/create", Method::PUT, Endpoint::SnapshotCreate),
    ("/snapshot/load", Method::PUT, Endpoint::SnapshotLoad),
];

const ENDPOINT_LIST: &str = "GET /, PATCH /vm, PUT /snapshot/create and PUT /snapshot/load";

/// A request for no endpoint: 404, or 405 with the method the path takes.
#[derive(Debug)]
struct Misrouted {
    fault: ApiFault,
    allow: Option<Method>,
}

fn route(method: &Method, path: &str) -> Result<Endpoint, Misrouted> {
    let Some((_, allowed, endpoint)) = ENDPOINTS.iter().find(|(p, ..)| *p == path) else {
        return Err(Misrouted {
            fault: ApiFault {
                status: StatusCode::NOT_FOUND,
                message: format!("no endpoint {path}: apfvm's API has {ENDPOINT_LIST}"),
            },
            allow: None,
        });
    };
    if method != allowed {
        return Err(Misrouted {
            fault: ApiFault {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: format!("{path} takes {allowed}, not {method}"),
            },
            allow: Some(allowed.clone()),
        });
    }
    Ok(*endpoint)
}

/// Reads the body (at most `MAX_BODY` bytes, within `BODY_TIMEOUT`).
async fn read_body(body: Incoming) -> Result<Bytes, ApiFault> {
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Err(_) => Err(ApiFault::bad_request(format!(
            "the request body did not arrive within {BODY_TIMEOUT:?}"
        ))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiFault {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than {MAX_BODY} bytes"),
        }),
        Ok(Err(e)) => Err(ApiFault::bad_request(format!(
            "reading the request body: {e}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// `body` as the JSON `T`, or a fault naming what is wrong with it.
fn json<T: serde::de::DeserializeOwned>(
    endpoint: &str,
    example: &str,
    body: &[u8],
) -> Result<T, ApiFault> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiFault::bad_request(format!(
            "{endpoint} needs a JSON body, e.g. {example}"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiFault::bad_request(format!("bad JSON body for {endpoint}: {e}")))
}

/// The request an endpoint's body asks for, checked as far as it can be without the VM.
fn parse_body(endpoint: Endpoint, body: &[u8]) -> Result<ApiRequest, ApiFault> {
    match endpoint {
        Endpoint::Info => Ok(ApiRequest::Info),
        Endpoint::Vm => {
            let body: VmStateBody = json(
                "PATCH /vm",
                r#"{"state": "Paused"} or {"state": "Resumed"}"#,
                body,
            )?;
            Ok(ApiRequest::SetState(body.state))
        }
        Endpoint::SnapshotCreate => {
            let body: SnapshotCreateBody = json(
                "PUT /snapshot/create",
                r#"{"snapshot_path": "/path/to/dir"}"#,
                body,
            )?;
            if body.mem_file_path.is_some() {
                return Err(ApiFault::bad_request(
                    "mem_file_path is not supported: an apfvm snapshot is one directory \
                     (snapshot_path) that holds both the state file and the memory file",
                ));
            }
            if body.snapshot_type == Some(SnapshotType::Diff) {
                return Err(ApiFault::bad_request(
                    "snapshot_type Diff is not supported: apfvm writes full snapshots",
                ));
            }
            check_path("snapshot_path", &body.snapshot_path)?;
            Ok(ApiRequest::CreateSnapshot {
                dir: body.snapshot_path,
            })
        }
        Endpoint::SnapshotLoad => {
            let body: SnapshotLoadBody = json(
                "PUT /snapshot/load",
                r#"{"snapshot_path": "/path/to/dir"}"#,
                body,
            )?;
            if body.enable_diff_snapshots || body.track_dirty_pages {
                return Err(ApiFault::bad_request(
                    "enable_diff_snapshots and track_dirty_pages are not supported: apfvm \
                     writes full snapshots",
                ));
            }
            check_path("snapshot_path", &body.snapshot_path)?;
            let memory_file = match body.mem_backend {
                Some(backend) if backend.backend_type == MemBackendType::Uffd => {
                    return Err(ApiFault::bad_request(
                        "mem_backend.backend_type Uffd is not supported: guest memory comes \
                         from the snapshot's memory file (backend_type File), through apfvm's \
                         own pager if it was started with --pager uffd",
                    ));
                }
                Some(backend) => {
                    check_path("mem_backend.backend_path", &backend.backend_path)?;
                    Some(backend.backend_path)
                }
                None => None,
            };
            Ok(ApiRequest::LoadSnapshot {
                dir: body.snapshot_path,
                memory_file,
                resume: body.resume_vm,
            })
        }
    }
}

fn check_path(field: &str, path: &std::path::Path) -> Result<(), ApiFault> {
    if path.as_os_str().is_empty() {
        return Err(ApiFault::bad_request(format!("{field} is empty")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(endpoint: Endpoint, body: &str) -> String {
        parse_body(endpoint, body.as_bytes()).unwrap_err().message
    }

    #[test]
    fn routes_and_their_faults() {
        assert_eq!(route(&Method::GET, "/").unwrap(), Endpoint::Info);
        assert_eq!(route(&Method::PATCH, "/vm").unwrap(), Endpoint::Vm);
        let missing = route(&Method::GET, "/machine-config").unwrap_err();
        assert_eq!(missing.fault.status, StatusCode::NOT_FOUND);
        assert!(
            missing.fault.message.contains("/machine-config"),
            "{missing:?}"
        );
        assert_eq!(missing.allow, None);
        let wrong = route(&Method::PUT, "/vm").unwrap_err();
        assert_eq!(wrong.fault.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(wrong.fault.message, "/vm takes PATCH, not PUT");
        assert_eq!(wrong.allow, Some(Method::PATCH));
    }

    #[test]
    fn bodies_parse_into_requests() {
        let ok = |endpoint, body: &str| parse_body(endpoint, body.as_bytes()).unwrap();
        assert_eq!(
            ok(Endpoint::Vm, r#"{"state":"Paused"}"#),
            ApiRequest::SetState(super::super::RequestedState::Paused)
        );
        assert_eq!(
            ok(
                Endpoint::SnapshotCreate,
                r#"{"snapshot_path":"/s","snapshot_type":"Full"}"#
            ),
            ApiRequest::CreateSnapshot { dir: "/s".into() }
        );
        assert_eq!(
            ok(
                Endpoint::SnapshotLoad,
                r#"{"snapshot_path":"/s","mem_backend":{"backend_path":"/s/memory-1",
                    "backend_type":"File"},"resume_vm":true,"track_dirty_pages":false}"#
            ),
            ApiRequest::LoadSnapshot {
                dir: "/s".into(),
                memory_file: Some("/s/memory-1".into()),
                resume: true
            }
        );
        assert_eq!(ok(Endpoint::Info, "ignored"), ApiRequest::Info);
    }

    #[test]
    fn bad_bodies_are_named() {
        let message = fault(Endpoint::Vm, r#"{"state":"Running"}"#);
        assert!(
            message.contains("unknown variant `Running`, expected `Paused` or `Resumed`"),
            "{message}"
        );
        let message = fault(Endpoint::Vm, r#"{"state":"Paused","x":1}"#);
        assert!(message.contains("unknown field `x`"), "{message}");
        let message = fault(Endpoint::Vm, "{not json");
        assert!(
            message.starts_with("bad JSON body for PATCH /vm"),
            "{message}"
        );
        let message = fault(Endpoint::Vm, "");
        assert!(message.contains("needs a JSON body"), "{message}");
        let message = fault(
            Endpoint::SnapshotCreate,
            r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#,
        );
        assert!(
            message.contains("mem_file_path is not supported"),
            "{message}"
        );
        let message = fault(
            Endpoint::SnapshotCreate,
            r#"{"snapshot_path":"/s","snapshot_type":"Diff"}"#,
        );
        assert!(message.contains("Diff is not supported"), "{message}");
        let message = fault(Endpoint::SnapshotCreate, r#"{"snapshot_path":""}"#);
        assert_eq!(message, "snapshot_path is empty");
        let message = fault(Endpoint::SnapshotCreate, r#"{}"#);
        assert!(
            message.contains("missing field `snapshot_path`"),
            "{message}"
        );
        let message = fault(
            Endpoint::SnapshotLoad,
            r#"{"snapshot_path":"/s","mem_backend":{"backend_path":"/m","backend_type":"Uffd"}}"#,
        );
        assert!(message.contains("Uffd is not supported"), "{message}");
        let message = fault(
            Endpoint::SnapshotLoad,
            r#"{"snapshot_path":"/s","enable_diff_snapshots":true}"#,
        );
        assert!(message.contains("not supported"), "{message}");
    }
}

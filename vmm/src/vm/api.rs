//! The control API's requests (`crate::api`), carried out by the thread that owns the VM:
//! the main thread, between the events of its loop (run.rs). A request that cannot be carried
//! out is answered with what is wrong, and the VM goes on as it was.
//!
//! Before a VM exists (`apfvm run --api-socket` without a kernel), `AwaitLoad` serves the
//! requests: `PUT /snapshot/load` builds the VM from a snapshot, which then runs (with
//! `resume_vm`) or waits, paused, for `PATCH /vm {"state":"Resumed"}`; nothing of the guest
//! runs before that.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::{Vm, VmError, VmState};
use crate::api::{ApiCall, ApiReply, ApiRequest, InstanceInfo, InstanceState, RequestedState};
use crate::config::{KernelImage, Settings};

/// `GET /`'s answer: about `vm`, or about an apfvm that waits for a snapshot (`None`).
pub(super) fn info(vm: Option<&Vm>) -> InstanceInfo {
    let mut info = InstanceInfo {
        app_name: "apfvm".into(),
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        state: InstanceState::NotStarted,
        vcpus: None,
        mem_size_mib: None,
        apf: None,
        pager: None,
        snapshot_id: None,
    };
    if let Some(vm) = vm {
        let config = vm.config();
        info.state = match vm.state() {
            VmState::Running => InstanceState::Running,
            // Built: loaded from a snapshot, waiting to be resumed. Stopped is not seen here
            // (requests are not served once the VM stops).
            VmState::Paused | VmState::Built | VmState::Stopped => InstanceState::Paused,
        };
        info.vcpus = Some(config.vcpus);
        info.mem_size_mib = Some(config.mem_size >> 20);
        info.apf = Some(config.apf);
        info.pager = Some(
            if config.paging.is_some() {
                "uffd"
            } else {
                "none"
            }
            .into(),
        );
        if let KernelImage::Snapshot(snapshot) = &config.kernel {
            info.snapshot_id = Some(snapshot.state.id.clone());
        }
    }
    info
}

/// Carries out `request` on a VM that has started (running or paused).
pub(super) fn serve(vm: &mut Vm, request: ApiRequest) -> ApiReply {
    match (request, vm.state()) {
        (ApiRequest::Info, _) => ApiReply::Info(Box::new(info(Some(vm)))),
        // As in Firecracker, asking for the state the VM is in is no error.
        (ApiRequest::SetState(RequestedState::Paused), VmState::Paused)
        | (ApiRequest::SetState(RequestedState::Resumed), VmState::Running) => ApiReply::Done,
        (ApiRequest::SetState(RequestedState::Paused), VmState::Running) => {
            vm.pause().map_err(|e| e.to_string()).into()
        }
        (ApiRequest::SetState(RequestedState::Resumed), VmState::Paused) => {
            vm.resume().map_err(|e| e.to_string()).into()
        }
        (ApiRequest::SetState(_), state) => {
            ApiReply::bad_request(format!("the VM is {state:?}: it cannot change state now"))
        }
        (ApiRequest::CreateSnapshot { dir }, VmState::Paused) => match vm.snapshot(&dir) {
            Ok(info) => {
                super::run::report_snapshot(&info);
                ApiReply::Done
            }
            Err(e) => ApiReply::bad_request(format!("snapshot failed: {e}")),
        },
        (ApiRequest::CreateSnapshot { .. }, state) => ApiReply::bad_request(format!(
            "the VM is {state:?}: a snapshot is taken of a paused VM (PATCH /vm \
             {{\"state\": \"Paused\"}} first)"
        )),
        (ApiRequest::LoadSnapshot { .. }, _) => ApiReply::bad_request(
            "a VM is already running: PUT /snapshot/load is for an apfvm started with \
             --api-socket and no kernel, before any VM runs",
        ),
    }
}

/// The requests before a VM runs, on `apfvm run --api-socket` without a kernel.
pub(super) struct AwaitLoad<'a> {
    /// The command line's settings, checked against the snapshot when it is loaded.
    pub settings: &'a Settings,
    pub kvm_path: &'a str,
    /// `--metrics-file`, opened already; each VM built gets its own descriptor of it.
    pub metrics_file: Option<File>,
    /// A VM loaded and not resumed yet.
    pub loaded: Option<Vm>,
}

const NO_VM: &str = "no VM yet: load a snapshot first (PUT /snapshot/load)";

impl AwaitLoad<'_> {
    /// Serves one call; returns the VM once it has started (the call that started it is
    /// answered). An error is a VM that could not start (the call says so too).
    pub fn serve(&mut self, call: ApiCall) -> Result<Option<Vm>, VmError> {
        let ApiCall { request, reply } = call;
        match request {
            ApiRequest::Info => reply.answer(ApiReply::Info(Box::new(info(self.loaded.as_ref())))),
            ApiRequest::SetState(RequestedState::Resumed) => match self.loaded.take() {
                Some(vm) => return start(vm, reply).map(Some),
                None => reply.answer(ApiReply::bad_request(NO_VM)),
            },
            ApiRequest::SetState(RequestedState::Paused) => reply.answer(match self.loaded {
                // Loaded and not resumed: paused already.
                Some(_) => ApiReply::Done,
                None => ApiReply::bad_request(NO_VM),
            }),
            ApiRequest::CreateSnapshot { .. } if self.loaded.is_some() => {
                reply.answer(ApiReply::bad_request(
                    "the VM was loaded from a snapshot and has not run since: resume it first \
                     (PATCH /vm {\"state\": \"Resumed\"})",
                ))
            }
            ApiRequest::CreateSnapshot { .. } => reply.answer(ApiReply::bad_request(NO_VM)),
            ApiRequest::LoadSnapshot { .. } if self.loaded.is_some() => {
                reply.answer(ApiReply::bad_request(
                    "a snapshot is loaded already: resume it (PATCH /vm {\"state\": \
                     \"Resumed\"})",
                ))
            }
            ApiRequest::LoadSnapshot {
                dir,
                memory_file,
                resume,
            } => match self.load(&dir, memory_file.as_deref()) {
                Err(message) => reply.answer(ApiReply::bad_request(message)),
                Ok(vm) if resume => return start(vm, reply).map(Some),
                Ok(vm) => {
                    self.loaded = Some(vm);
                    reply.answer(ApiReply::Done);
                }
            },
        }
        Ok(None)
    }

    /// Reads and checks the snapshot in `dir`, then builds its VM (not started).
    fn load(&self, dir: &Path, memory_file: Option<&Path>) -> Result<Vm, String> {
        let snapshot = crate::snapshot::load(dir).map_err(|e| format!("loading: {e}"))?;
        if let Some(given) = memory_file {
            check_memory_file(given, &snapshot.memory_path)?;
        }
        let config = self
            .settings
            .clone()
            .into_restore_config(Arc::new(snapshot))
            .map_err(|e| e.to_string())?;
        let metrics = self
            .metrics_file
            .as_ref()
            .map(File::try_clone)
            .transpose()
            .map_err(|e| format!("the metrics file: {e}"))?;
        Vm::build(config, self.kvm_path, metrics).map_err(|e| format!("restoring: {e}"))
    }
}

/// Starts a loaded VM and answers the call that asked for it.
fn start(mut vm: Vm, reply: crate::api::Responder) -> Result<Vm, VmError> {
    match vm.start() {
        Ok(()) => {
            reply.answer(ApiReply::Done);
            Ok(vm)
        }
        Err(e) => {
            reply.answer(ApiReply::bad_request(format!("starting the VM: {e}")));
            Err(e)
        }
    }
}

/// `mem_backend.backend_path` must be the snapshot's own memory file.
fn check_memory_file(given: &Path, memory: &Path) -> Result<(), String> {
    let id = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| format!("mem_backend.backend_path {}: {e}", path.display()))
    };
    if id(given)? != id(memory)? {
        return Err(format!(
            "mem_backend.backend_path {} is not the snapshot's memory file {} (an apfvm \
             snapshot keeps its memory in its directory)",
            given.display(),
            memory.display()
        ));
    }
    Ok(())
}

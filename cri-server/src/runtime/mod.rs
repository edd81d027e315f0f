//! The CRI v1 RuntimeService: request validation and the mapping of [`SandboxError`]s to gRPC codes,
//! over the sandbox manager. Record → CRI message conversions are in `convert`; the ImageService is in
//! `images`.

mod convert;
mod error;
mod handlers;
mod metrics;
mod stats;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::*;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use vmm::KvmHost;

use crate::sandbox::{Manager, SandboxError};
use crate::state::{labels_match, ContainerState, PodState};
use crate::streaming::StreamingServer;
use convert::{container_status, cri_container, cri_pod, pod_status, Stats};
pub use error::to_status;

/// CRI API version served.
pub const CRI_API_VERSION: &str = "v1";
/// Runtime name reported by Version.
pub const RUNTIME_NAME: &str = "podvisor";
/// The runtime handler of native pods.
pub use crate::sandbox::validate::NATIVE_HANDLER;

/// The CRI runtime.
#[derive(Clone)]
pub struct Runtime {
    guest_dir: PathBuf,
    manager: Manager,
    streaming: Arc<StreamingServer>,
    stats: Stats,
}

type Result<T> = std::result::Result<Response<T>, Status>;

fn ok<T>(v: T) -> Result<T> {
    Ok(Response::new(v))
}

impl Runtime {
    /// A runtime booting guests from `guest_dir` through `manager`, handing out `streaming` URLs.
    pub fn new(guest_dir: PathBuf, manager: Manager, streaming: Arc<StreamingServer>) -> Runtime {
        Runtime {
            guest_dir,
            manager,
            streaming,
            stats: Stats::default(),
        }
    }

    /// The full id of a running container (Exec/Attach need one).
    fn running_container(&self, id: &str) -> std::result::Result<String, Status> {
        let id = self
            .manager
            .resolve_container("container_id", id)
            .map_err(to_status)?;
        let record = self
            .manager
            .store()
            .container(&id)
            .map_err(|e| to_status(e.into()))?;
        match record {
            Some(c) if c.state == ContainerState::Running => Ok(id),
            _ => Err(Status::failed_precondition(format!(
                "container {id} is not running"
            ))),
        }
    }

    /// RuntimeReady: KVM usable and guest artifacts installed.
    fn runtime_condition(&self) -> RuntimeCondition {
        let host = KvmHost::detect();
        let missing: Vec<String> = ["vmlinux", "initramfs.cpio"]
            .iter()
            .map(|f| self.guest_dir.join(f))
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        let (status, reason, message) = if !host.dev_kvm {
            (false, "KVMUnavailable", "/dev/kvm is missing".to_string())
        } else if !missing.is_empty() {
            (
                false,
                "GuestImageMissing",
                format!("missing {}", missing.join(", ")),
            )
        } else {
            (true, "", format!("KVM: {}", host.kind))
        };
        RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status,
            reason: reason.into(),
            message,
        }
    }

    async fn pod_status_of(
        &self,
        id: &str,
        verbose: bool,
    ) -> std::result::Result<PodSandboxStatusResponse, SandboxError> {
        let id = self.manager.resolve_pod("pod_sandbox_id", id)?;
        let store = self.manager.store();
        let pod = store.pod(&id)?.ok_or_else(|| {
            SandboxError::NotFound(format!("pod_sandbox_id: pod sandbox {id} not found"))
        })?;
        let containers = store.pod_containers(&id)?;
        Ok(PodSandboxStatusResponse {
            status: Some(pod_status(&pod)),
            info: if verbose {
                let check = self.manager.check_network(&pod).await;
                convert::pod_info(&pod, check)
            } else {
                Default::default()
            },
            containers_statuses: containers
                .iter()
                .map(|c| container_status(&self.manager, c))
                .collect(),
            timestamp: crate::sandbox::now_ns(),
        })
    }
}

type EventStream = Pin<
    Box<
        dyn tokio_stream::Stream<Item = std::result::Result<ContainerEventResponse, Status>> + Send,
    >,
>;

/// The span of an operation on one object (a child of the RPC's `cri` span).
fn span(id: &str) -> tracing::Span {
    tracing::info_span!("object", id = %id)
}

/// Runs a state-changing operation to completion in its own task, even if the client goes away
/// (tonic drops a handler's future when the call is cancelled or times out), so no operation stops
/// half-way between its intent and its result.
async fn detached<T: Send + 'static>(
    span: tracing::Span,
    operation: impl std::future::Future<Output = std::result::Result<T, SandboxError>> + Send + 'static,
) -> std::result::Result<T, Status> {
    tokio::spawn(operation.instrument(span))
        .await
        .map_err(|e| Status::internal(format!("operation task failed: {e}")))?
        .map_err(to_status)
}

#[tonic::async_trait]
impl RuntimeService for Runtime {
    type GetContainerEventsStream = EventStream;

    async fn version(&self, _request: Request<VersionRequest>) -> Result<VersionResponse> {
        ok(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        })
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<StatusResponse> {
        let network = match self.manager.network_status() {
            Ok(_) => RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                reason: String::new(),
                message: String::new(),
            },
            Err(e) => RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: format!("CNI: {e}"),
            },
        };
        let mut info = std::collections::HashMap::new();
        if request.into_inner().verbose {
            info.insert(
                "config".into(),
                serde_json::json!({"guestDir": self.guest_dir, "kvm": KvmHost::detect().kind.to_string()})
                    .to_string(),
            );
        }
        let runtime_handlers = handlers::list(self.manager.native_pods());
        ok(StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![self.runtime_condition(), network],
            }),
            info,
            runtime_handlers,
            features: Some(RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        })
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<RunPodSandboxRequest>,
    ) -> Result<RunPodSandboxResponse> {
        let req = request.into_inner();
        handlers::check(&req.runtime_handler, self.manager.native_pods())?;
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config: missing"))?;
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let m = self.manager.clone();
        let handler = req.runtime_handler;
        let id = detached(
            span(&name),
            async move { m.run_pod(config, &handler).await },
        )
        .await?;
        ok(RunPodSandboxResponse { pod_sandbox_id: id })
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<StopPodSandboxRequest>,
    ) -> Result<StopPodSandboxResponse> {
        let id = request.into_inner().pod_sandbox_id;
        let m = self.manager.clone();
        detached(span(&id), async move { m.stop_pod(&id).await }).await?;
        ok(StopPodSandboxResponse {})
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<RemovePodSandboxRequest>,
    ) -> Result<RemovePodSandboxResponse> {
        let id = request.into_inner().pod_sandbox_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("pod_sandbox_id: empty"));
        }
        let m = self.manager.clone();
        detached(span(&id), async move { m.remove_pod(&id).await }).await?;
        ok(RemovePodSandboxResponse {})
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<PodSandboxStatusRequest>,
    ) -> Result<PodSandboxStatusResponse> {
        let req = request.into_inner();
        self.pod_status_of(&req.pod_sandbox_id, req.verbose)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<ListPodSandboxRequest>,
    ) -> Result<ListPodSandboxResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let pods = self
            .manager
            .store()
            .pods()
            .map_err(|e| to_status(e.into()))?;
        // A pod still being created is not listed (as in containerd): kubelet must not see, and
        // garbage-collect, a pod whose RunPodSandbox has not answered yet.
        let items = pods
            .iter()
            .filter(|p| p.state != PodState::Creating)
            .filter(|p| filter.id.is_empty() || p.id.starts_with(&filter.id))
            .map(cri_pod)
            .filter(|p| filter.state.as_ref().is_none_or(|s| s.state == p.state))
            .filter(|p| labels_match(&p.labels, &filter.label_selector))
            .collect();
        ok(ListPodSandboxResponse { items })
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<CreateContainerResponse> {
        let req = request.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config: missing"))?;
        let m = self.manager.clone();
        let pod = req.pod_sandbox_id;
        let id = detached(
            span(&pod),
            async move { m.create_container(&pod, config).await },
        )
        .await?;
        ok(CreateContainerResponse { container_id: id })
    }

    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<StartContainerResponse> {
        let id = request.into_inner().container_id;
        let m = self.manager.clone();
        detached(span(&id), async move { m.start_container(&id).await }).await?;
        ok(StartContainerResponse {})
    }

    async fn stop_container(
        &self,
        request: Request<StopContainerRequest>,
    ) -> Result<StopContainerResponse> {
        let req = request.into_inner();
        let m = self.manager.clone();
        let id = req.container_id;
        detached(span(&id), async move {
            m.stop_container(&id, req.timeout).await
        })
        .await?;
        ok(StopContainerResponse {})
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<RemoveContainerResponse> {
        let id = request.into_inner().container_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("container_id: empty"));
        }
        let m = self.manager.clone();
        detached(span(&id), async move { m.remove_container(&id).await }).await?;
        ok(RemoveContainerResponse {})
    }

    async fn list_containers(
        &self,
        request: Request<ListContainersRequest>,
    ) -> Result<ListContainersResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let all = self
            .manager
            .store()
            .containers()
            .map_err(|e| to_status(e.into()))?;
        let containers = all
            .iter()
            .filter(|c| c.state != ContainerState::Creating)
            .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
            .filter(|c| {
                filter.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&filter.pod_sandbox_id)
            })
            .map(cri_container)
            .filter(|c| filter.state.as_ref().is_none_or(|s| s.state == c.state))
            .filter(|c| labels_match(&c.labels, &filter.label_selector))
            .collect();
        ok(ListContainersResponse { containers })
    }

    async fn container_status(
        &self,
        request: Request<ContainerStatusRequest>,
    ) -> Result<ContainerStatusResponse> {
        let req = request.into_inner();
        let id = self
            .manager
            .resolve_container("container_id", &req.container_id)
            .map_err(to_status)?;
        let record = self
            .manager
            .store()
            .container(&id)
            .map_err(|e| to_status(e.into()))?
            .ok_or_else(|| Status::not_found(format!("container_id: container {id} not found")))?;
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            info.insert("info".into(), convert::container_info(&record));
        }
        ok(ContainerStatusResponse {
            status: Some(container_status(&self.manager, &record)),
            info,
        })
    }

    async fn update_container_resources(
        &self,
        request: Request<UpdateContainerResourcesRequest>,
    ) -> Result<UpdateContainerResourcesResponse> {
        let req = request.into_inner();
        let linux = req
            .linux
            .ok_or_else(|| Status::invalid_argument("linux: missing"))?;
        let m = self.manager.clone();
        let id = req.container_id;
        detached(
            span(&id),
            async move { m.update_resources(&id, linux).await },
        )
        .await?;
        ok(UpdateContainerResourcesResponse {})
    }

    async fn reopen_container_log(
        &self,
        request: Request<ReopenContainerLogRequest>,
    ) -> Result<ReopenContainerLogResponse> {
        let id = request.into_inner().container_id;
        self.manager.reopen_log(&id).await.map_err(to_status)?;
        ok(ReopenContainerLogResponse {})
    }

    async fn exec_sync(&self, request: Request<ExecSyncRequest>) -> Result<ExecSyncResponse> {
        let req = request.into_inner();
        let out = self
            .manager
            .exec_sync(&req.container_id, &req.cmd, req.timeout)
            .instrument(span(&req.container_id))
            .await
            .map_err(to_status)?;
        ok(ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        })
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<ExecResponse> {
        let mut req = request.into_inner();
        req.container_id = self.running_container(&req.container_id)?;
        ok(ExecResponse {
            url: self.streaming.exec_url(&req)?,
        })
    }

    async fn attach(&self, request: Request<AttachRequest>) -> Result<AttachResponse> {
        let mut req = request.into_inner();
        req.container_id = self.running_container(&req.container_id)?;
        ok(AttachResponse {
            url: self.streaming.attach_url(&req)?,
        })
    }

    async fn port_forward(
        &self,
        request: Request<PortForwardRequest>,
    ) -> Result<PortForwardResponse> {
        let mut req = request.into_inner();
        let id = self
            .manager
            .resolve_pod("pod_sandbox_id", &req.pod_sandbox_id)
            .map_err(to_status)?;
        let pod = self
            .manager
            .store()
            .pod(&id)
            .map_err(|e| to_status(e.into()))?;
        if pod.is_none_or(|p| p.state != PodState::Ready) {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {id} is not ready"
            )));
        }
        req.pod_sandbox_id = id;
        ok(PortForwardResponse {
            url: self.streaming.port_forward_url(&req)?,
        })
    }

    async fn container_stats(
        &self,
        request: Request<ContainerStatsRequest>,
    ) -> Result<ContainerStatsResponse> {
        let id = request.into_inner().container_id;
        let (record, stats) = self.manager.container_stats(&id).await.map_err(to_status)?;
        ok(ContainerStatsResponse {
            stats: Some(self.stats.container(&record, stats.as_ref())),
        })
    }

    async fn list_container_stats(
        &self,
        request: Request<ListContainerStatsRequest>,
    ) -> Result<ListContainerStatsResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        ok(ListContainerStatsResponse {
            stats: self.list_container_stats(filter).await?,
        })
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<PodSandboxStatsRequest>,
    ) -> Result<PodSandboxStatsResponse> {
        let id = self
            .manager
            .resolve_pod("pod_sandbox_id", &request.into_inner().pod_sandbox_id)
            .map_err(to_status)?;
        ok(PodSandboxStatsResponse {
            stats: Some(self.pod_stats(&id).await.map_err(to_status)?),
        })
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<ListPodSandboxStatsRequest>,
    ) -> Result<ListPodSandboxStatsResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        ok(ListPodSandboxStatsResponse {
            stats: self.list_pod_stats(filter).await?,
        })
    }

    async fn update_runtime_config(
        &self,
        request: Request<UpdateRuntimeConfigRequest>,
    ) -> Result<UpdateRuntimeConfigResponse> {
        // The pod CIDR matters to CNI configurations that template it; podvisor's comes from the
        // CNI config files, so it is only logged.
        if let Some(net) = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
        {
            tracing::info!(pod_cidr = %net.pod_cidr, "UpdateRuntimeConfig");
        }
        ok(UpdateRuntimeConfigResponse {})
    }

    async fn runtime_config(
        &self,
        _request: Request<RuntimeConfigRequest>,
    ) -> Result<RuntimeConfigResponse> {
        ok(RuntimeConfigResponse {
            linux: Some(LinuxRuntimeConfiguration {
                cgroup_driver: CgroupDriver::Cgroupfs as i32,
            }),
        })
    }

    async fn checkpoint_container(
        &self,
        _request: Request<CheckpointContainerRequest>,
    ) -> Result<CheckpointContainerResponse> {
        Err(Status::unimplemented(
            "checkpoint_container: checkpointing pod VMs is not supported",
        ))
    }

    async fn get_container_events(
        &self,
        _request: Request<GetEventsRequest>,
    ) -> Result<Self::GetContainerEventsStream> {
        let rx = self.manager.subscribe();
        let manager = self.manager.clone();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |ev| {
            let ev = ev.ok()?;
            Some(Ok(convert::event(&manager, &ev)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<ListMetricDescriptorsRequest>,
    ) -> Result<ListMetricDescriptorsResponse> {
        ok(ListMetricDescriptorsResponse {
            descriptors: metrics::metric_descriptors(),
        })
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<ListPodSandboxMetricsRequest>,
    ) -> Result<ListPodSandboxMetricsResponse> {
        ok(ListPodSandboxMetricsResponse {
            pod_metrics: self.list_pod_metrics().await?,
        })
    }
}

use tokio_stream::StreamExt as _;

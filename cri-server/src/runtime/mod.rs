//! The CRI v1 RuntimeService. Version and Status are real; pod and container operations are not
//! implemented yet and answer `UNIMPLEMENTED` naming the RPC (issue "CRI RuntimeService end to end"),
//! so kubelet and crictl get a clear error rather than a fake success. The ImageService is in `images`.

use std::path::PathBuf;
use std::pin::Pin;

use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::*;
use tonic::{Request, Response, Status};
use vmm::KvmHost;

/// CRI API version served.
pub const CRI_API_VERSION: &str = "v1";
/// Runtime name reported by Version.
pub const RUNTIME_NAME: &str = "podvisor";

/// The CRI runtime state.
#[derive(Clone, Debug)]
pub struct Runtime {
    guest_dir: PathBuf,
}

impl Runtime {
    /// A runtime booting guests from `guest_dir`.
    pub fn new(guest_dir: PathBuf) -> Runtime {
        Runtime { guest_dir }
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
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

macro_rules! cri_impl {
    ($trait:ident for $ty:ty { $($own:item)* } unimplemented { $($name:ident($req:ty) -> $resp:ty;)* }) => {
        #[tonic::async_trait]
        impl $trait for $ty {
            $($own)*
            $(
                async fn $name(&self, _request: Request<$req>) -> Result<Response<$resp>, Status> {
                    Err(Status::unimplemented(concat!(stringify!($name), " is not implemented by podvisor yet")))
                }
            )*
        }
    };
}

cri_impl!(RuntimeService for Runtime {
    type GetContainerEventsStream = EventStream;

    async fn version(&self, _request: Request<VersionRequest>) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let network = RuntimeCondition {
            r#type: "NetworkReady".into(),
            status: false,
            reason: "NetworkPluginNotReady".into(),
            message: "pod networking is not implemented yet".into(),
        };
        Ok(Response::new(StatusResponse {
            status: Some(RuntimeStatus {
                conditions: vec![self.runtime_condition(), network],
            }),
            ..Default::default()
        }))
    }

    async fn get_container_events(
        &self,
        _request: Request<GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Err(Status::unimplemented("get_container_events is not implemented by podvisor yet"))
    }
} unimplemented {
    run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
    stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
    remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
    pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
    list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
    create_container(CreateContainerRequest) -> CreateContainerResponse;
    start_container(StartContainerRequest) -> StartContainerResponse;
    stop_container(StopContainerRequest) -> StopContainerResponse;
    remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
    list_containers(ListContainersRequest) -> ListContainersResponse;
    container_status(ContainerStatusRequest) -> ContainerStatusResponse;
    update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
    reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
    exec_sync(ExecSyncRequest) -> ExecSyncResponse;
    exec(ExecRequest) -> ExecResponse;
    attach(AttachRequest) -> AttachResponse;
    port_forward(PortForwardRequest) -> PortForwardResponse;
    container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
    list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
    pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse;
    list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
    update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
    checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
    list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
    list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
    runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse;
});

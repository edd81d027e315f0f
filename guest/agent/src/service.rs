//! The `podvisor.agent.v1.Agent` gRPC service. Request errors are the `files` and `storage` module errors,
//! mapped to gRPC status codes in `status`.

mod status;
#[cfg(test)]
use status::MAX_STATUS_MESSAGE;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use podvisor_proto as pb;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::container::{ContainerError, ContainerManager};
use crate::files;
use crate::network::Network;
use crate::sandbox::Sandbox;
use crate::storage::{StorageManager, StorageSpec};

/// Most containers one StatsSandbox call may name.
const MAX_STATS_CONTAINERS: usize = 256;

/// Facts about this boot, collected by `main`.
#[derive(Debug)]
pub struct BootInfo {
    /// When the agent process started.
    pub started: Instant,
    /// `uname -r`.
    pub kernel_release: String,
    /// Kernel uptime at agent start, in ms.
    pub boot_to_agent_start_ms: Option<u64>,
    /// Kernel uptime when the listener was ready, in ms (0 until then).
    pub boot_to_ready_ms: AtomicU64,
}

/// The agent service. Cloned per connection by tonic; all state is shared.
#[derive(Clone)]
pub struct AgentService {
    boot: Arc<BootInfo>,
    storage: Arc<StorageManager>,
    containers: Option<Arc<ContainerManager>>,
    sandbox: Arc<Sandbox>,
    network: Option<Arc<Network>>,
    shutdown: Arc<Notify>,
    stopping: Arc<AtomicBool>,
}

impl AgentService {
    /// A service over `storage`; a `Shutdown` call notifies `shutdown` (once the reply is on its way).
    pub fn new(boot: Arc<BootInfo>, storage: Arc<StorageManager>, shutdown: Arc<Notify>) -> Self {
        Self {
            boot,
            storage,
            containers: None,
            network: None,
            sandbox: Arc::new(Sandbox::system()),
            shutdown,
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Adds the container manager (absent in tests without an engine, and when the engine failed to start:
    /// container RPCs then answer Unavailable).
    pub fn with_containers(
        mut self,
        containers: Arc<ContainerManager>,
        sandbox: Arc<Sandbox>,
    ) -> Self {
        self.containers = Some(containers);
        self.sandbox = sandbox;
        self
    }

    /// Adds guest network configuration (absent in tests and when no netlink socket could be opened).
    pub fn with_network(mut self, network: Arc<Network>) -> Self {
        self.network = Some(network);
        self
    }

    fn network(&self) -> Result<&Network, Status> {
        self.network
            .as_deref()
            .ok_or_else(|| Status::unavailable("guest network configuration is not available"))
    }

    /// The image storages.
    pub fn storage(&self) -> &StorageManager {
        &self.storage
    }

    /// Removes every container (killing what runs) and the pod's files; returns what failed. A native
    /// pod's agent does this before it exits: on the node nothing else would end its containers.
    pub async fn tear_down(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(containers) = &self.containers {
            for id in containers.ids() {
                if let Err(e) = containers.remove(&id).await {
                    errors.push(format!("removing container {id}: {e}"));
                }
            }
            containers.set_pid_namespace(None, false);
        }
        self.sandbox.destroy();
        errors
    }

    fn containers(&self) -> Result<&ContainerManager, Status> {
        self.containers
            .as_deref()
            .ok_or_else(|| Status::unavailable("the container engine is not running in this guest"))
    }
}

/// A server stream of gRPC messages.
type Stream<T> = tonic::codegen::BoxStream<T>;

#[tonic::async_trait]
impl pb::Agent for AgentService {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let status = if self.stopping.load(Ordering::Relaxed) {
            pb::ServingStatus::NotServing
        } else {
            pb::ServingStatus::Serving
        };
        Ok(Response::new(pb::HealthResponse {
            status: status.into(),
        }))
    }

    async fn version(
        &self,
        _: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let ready = self.boot.boot_to_ready_ms.load(Ordering::Relaxed);
        Ok(Response::new(pb::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: self.boot.kernel_release.clone(),
            agent_uptime_ms: self.boot.started.elapsed().as_millis() as u64,
            boot_to_agent_start_ms: self.boot.boot_to_agent_start_ms,
            boot_to_ready_ms: (ready > 0).then_some(ready),
        }))
    }

    async fn add_storage(
        &self,
        req: Request<pb::AddStorageRequest>,
    ) -> Result<Response<pb::AddStorageResponse>, Status> {
        let spec = StorageSpec::from_request(req.get_ref(), self.storage.default_root())?;
        let (mount_point, device) = self.storage.add(&spec).await?;
        crate::log(&format!(
            "storage {} mounted: {} on {} ({}{})",
            spec.id,
            device.display(),
            mount_point.display(),
            spec.fstype,
            if spec.read_only { ", ro" } else { "" }
        ));
        Ok(Response::new(pb::AddStorageResponse {
            mount_point: mount_point.display().to_string(),
            device: device.display().to_string(),
        }))
    }

    async fn remove_storage(
        &self,
        req: Request<pb::RemoveStorageRequest>,
    ) -> Result<Response<pb::RemoveStorageResponse>, Status> {
        let id = &req.get_ref().id;
        let removed = self.storage.remove(id)?;
        if removed {
            crate::log(&format!("storage {id} removed"));
        }
        Ok(Response::new(pb::RemoveStorageResponse { removed }))
    }

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        let req = req.into_inner();
        let path = files::validate_path("path", &req.path)?;
        let limit = files::read_limit(req.max_bytes)?;
        let (data, eof) = files::read_chunk(&path, req.offset, limit)?;
        Ok(Response::new(pb::ReadFileResponse { data, eof }))
    }

    async fn copy_file(
        &self,
        req: Request<pb::CopyFileRequest>,
    ) -> Result<Response<pb::CopyFileResponse>, Status> {
        let root = std::path::Path::new(pb::GUEST_MOUNTS_DIR);
        crate::copy::copy_file(root, req.get_ref())?;
        Ok(Response::new(pb::CopyFileResponse {}))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        crate::log("shutdown requested");
        self.stopping.store(true, Ordering::Relaxed);
        // `main` waits a moment for this reply to be flushed, then syncs, unmounts and reboots.
        self.shutdown.notify_one();
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    async fn create_sandbox(
        &self,
        req: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::CreateSandboxResponse>, Status> {
        let containers = self.containers()?;
        let pid_ns = self.sandbox.create(req.get_ref())?;
        let host_pid = req.get_ref().node_namespaces.is_some_and(|n| n.pid);
        containers.set_pid_namespace(pid_ns, host_pid);
        // A fact of the guest kernel: DestroySandbox leaves it.
        containers.set_avoid_avx(req.get_ref().avoid_avx);
        crate::log(&format!("sandbox {} created", req.get_ref().hostname));
        Ok(Response::new(pb::CreateSandboxResponse {}))
    }

    async fn destroy_sandbox(
        &self,
        _: Request<pb::DestroySandboxRequest>,
    ) -> Result<Response<pb::DestroySandboxResponse>, Status> {
        let containers = self.containers()?;
        let mut removed_containers = Vec::new();
        for id in containers.ids() {
            if containers.remove(&id).await? {
                removed_containers.push(id);
            }
        }
        containers.set_pid_namespace(None, false);
        self.sandbox.destroy();
        Ok(Response::new(pb::DestroySandboxResponse {
            removed_containers,
        }))
    }

    async fn guest_details(
        &self,
        _: Request<pb::GuestDetailsRequest>,
    ) -> Result<Response<pb::GuestDetailsResponse>, Status> {
        Ok(Response::new(crate::init::guest_details(
            &self.boot.kernel_release,
        )))
    }

    async fn create_container(
        &self,
        req: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::CreateContainerResponse>, Status> {
        let started = Instant::now();
        let created = self.containers()?.create(req.get_ref()).await?;
        crate::log(&format!(
            "container {} created: pid {} in {} ms",
            req.get_ref().container_id,
            created.pid,
            started.elapsed().as_millis()
        ));
        Ok(Response::new(created))
    }

    async fn start_container(
        &self,
        req: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        self.containers()?
            .start(&req.get_ref().container_id)
            .await?;
        Ok(Response::new(pb::StartContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::RemoveContainerResponse>, Status> {
        let removed = self
            .containers()?
            .remove(&req.get_ref().container_id)
            .await?;
        Ok(Response::new(pb::RemoveContainerResponse { removed }))
    }

    async fn update_container(
        &self,
        req: Request<pb::UpdateContainerRequest>,
    ) -> Result<Response<pb::UpdateContainerResponse>, Status> {
        let req = req.get_ref();
        self.containers()?
            .update(&req.container_id, &req.resources_json)?;
        Ok(Response::new(pb::UpdateContainerResponse {}))
    }

    async fn pause_container(
        &self,
        req: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::PauseContainerResponse>, Status> {
        self.containers()?
            .freeze(&req.get_ref().container_id, true)
            .await?;
        Ok(Response::new(pb::PauseContainerResponse {}))
    }

    async fn resume_container(
        &self,
        req: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::ResumeContainerResponse>, Status> {
        self.containers()?
            .freeze(&req.get_ref().container_id, false)
            .await?;
        Ok(Response::new(pb::ResumeContainerResponse {}))
    }

    async fn stats_container(
        &self,
        req: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::StatsContainerResponse>, Status> {
        Ok(Response::new(
            self.containers()?.stats(&req.get_ref().container_id)?,
        ))
    }

    async fn stats_sandbox(
        &self,
        req: Request<pb::StatsSandboxRequest>,
    ) -> Result<Response<pb::StatsSandboxResponse>, Status> {
        let ids = &req.get_ref().container_ids;
        if ids.len() > MAX_STATS_CONTAINERS {
            return Err(Status::invalid_argument(format!(
                "container_ids: {} ids, at most {MAX_STATS_CONTAINERS}",
                ids.len()
            )));
        }
        let manager = self.containers()?;
        let mut containers = Vec::with_capacity(ids.len());
        for id in ids {
            match manager.stats(id) {
                Ok(stats) => containers.push(pb::ContainerStats {
                    container_id: id.clone(),
                    stats: Some(stats),
                }),
                // Removed meanwhile: left out.
                Err(ContainerError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Response::new(pb::StatsSandboxResponse {
            containers,
            interfaces: crate::netdev::interfaces(std::path::Path::new("/proc")),
        }))
    }

    async fn list_processes(
        &self,
        req: Request<pb::ContainerRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let processes = self.containers()?.processes(&req.get_ref().container_id)?;
        Ok(Response::new(pb::ListProcessesResponse { processes }))
    }

    async fn exec_process(
        &self,
        req: Request<pb::ExecProcessRequest>,
    ) -> Result<Response<pb::ExecProcessResponse>, Status> {
        let pid = self.containers()?.exec(req.get_ref()).await?;
        Ok(Response::new(pb::ExecProcessResponse { pid }))
    }

    async fn wait_process(
        &self,
        req: Request<pb::ProcessRequest>,
    ) -> Result<Response<pb::WaitProcessResponse>, Status> {
        let req = req.get_ref();
        let p = self
            .containers()?
            .process(&req.container_id, &req.exec_id)?;
        let ended = p
            .wait()
            .await
            .ok_or_else(|| Status::unavailable("the agent is shutting down"))?;
        Ok(Response::new(p.wait_response(ended)))
    }

    async fn signal_process(
        &self,
        req: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::SignalProcessResponse>, Status> {
        self.containers()?.signal(req.get_ref())?;
        Ok(Response::new(pb::SignalProcessResponse {}))
    }

    async fn read_output(
        &self,
        req: Request<pb::ReadOutputRequest>,
    ) -> Result<Response<Stream<pb::OutputChunk>>, Status> {
        let req = req.get_ref();
        let p = self
            .containers()?
            .process(&req.container_id, &req.exec_id)?;
        let (output, name) = match req.stream() {
            pb::OutputStream::Stdout => (&p.stdout, "stdout"),
            pb::OutputStream::Stderr => (&p.stderr, "stderr"),
            pb::OutputStream::Unspecified => {
                return Err(Status::invalid_argument("stream: must be STDOUT or STDERR"))
            }
        };
        let what = format!("{name} of {}/{}", req.container_id, req.exec_id);
        let rx = output.attach(&what)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let stream = tokio_stream::StreamExt::map(stream, |chunk| match chunk {
            Ok(data) => Ok(pb::OutputChunk { data }),
            Err(e) => Err(Status::internal(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write_stdin(
        &self,
        req: Request<pb::WriteStdinRequest>,
    ) -> Result<Response<pb::WriteStdinResponse>, Status> {
        let req = req.get_ref();
        if req.data.len() > 1 << 20 {
            return Err(Status::invalid_argument("data: at most 1 MiB per call"));
        }
        let p = self
            .containers()?
            .process(&req.container_id, &req.exec_id)?;
        let stdin = p
            .stdin()
            .ok_or_else(|| Status::failed_precondition("stdin is closed"))?;
        let written = stdin
            .write_all(&req.data)
            .await
            .map_err(|e| Status::internal(format!("writing stdin: {e}")))?;
        Ok(Response::new(pb::WriteStdinResponse {
            written: written as u32,
        }))
    }

    async fn close_stdin(
        &self,
        req: Request<pb::ProcessRequest>,
    ) -> Result<Response<pb::CloseStdinResponse>, Status> {
        let req = req.get_ref();
        self.containers()?
            .process(&req.container_id, &req.exec_id)?
            .close_stdin()
            .await;
        Ok(Response::new(pb::CloseStdinResponse {}))
    }

    async fn resize_tty(
        &self,
        req: Request<pb::ResizeTtyRequest>,
    ) -> Result<Response<pb::ResizeTtyResponse>, Status> {
        let req = req.get_ref();
        let (Ok(rows), Ok(cols)) = (u16::try_from(req.rows), u16::try_from(req.cols)) else {
            return Err(Status::invalid_argument("rows/cols: at most 65535"));
        };
        let p = self
            .containers()?
            .process(&req.container_id, &req.exec_id)?;
        let tty = p
            .tty
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("the process has no terminal"))?;
        crate::container::io::resize(tty, rows, cols)?;
        Ok(Response::new(pb::ResizeTtyResponse {}))
    }

    async fn get_events(
        &self,
        _: Request<pb::GetEventsRequest>,
    ) -> Result<Response<Stream<pb::Event>>, Status> {
        let events = self.containers()?.events.clone();
        let generation = events.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(event) = events.next(generation).await {
                match tx.reserve().await {
                    Ok(permit) => permit.send(Ok(event)),
                    Err(_) => {
                        events.unget(event);
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn update_interface(
        &self,
        req: Request<pb::UpdateInterfaceRequest>,
    ) -> Result<Response<pb::UpdateInterfaceResponse>, Status> {
        let interface = req
            .get_ref()
            .interface
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("interface: missing"))?;
        let (name, index) = self.network()?.update_interface(interface).await?;
        crate::log(&format!(
            "interface {name} ({}) configured",
            interface.hw_addr
        ));
        Ok(Response::new(pb::UpdateInterfaceResponse { name, index }))
    }

    async fn update_routes(
        &self,
        req: Request<pb::UpdateRoutesRequest>,
    ) -> Result<Response<pb::UpdateRoutesResponse>, Status> {
        self.network()?.update_routes(&req.get_ref().routes).await?;
        Ok(Response::new(pb::UpdateRoutesResponse {}))
    }

    async fn add_arp_neighbors(
        &self,
        req: Request<pb::AddArpNeighborsRequest>,
    ) -> Result<Response<pb::AddArpNeighborsResponse>, Status> {
        self.network()?
            .add_arp_neighbors(&req.get_ref().neighbors)
            .await?;
        Ok(Response::new(pb::AddArpNeighborsResponse {}))
    }
}

#[cfg(test)]
pub(crate) mod tests;

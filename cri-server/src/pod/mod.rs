//! The pod layer: what runs a pod's containers once the sandbox manager has decided to. A pod is one
//! [`Pod`]: a [`vm::VmPod`] (a microVM with the guest agent as PID 1) or a [`native::NativePod`] (the
//! same agent as a process of the node, for pods that share the node's namespaces). The manager above keeps records, locks, CRI rules and rollback;
//! everything that talks to a VM, a guest agent, a network namespace or a pod's files is here.
//!
//! | module | concern |
//! |---|---|
//! | [`vm`] | a VM pod: boot (cgroups, agent wait), image slots, stop, exit watch |
//! | [`native`] | a native pod: its agent on the node, in the pod's namespaces; crash sweep |
//! | [`net`] | a pod's network: CNI attachment, tap and tc, the guest interface |
//! | [`process`] | the one path that runs a process in a container (ExecSync, exec, attach) |
//! | [`container`] | what lives while the daemon runs: a container's exit, log and attach output |
//! | [`files`] | CRI mounts delivered into the pod |
//!
//! Errors are [`PodError`], with their sources; gRPC codes are chosen at the CRI boundary only.

pub mod container;
pub mod files;
pub mod native;
pub mod net;
pub mod process;
pub mod vm;

use pb::AgentClient;
use podvisor_proto as pb;
use tonic::transport::Channel;

use crate::cgroups::CgroupError;
use crate::network::NetworkError;

/// Errors of the pod layer, each with its source.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The VMM could not boot the pod VM.
    #[error("booting the pod VM: {0}")]
    Boot(#[source] vmm::Error),
    /// The VM booted but its agent never answered.
    #[error("the guest agent did not come up: {source}; console tail:\n{console}")]
    AgentStart {
        /// The last connection attempt's failure.
        source: pb::client::ConnectError,
        /// The end of the guest's console log.
        console: String,
    },
    /// The VM stopped before its agent answered.
    #[error("the pod VM stopped while booting: {reason}; console tail:\n{console}")]
    BootExit {
        /// Why the VM ended.
        reason: vmm::ExitReason,
        /// The end of the guest's console log.
        console: String,
    },
    /// The VMM refused an operation on the running VM (an image slot change).
    #[error("pod VM {op}: {source}")]
    Vm {
        /// The operation.
        op: &'static str,
        /// The VMM's error.
        source: vmm::Error,
    },
    /// A native pod's agent did not start or never answered.
    #[error("the native pod's agent did not come up: {why}; agent log tail:\n{log}")]
    NativeStart {
        /// What failed.
        why: String,
        /// The end of the agent's log.
        log: String,
    },
    /// What a native pod left on the node could not be removed.
    #[error("cleaning up native pod {}: {why}", dir.display())]
    NativeSweep {
        /// The pod's directory.
        dir: std::path::PathBuf,
        /// What failed.
        why: String,
    },
    /// The pod VM is stopped: nothing can run in it any more.
    #[error("the pod VM is stopped")]
    Stopped,
    /// The guest agent answered an error or could not be reached.
    #[error("guest agent {call}: {status}")]
    Agent {
        /// The agent RPC.
        call: &'static str,
        /// Its status.
        status: tonic::Status,
    },
    /// The pod's network: a CNI plugin, the namespace, the tap or tc.
    #[error("pod network: {0}")]
    Network(#[from] NetworkError),
    /// The VM's tap could not be created in the pod's namespace.
    #[error("pod network: tap: {0}")]
    Tap(#[source] vmm::TapError),
    /// A host cgroup of the pod.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// A process of the container did not exit after SIGKILL.
    #[error("container {container} did not exit within {waited:?} of SIGKILL")]
    KillTimeout {
        /// The container.
        container: String,
        /// How long it was given.
        waited: std::time::Duration,
    },
    /// A CRI mount's host path cannot be read; `field` names the mount.
    #[error("{field}.host_path: {}: {source}", path.display())]
    MountSource {
        /// The request field (`config.mounts[2]`).
        field: String,
        /// The host path.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A CRI mount has more content than a pod takes by copy.
    #[error("{field}.host_path: more than {limit} bytes to copy into the pod VM")]
    MountTooBig {
        /// The request field.
        field: String,
        /// The limit, bytes.
        limit: u64,
    },
    /// The guest's port forwarder refused or failed.
    #[error("port forward to port {port}: {why}")]
    PortForward {
        /// The pod port.
        port: u16,
        /// The forwarder's answer or the transport error.
        why: String,
    },
    /// A background task of the pod layer died.
    #[error("{what} task: {source}")]
    Task {
        /// What the task did.
        what: &'static str,
        /// How it ended.
        source: tokio::task::JoinError,
    },
}

impl PodError {
    /// The agent's status when the agent answered this error, for callers that apply CRI rules to
    /// it (a refused request field is the client's error).
    pub fn agent_status(&self) -> Option<&tonic::Status> {
        match self {
            PodError::Agent { status, .. } => Some(status),
            _ => None,
        }
    }
}

/// Locks `m`, taking over a lock poisoned by a panicked holder (the data stays usable).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Maps an agent error to a [`PodError`] tagged with the call.
pub(crate) fn agent_err(call: &'static str) -> impl FnOnce(tonic::Status) -> PodError {
    move |status| PodError::Agent { call, status }
}

/// Runs blocking host work off the async threads; `what` names it if the task dies.
pub(crate) async fn blocking<T: Send + 'static, E: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, PodError>
where
    PodError: From<E>,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| PodError::Task { what, source })?
        .map_err(PodError::from)
}

/// What runs a pod, decided at RunPodSandbox and kept in its record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PodKind {
    /// A microVM with the guest agent as PID 1 (the default).
    #[default]
    Vm,
    /// On the node, with the pod's agent as a process of the node: pods that share the node's
    /// network, PID or IPC namespace, and pods of the `native` runtime handler. No VM boundary.
    Native,
}

/// An image made available to a pod's containers: a read-only block image the pod mounts as its
/// storage `storage_id`.
#[derive(Clone, Debug)]
pub struct ImageDisk {
    /// The block image on the host.
    pub path: std::path::PathBuf,
    /// Its file system type (`ext4`, `erofs`).
    pub fstype: String,
    /// The storage id the containers' specs refer to.
    pub storage_id: String,
}

/// A container to create in a pod.
#[derive(Clone, Debug)]
pub struct NewContainer {
    /// The container id.
    pub id: String,
    /// The OCI runtime spec (JSON).
    pub oci_spec_json: Vec<u8>,
    /// The image storage its rootfs comes from.
    pub image_storage_id: String,
    /// Size cap of its writable layer, bytes.
    pub writable_layer_bytes: u64,
    /// A `user[:group]` to resolve against the image (empty: the spec's user is final).
    pub user: String,
}

/// The user a created container's processes run as, as the pod resolved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplemental groups.
    pub additional_gids: Vec<u32>,
}

/// One pod, whatever runs it. Container operations are provided on top of [`Pod::agent`], the guest
/// agent's API (`proto/agent.proto`); a pod kind without an agent overrides them.
#[async_trait::async_trait]
pub trait Pod: Send + Sync {
    /// The client of the agent that creates and runs this pod's containers (cheap to clone).
    fn agent(&self) -> AgentClient<Channel>;

    /// Stops everything the pod runs (idempotent); returns why it ended, if it was running.
    async fn stop(&self) -> Option<String>;

    /// Whether the host is stopping (or has stopped) the pod: calls failing now are expected.
    fn stopping(&self) -> bool;

    /// Waits until the pod ends by itself; None when the host stopped it.
    async fn wait_unexpected_exit(&self) -> Option<String>;

    /// Makes `image` available to containers as `slot` (mounted by the agent as its storage id).
    async fn add_image(&self, slot: u32, image: &ImageDisk) -> Result<(), PodError>;

    /// Unmounts storage `storage_id` and frees `slot`. Steps that find nothing to undo succeed.
    async fn remove_image(&self, slot: u32, storage_id: &str) -> Result<(), PodError>;

    /// Connects to `port` in the pod's network namespace.
    async fn port_forward(&self, port: u16) -> Result<process::PortStream, PodError>;

    /// Creates a container (not started); returns the user its processes run as.
    async fn create_container(&self, c: NewContainer) -> Result<ResolvedUser, PodError> {
        let created = self
            .agent()
            .create_container(pb::CreateContainerRequest {
                container_id: c.id,
                oci_spec_json: c.oci_spec_json,
                image_storage_id: c.image_storage_id,
                writable_layer_bytes: c.writable_layer_bytes,
                user: c.user,
            })
            .await
            .map_err(agent_err("CreateContainer"))?
            .into_inner();
        Ok(ResolvedUser {
            uid: created.uid,
            gid: created.gid,
            additional_gids: created.additional_gids,
        })
    }

    /// Starts a created container's process; without `stdin` it reads EOF.
    async fn start_container(&self, id: &str, stdin: bool) -> Result<(), PodError> {
        let mut agent = self.agent();
        agent
            .start_container(container_request(id))
            .await
            .map_err(agent_err("StartContainer"))?;
        if !stdin {
            // As from /dev/null with other runtimes.
            let _ = agent
                .close_stdin(process::ProcessRef::main(id).request())
                .await;
        }
        Ok(())
    }

    /// Removes a container, killing what is left of it.
    async fn remove_container(&self, id: &str) -> Result<(), PodError> {
        self.agent()
            .remove_container(container_request(id))
            .await
            .map_err(agent_err("RemoveContainer"))?;
        Ok(())
    }

    /// Applies new resource limits (OCI `linux.resources`, JSON) to a container.
    async fn update_container(&self, id: &str, resources_json: Vec<u8>) -> Result<(), PodError> {
        self.agent()
            .update_container(pb::UpdateContainerRequest {
                container_id: id.into(),
                resources_json,
            })
            .await
            .map_err(agent_err("UpdateContainer"))?;
        Ok(())
    }

    /// Usage of one container.
    async fn container_stats(&self, id: &str) -> Result<pb::StatsContainerResponse, PodError> {
        Ok(self
            .agent()
            .stats_container(container_request(id))
            .await
            .map_err(agent_err("StatsContainer"))?
            .into_inner())
    }

    /// Usage of containers `ids` and of the pod's network interfaces.
    async fn sandbox_stats(&self, ids: Vec<String>) -> Result<pb::StatsSandboxResponse, PodError> {
        Ok(self
            .agent()
            .stats_sandbox(pb::StatsSandboxRequest { container_ids: ids })
            .await
            .map_err(agent_err("StatsSandbox"))?
            .into_inner())
    }
}

/// Unmounts storage `id` in the pod's agent; one it does not know is already gone.
pub(crate) async fn remove_storage(
    mut agent: AgentClient<Channel>,
    id: &str,
) -> Result<(), PodError> {
    match agent
        .remove_storage(pb::RemoveStorageRequest { id: id.into() })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(agent_err("RemoveStorage")(s)),
    }
}

fn container_request(id: &str) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: id.into(),
    }
}

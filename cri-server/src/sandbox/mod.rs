//! The sandbox manager: every pod is a microVM with the guest agent as PID 1, every container runs in
//! its pod's VM from an image block device hot-attached to a free slot.
//!
//! Data flows one way: the CRI layer (`runtime`) calls the manager; the manager writes its intent to the
//! state store, then acts through the image service, the VMM and the agent client, then writes the
//! result. Operations on one pod are serialized by a per-pod lock; different pods proceed in parallel.
//! Nothing here knows about gRPC status codes: errors are [`SandboxError`] and `runtime` maps them.

mod containers;
mod exec;
mod pods;
mod release;
mod size;
mod stream;
pub mod validate;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use image_service::{ImageError, ImageService};
use tokio::sync::broadcast;

pub use stream::backend;

use crate::cgroups::{CgroupConfig, CgroupError};
use crate::network::{Network, NetworkConfig, NetworkError};
use crate::pod::container::LiveContainer;
use crate::pod::vm::GuestConfig;
use crate::pod::{lock, Pod, PodError};
use crate::spec::SpecError;
use crate::state::{StateError, StateStore};
use crate::text::echo;

/// Errors of the sandbox manager, by the class the CRI layer reports them as.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A request field is missing or invalid; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such pod, container or image.
    #[error("{0}")]
    NotFound(String),
    /// The name is already reserved.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A requested feature is not supported by podvisor.
    #[error("{0}")]
    Unimplemented(String),
    /// A deadline (ExecSync timeout) passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A fixed resource (image slots) is used up.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The image service failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The OCI spec could not be built from a valid request.
    #[error(transparent)]
    Spec(SpecError),
    /// A container's CRI log file could not be reopened.
    #[error("container {container} log: {source}")]
    Log {
        /// The container.
        container: String,
        /// The error.
        source: crate::logs::LogError,
    },
    /// The pod (its VM, agent, network, cgroups or files) failed.
    #[error(transparent)]
    Pod(PodError),
    /// A host file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The pod layer's errors, by the CRI class of their cause: what the client can fix is reported as its
/// own (bad field, missing file, too big), the rest as the pod's failure.
impl From<PodError> for SandboxError {
    fn from(e: PodError) -> Self {
        match e {
            PodError::Network(NetworkError::InvalidArgument(m)) => SandboxError::InvalidArgument(m),
            PodError::Network(NetworkError::NotConfigured(m)) => {
                SandboxError::FailedPrecondition(format!("pod network is not ready: {m}"))
            }
            e @ PodError::Cgroup(CgroupError::InvalidParent { .. }) => {
                SandboxError::InvalidArgument(e.to_string())
            }
            e @ PodError::MountSource { .. } => SandboxError::FailedPrecondition(e.to_string()),
            e @ PodError::MountTooBig { .. } => SandboxError::ResourceExhausted(e.to_string()),
            e @ PodError::Stopped => SandboxError::FailedPrecondition(e.to_string()),
            e => SandboxError::Pod(e),
        }
    }
}

impl From<NetworkError> for SandboxError {
    fn from(e: NetworkError) -> Self {
        PodError::Network(e).into()
    }
}

impl From<CgroupError> for SandboxError {
    fn from(e: CgroupError) -> Self {
        PodError::Cgroup(e).into()
    }
}

/// An id resolved for an idempotent operation (stop, remove): None when it names nothing, which CRI
/// answers with success (kubelet retries these after restarts), as containerd does.
fn known(
    resolved: Result<String, SandboxError>,
    rpc: &str,
) -> Result<Option<String>, SandboxError> {
    match resolved {
        Ok(id) => Ok(Some(id)),
        Err(SandboxError::NotFound(m)) => {
            tracing::info!("{rpc} of something unknown succeeds: {m}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Settings of the manager.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// The guest every VM pod boots.
    pub guest: GuestConfig,
    /// Per-pod directories (console log): `<state dir>/pods`.
    pub pods_dir: PathBuf,
    /// Runtime files (the VMs' vsock sockets, `<run dir>/vm/<pod id>.vsock`): short paths, as unix
    /// socket paths are limited to 108 bytes.
    pub run_dir: PathBuf,
    /// Guest memory of a pod without memory limits, MiB.
    pub default_mem_mib: u32,
    /// Guest memory added to a pod's limits for the guest kernel and agent, MiB.
    pub guest_overhead_mib: u32,
    /// Size cap of each container's writable layer (tmpfs in the guest), bytes.
    pub writable_layer_bytes: u64,
    /// Pod networking (CNI configuration, plugins, namespaces).
    pub network: NetworkConfig,
    /// Host cgroups of the pod VMs' threads.
    pub cgroups: CgroupConfig,
    /// Native pods (pods that share the node's namespaces, the `native` handler).
    pub native: crate::pod::native::NativeConfig,
}

/// What a CRI container event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Created.
    Created,
    /// Started.
    Started,
    /// Exited.
    Stopped,
    /// Removed.
    Deleted,
}

/// A container lifecycle event (CRI GetContainerEvents).
#[derive(Clone, Debug)]
pub struct ContainerEvent {
    /// The container.
    pub container_id: String,
    /// Its pod.
    pub pod_id: String,
    /// What happened.
    pub kind: EventKind,
    /// When, ns since the epoch.
    pub at: i64,
}

/// The sandbox manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

struct Inner {
    config: ManagerConfig,
    store: StateStore,
    images: ImageService,
    network: Network,
    pods: Mutex<HashMap<String, Arc<dyn Pod>>>,
    containers: Mutex<HashMap<String, Arc<LiveContainer>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    events: broadcast::Sender<ContainerEvent>,
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// `N` bytes from the kernel's random source.
fn random_bytes<const N: usize>() -> Result<[u8; N], SandboxError> {
    let mut bytes = [0u8; N];
    let path = PathBuf::from("/dev/urandom");
    std::fs::File::open(&path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|source| SandboxError::Io { path, source })?;
    Ok(bytes)
}

/// A new random 64-hex-digit id.
pub fn new_id() -> Result<String, SandboxError> {
    let bytes = random_bytes::<32>()?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Manager {
    /// A manager over `store` and `images`. Call [`Manager::reconcile`] once before serving.
    pub fn new(config: ManagerConfig, store: StateStore, images: ImageService) -> Manager {
        let (events, _) = broadcast::channel(1024);
        Manager {
            inner: Arc::new(Inner {
                network: Network::new(config.network.clone()),
                config,
                store,
                images,
                pods: Mutex::default(),
                containers: Mutex::default(),
                locks: Mutex::default(),
                events,
            }),
        }
    }

    /// The state store.
    pub fn store(&self) -> &StateStore {
        &self.inner.store
    }

    /// Whether native pods (the `native` handler, pods sharing node namespaces) are allowed.
    pub fn native_pods(&self) -> bool {
        self.inner.config.native.enabled
    }

    fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    fn network(&self) -> &Network {
        &self.inner.network
    }

    fn images(&self) -> &ImageService {
        &self.inner.images
    }

    /// The stored image `id` (None if it is gone or unreadable).
    pub fn image_record(&self, id: &str) -> Option<image_service::ImageRecord> {
        self.inner.images.status(id).ok().flatten()
    }

    /// The pod network's name when its CNI configuration and plugins are usable (CRI NetworkReady).
    pub fn network_status(&self) -> Result<String, NetworkError> {
        self.inner.network.status()
    }

    /// Subscribes to container lifecycle events.
    pub fn subscribe(&self) -> broadcast::Receiver<ContainerEvent> {
        self.inner.events.subscribe()
    }

    fn emit(&self, container_id: &str, pod_id: &str, kind: EventKind) {
        let _ = self.inner.events.send(ContainerEvent {
            container_id: container_id.into(),
            pod_id: pod_id.into(),
            kind,
            at: now_ns(),
        });
    }

    /// The lock serializing operations on pod `id`.
    fn pod_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.locks)
            .entry(id.into())
            .or_default()
            .clone()
    }

    /// Drops pod `id`'s lock from the map if only `held` (the caller's) and the map refer to it, so a
    /// task still waiting on it never ends up with a different lock than a later caller.
    fn forget_lock(&self, id: &str, held: &Arc<tokio::sync::Mutex<()>>) {
        let mut locks = lock(&self.inner.locks);
        if locks
            .get(id)
            .is_some_and(|l| Arc::ptr_eq(l, held) && Arc::strong_count(l) == 2)
        {
            locks.remove(id);
        }
    }

    fn live_pod(&self, id: &str) -> Option<Arc<dyn Pod>> {
        lock(&self.inner.pods).get(id).cloned()
    }

    fn live_container(&self, id: &str) -> Option<Arc<LiveContainer>> {
        lock(&self.inner.containers).get(id).cloned()
    }

    fn insert_live_pod(&self, id: &str, pod: Arc<dyn Pod>) {
        lock(&self.inner.pods).insert(id.into(), pod);
    }

    fn take_live_pod(&self, id: &str) -> Option<Arc<dyn Pod>> {
        lock(&self.inner.pods).remove(id)
    }

    fn insert_live_container(&self, id: &str, c: Arc<LiveContainer>) {
        lock(&self.inner.containers).insert(id.into(), c);
    }

    fn take_live_container(&self, id: &str) -> Option<Arc<LiveContainer>> {
        lock(&self.inner.containers).remove(id)
    }

    /// Resolves a full pod id or a unique prefix; `field` names the request field for errors.
    pub fn resolve_pod(&self, field: &str, id: &str) -> Result<String, SandboxError> {
        if id.is_empty() {
            return Err(SandboxError::InvalidArgument(format!("{field}: empty")));
        }
        let pods = self.inner.store.pods()?;
        crate::state::resolve_prefix(pods.iter().map(|p| p.id.as_str()), id).ok_or_else(|| {
            SandboxError::NotFound(format!("{field}: pod sandbox {} not found", echo(id)))
        })
    }

    /// Resolves a full container id or a unique prefix; `field` names the request field for errors.
    pub fn resolve_container(&self, field: &str, id: &str) -> Result<String, SandboxError> {
        if id.is_empty() {
            return Err(SandboxError::InvalidArgument(format!("{field}: empty")));
        }
        let all = self.inner.store.containers()?;
        crate::state::resolve_prefix(all.iter().map(|c| c.id.as_str()), id).ok_or_else(|| {
            SandboxError::NotFound(format!("{field}: container {} not found", echo(id)))
        })
    }

    fn pod_dir(&self, id: &str) -> PathBuf {
        self.inner.config.pods_dir.join(id)
    }

    /// The directory of native pod `id`'s agent (`<run dir>/native/<id>`: its socket path must stay
    /// under 108 bytes).
    fn native_dir(&self, id: &str) -> PathBuf {
        self.inner.config.run_dir.join("native").join(id)
    }

    /// The host end of pod `id`'s vsock device.
    fn vsock_path(&self, id: &str) -> PathBuf {
        self.inner
            .config
            .run_dir
            .join("vm")
            .join(format!("{id}.vsock"))
    }
}

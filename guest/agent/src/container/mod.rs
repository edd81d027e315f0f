//! Containers in the guest: bundle and rootfs (image storage + overlay on a size-limited tmpfs), lifecycle
//! through the [`crate::engine`], processes, stdio, exits and OOM kills.

pub mod cgroup;
mod exec;
pub mod io;
pub mod process;
pub mod rootfs;
pub mod spec;
pub mod stats;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxResources, Process as OciProcess};
use podvisor_proto as pb;

use crate::engine::{EngineClient, EngineError, Request, Stdio as EngineStdio};
use crate::events::Events;
use crate::exits::Exits;
use crate::storage::StorageManager;
use cgroup::Cgroup;
use process::{Process, Watch};
use spec::PodContext;

/// Writable layer size when the request gives none.
pub const DEFAULT_WRITABLE_LAYER: u64 = 256 << 20;
/// Exited exec processes kept per container for WaitProcess/ReadOutput.
const EXITED_EXECS_KEPT: usize = 64;
/// How long RemoveContainer waits for the killed init to be reaped.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

/// Container errors; the service maps them to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// A request field is wrong; the message starts with the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container, exec or storage.
    #[error("{0}")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not possible in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// libcontainer failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A file operation of the agent failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A system call of the agent failed.
    #[error(transparent)]
    Sys(#[from] nix::Error),
    /// A spec or process the agent wrote could not be encoded (no `From`: decoding the host's JSON is
    /// an InvalidArgument naming the field).
    #[error(transparent)]
    Encode(serde_json::Error),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

/// Lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Created, entry point not run yet.
    Created,
    /// Started.
    Running,
    /// Frozen.
    Paused,
    /// Its init exited.
    Stopped,
}

/// One container.
pub struct Container {
    id: String,
    bundle: PathBuf,
    cgroup: Cgroup,
    /// The container's init process.
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    state: Arc<Mutex<State>>,
    own_pid_ns: bool,
    /// The container's process as created (user resolved): exec'd processes are derived from it.
    process: OciProcess,
    /// The container's seccomp profile, applied to exec'd processes too.
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    watch: Watch,
    ops: tokio::sync::Mutex<()>,
}

impl Container {
    /// Current state.
    pub fn state(&self) -> State {
        *self.state.lock().expect("state lock")
    }

    fn set_state(&self, s: State) {
        *self.state.lock().expect("state lock") = s;
    }
}

/// Guest directories the manager works in.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Bundles: `<containers>/<id>/{config.json,rootfs,layer}`.
    pub containers: PathBuf,
    /// libcontainer's state root.
    pub engine_state: PathBuf,
    /// Console sockets.
    pub tty: PathBuf,
    /// The cgroup2 mount of a guest; None on the node, whose hierarchy (v1 or v2) is detected.
    pub cgroup_root: Option<PathBuf>,
    /// The cgroup containers are created under (`<parent>/<id>`).
    pub cgroup_parent: String,
    /// procfs.
    pub proc: PathBuf,
}

impl Paths {
    /// The real guest layout under /run/podvisor.
    pub fn system() -> Self {
        Self {
            containers: "/run/podvisor/containers".into(),
            engine_state: "/run/podvisor/engine".into(),
            tty: "/run/podvisor/tty".into(),
            cgroup_root: Some(cgroup::CGROUP_ROOT.into()),
            cgroup_parent: "/podvisor".into(),
            proc: "/proc".into(),
        }
    }

    /// The layout of a native pod's agent on the node: everything under `root`, containers' cgroups
    /// under `cgroup_parent` in the node's hierarchy.
    pub fn node(root: &Path, cgroup_parent: &str) -> Self {
        Self {
            containers: root.join("containers"),
            engine_state: root.join("engine"),
            tty: root.join("tty"),
            cgroup_root: None,
            cgroup_parent: cgroup_parent.trim_end_matches('/').to_string(),
            proc: "/proc".into(),
        }
    }
}

/// Checks a container or exec id: 1-64 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_id(field: &str, id: &str) -> Result<(), ContainerError> {
    crate::storage::validate_id(id).map_err(|_| {
        ContainerError::InvalidArgument(format!(
            "{field}: {id:?} must be 1-64 characters of [A-Za-z0-9._-], not . or .."
        ))
    })
}

/// All containers of the pod.
pub struct ContainerManager {
    engine: Arc<EngineClient>,
    exits: Arc<Exits>,
    storage: Arc<StorageManager>,
    /// Exit and OOM events.
    pub events: Arc<Events>,
    paths: Paths,
    pod: Mutex<PodContext>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    create: tokio::sync::Mutex<()>,
    tty_seq: std::sync::atomic::AtomicU64,
}

impl ContainerManager {
    /// A manager using `engine`, with exits from `exits` and image storages from `storage`, for the pod
    /// `pod` (its namespaces are completed by CreateSandbox).
    pub fn new(
        engine: Arc<EngineClient>,
        exits: Arc<Exits>,
        storage: Arc<StorageManager>,
        paths: Paths,
        pod: PodContext,
    ) -> Self {
        Self {
            engine,
            exits,
            storage,
            events: Arc::new(Events::default()),
            paths,
            pod: Mutex::new(pod),
            containers: Mutex::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
            tty_seq: 0.into(),
        }
    }

    /// Sets the pod PID namespace containers join (None: one per container), or that they stay in the
    /// node's (`host_pid`, native pods).
    pub fn set_pid_namespace(&self, ns: Option<PathBuf>, host_pid: bool) {
        let mut pod = self.pod.lock().expect("pod lock");
        pod.pid_namespace = ns;
        pod.host_pid = host_pid;
    }

    /// Sets whether containers created from now on are told to avoid AVX
    /// (`CreateSandboxRequest::avoid_avx`, see [`PodContext::avoid_avx`]).
    pub fn set_avoid_avx(&self, avoid_avx: bool) {
        self.pod.lock().expect("pod lock").avoid_avx = avoid_avx;
    }

    /// The container `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        validate_id("container_id", id)?;
        self.containers
            .lock()
            .expect("containers lock")
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?} not found")))
    }

    /// Ids of all containers.
    pub fn ids(&self) -> Vec<String> {
        self.containers
            .lock()
            .expect("containers lock")
            .keys()
            .cloned()
            .collect()
    }

    /// A process: the init when `exec_id` is empty.
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let found = c.execs.lock().expect("execs lock").get(exec_id).cloned();
        found.ok_or_else(|| {
            ContainerError::NotFound(format!("exec {exec_id:?} not found in container {id:?}"))
        })
    }

    /// Prepares stdio for `terminal`: pipes, or a console socket whose pty master arrives later.
    fn stdio(
        &self,
        terminal: bool,
    ) -> Result<
        (
            EngineStdio,
            io::Stdio,
            Vec<std::os::fd::OwnedFd>,
            Option<io::ConsoleWait>,
        ),
        ContainerError,
    > {
        if terminal {
            std::fs::create_dir_all(&self.paths.tty)?;
            let n = self
                .tty_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = self.paths.tty.join(format!("{n}.sock"));
            let wait = io::console_listener(&path)?;
            // Placeholder stdio until the master arrives.
            let placeholder = io::Stdio {
                stdin: None,
                stdout: Arc::default(),
                stderr: Arc::default(),
                tty: None,
            };
            Ok((
                EngineStdio::Console(path.clone()),
                placeholder,
                Vec::new(),
                Some(io::ConsoleWait { path, wait }),
            ))
        } else {
            let (stdio, child) = io::pipes()?;
            Ok((EngineStdio::Pipes, stdio, child.into(), None))
        }
    }

    /// CreateContainer.
    pub async fn create(
        &self,
        req: &pb::CreateContainerRequest,
    ) -> Result<pb::CreateContainerResponse, ContainerError> {
        validate_id("container_id", &req.container_id)?;
        let id = req.container_id.clone();
        let _serial = self.create.lock().await;
        if self
            .containers
            .lock()
            .expect("containers lock")
            .contains_key(&id)
        {
            return Err(ContainerError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        validate_id("image_storage_id", &req.image_storage_id)?;
        let image = self.storage.mounted(&req.image_storage_id).ok_or_else(|| {
            ContainerError::NotFound(format!(
                "image_storage_id: storage {:?} is not mounted",
                req.image_storage_id
            ))
        })?;
        let layer_bytes = match req.writable_layer_bytes {
            0 => DEFAULT_WRITABLE_LAYER,
            n if n < 1 << 20 => {
                return Err(ContainerError::InvalidArgument(format!(
                    "writable_layer_bytes: {n} is below the 1 MiB minimum"
                )))
            }
            n => n,
        };
        let bundle = self.paths.containers.join(&id);
        let result = self.create_in(req, &id, &bundle, &image, layer_bytes).await;
        if result.is_err() {
            let _ = self
                .engine
                .call(&Request::Delete { id: id.clone() }, &[])
                .await;
            rootfs::teardown(&bundle);
        }
        result
    }

    async fn create_in(
        &self,
        req: &pb::CreateContainerRequest,
        id: &str,
        bundle: &Path,
        image: &Path,
        layer_bytes: u64,
    ) -> Result<pb::CreateContainerResponse, ContainerError> {
        if bundle.exists() {
            // Left over from a failed remove: clean it first.
            rootfs::teardown(bundle);
        }
        let rootfs = rootfs::mount(bundle, image, layer_bytes)?;

        let cgroup_rel = format!("{}/{id}", self.paths.cgroup_parent);
        let pod = self.pod.lock().expect("pod lock").clone();
        let mut spec = spec::prepare(&req.oci_spec_json, &cgroup_rel, &pod)?;
        let own_pid_ns = pod.pid_namespace.is_none();
        {
            let process = spec.process_mut().as_mut().expect("checked by prepare");
            if !req.user.is_empty() {
                spec::apply_user(process, spec::resolve_user(&rootfs, &req.user)?);
            }
            spec::default_home(process, &rootfs);
        }
        let process = spec.process().clone().expect("checked by prepare");
        let identity = process.user().clone();
        let terminal = process.terminal().unwrap_or(false);
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let json = serde_json::to_vec_pretty(&spec).map_err(ContainerError::Encode)?;
        std::fs::write(bundle.join("config.json"), json)?;

        let cgroup = match &self.paths.cgroup_root {
            Some(root) => Cgroup::new(root, &cgroup_rel),
            None => Cgroup::host(&cgroup_rel)?,
        };
        let (engine_stdio, stdio, child_fds, console) = self.stdio(terminal)?;
        let raw: Vec<_> = child_fds.iter().map(|f| f.as_raw_fd()).collect();
        let since = Instant::now();
        let pid = self
            .engine
            .call(
                &Request::Create {
                    id: id.to_string(),
                    bundle: bundle.to_path_buf(),
                    stdio: engine_stdio,
                },
                &raw,
            )
            .await?
            .ok_or_else(|| ContainerError::Internal("the engine returned no pid".into()))?;
        drop(child_fds);
        let stdio = match console {
            Some(c) => c.finish().await?,
            None => stdio,
        };
        let oom_baseline = cgroup.oom_kills();
        let watch = Watch {
            container_id: id.to_string(),
            cgroup: cgroup.clone(),
            oom_baseline,
            events: self.events.clone(),
            oom_reported: Arc::new(Mutex::new(oom_baseline)),
        };
        let state = Arc::new(Mutex::new(State::Created));
        let on_exit = {
            let state = state.clone();
            move || *state.lock().expect("state lock") = State::Stopped
        };
        let exit = self.exits.claim(pid, since);
        let init = Process::track(pid, "", stdio, exit, watch.clone(), on_exit);
        tokio::spawn(process::monitor_oom(watch.clone(), Arc::downgrade(&init)));
        let container = Arc::new(Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            cgroup,
            init,
            execs: Mutex::new(HashMap::new()),
            state,
            own_pid_ns,
            process,
            seccomp,
            watch,
            ops: tokio::sync::Mutex::new(()),
        });
        self.containers
            .lock()
            .expect("containers lock")
            .insert(id.to_string(), container);
        Ok(pb::CreateContainerResponse {
            pid: pid as u32,
            uid: identity.uid(),
            gid: identity.gid(),
            additional_gids: identity.additional_gids().clone().unwrap_or_default(),
        })
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let _op = c.ops.lock().await;
        if c.state() != State::Created {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is {:?}, not created",
                c.state()
            )));
        }
        self.engine
            .call(&Request::Start { id: id.into() }, &[])
            .await?;
        if c.init.ended().is_none() {
            c.set_state(State::Running);
        }
        Ok(())
    }

    /// PauseContainer / ResumeContainer.
    pub async fn freeze(&self, id: &str, pause: bool) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let _op = c.ops.lock().await;
        let (from, to, request) = if pause {
            (
                State::Running,
                State::Paused,
                Request::Pause { id: id.into() },
            )
        } else {
            (
                State::Paused,
                State::Running,
                Request::Resume { id: id.into() },
            )
        };
        if c.state() != from {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is {:?}, not {from:?}",
                c.state()
            )));
        }
        self.engine.call(&request, &[]).await?;
        c.set_state(to);
        Ok(())
    }

    /// UpdateContainer.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| ContainerError::InvalidArgument(format!("resources_json: {e}")))?;
        c.cgroup.update(&resources)
    }

    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<pb::StatsContainerResponse, ContainerError> {
        let c = self.get(id)?;
        let roots = stats::Roots {
            proc: &self.paths.proc,
            sys: Path::new("/sys"),
        };
        stats::read(&c.cgroup, &c.bundle.join("layer"), roots)
    }

    /// ListProcesses.
    pub fn processes(&self, id: &str) -> Result<Vec<pb::ProcessInfo>, ContainerError> {
        let c = self.get(id)?;
        let mut list: Vec<_> = c
            .cgroup
            .pids()
            .into_iter()
            .filter_map(|pid| cgroup::process_info(&self.paths.proc, pid))
            .collect();
        list.sort_by_key(|p| p.pid);
        Ok(list)
    }

    /// RemoveContainer: kill everything, delete, unmount. False when the id was unknown.
    pub async fn remove(&self, id: &str) -> Result<bool, ContainerError> {
        let c = match self.get(id) {
            Ok(c) => c,
            Err(ContainerError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let _op = c.ops.lock().await;
        if c.state() == State::Paused {
            let _ = self
                .engine
                .call(&Request::Resume { id: id.into() }, &[])
                .await;
        }
        c.cgroup.kill_all();
        let deadline = Instant::now() + REMOVE_WAIT;
        if c.init.wait_until(deadline).await.is_none() {
            return Err(ContainerError::Internal(format!(
                "container {id:?}: init {} did not exit within {REMOVE_WAIT:?} of SIGKILL",
                c.init.pid
            )));
        }
        self.engine
            .call(&Request::Delete { id: id.into() }, &[])
            .await?;
        rootfs::teardown(&c.bundle);
        self.containers.lock().expect("containers lock").remove(id);
        Ok(true)
    }
}

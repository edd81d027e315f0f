//! A native pod: no VM. The pod's agent — the same `podvisor-agent` binary that is PID 1 of every pod
//! VM, with the same container engine (youki's libcontainer) — runs as a process of the node
//! (`podvisor-agent node`), started in the pod's namespaces: its network namespace with the CNI
//! attachment on the veth (or the node's for hostNetwork), new UTS and IPC namespaces unless the pod
//! shares the node's. Its containers run on the node in real cgroups under the pod's, from the same
//! read-only image files (loop devices), with the same API as in a VM, over a unix socket.
//!
//! The agent's stdin is a pipe from the daemon (its *lifeline*): when the daemon exits or is killed,
//! the agent removes every container and image mount and exits, so a native pod never outlives its
//! daemon; after a crash, [`sweep`] removes whatever the agent could not.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pb::AgentClient;
use podvisor_proto as pb;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::process::PortStream;
use super::{agent_err, lock, ImageDisk, Pod, PodError};
use crate::network::netns;

/// How long a stopped pod's agent has to remove its containers and exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sweep may take.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of the agent's log quoted in start errors.
const LOG_TAIL: usize = 2048;

/// How native pods are run.
#[derive(Clone, Debug)]
pub struct NativeConfig {
    /// Native pods are allowed on this node (`--host-pods native`).
    pub enabled: bool,
    /// The agent binary (`podvisor-agent`, installed with the guest files).
    pub agent: PathBuf,
    /// How long a starting agent has to answer.
    pub start_timeout: Duration,
}

/// What a native pod holds on the node until it is swept (kept in its records).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NativeRecord {
    /// The agent's directory.
    pub dir: PathBuf,
    /// The cgroup its containers are created under.
    pub cgroup_parent: String,
}

/// What one native pod is made of.
pub struct NativeShape {
    /// The agent's directory: socket, bundles, image mounts, pod files.
    pub dir: PathBuf,
    /// The agent's log.
    pub log: PathBuf,
    /// The pod's network namespace; None on the node's network.
    pub netns: Option<PathBuf>,
    /// The node namespaces the pod shares.
    pub node: pb::NodeNamespaces,
    /// The cgroup its containers are created under.
    pub cgroup_parent: String,
}

/// A running native pod.
pub struct NativePod {
    agent: AgentClient<Channel>,
    /// Closing it tells the agent to remove the pod and exit.
    lifeline: Mutex<Option<ChildStdin>>,
    /// Kills the agent (SIGKILL) when sent to.
    kill: watch::Sender<bool>,
    exit: watch::Receiver<Option<String>>,
    stopping: AtomicBool,
    netns: Option<PathBuf>,
}

impl NativePod {
    /// Starts the pod's agent in its namespaces and waits until it serves.
    pub async fn start(config: &NativeConfig, shape: NativeShape) -> Result<NativePod, PodError> {
        // Root only: whoever reaches the agent's socket runs anything in the pod's containers.
        let private = std::fs::Permissions::from_mode(0o700);
        std::fs::create_dir_all(&shape.dir)
            .and_then(|()| std::fs::set_permissions(&shape.dir, private))
            .map_err(|source| PodError::NativeStart {
                why: format!("creating {}: {source}", shape.dir.display()),
                log: String::new(),
            })?;
        let log_path = shape.log.clone();
        let mut child = spawn(config, &shape, &log_path).map_err(|e| PodError::NativeStart {
            why: format!("starting {}: {e}", config.agent.display()),
            log: String::new(),
        })?;
        let lifeline = child.stdin.take();
        let (kill, exit) = watch_exit(child);
        let socket = shape.dir.join("agent.sock");
        let mut exited = exit.clone();
        let agent = tokio::select! {
            agent = pb::client::wait_for_node_agent(&socket, config.start_timeout) => {
                agent.map_err(|e| e.to_string())
            }
            _ = exited.wait_for(Option::is_some) => {
                Err(exit.borrow().clone().unwrap_or_default())
            }
        };
        let pod = NativePod {
            agent: match agent {
                Ok(agent) => agent,
                Err(why) => {
                    drop(lifeline);
                    let _ = kill.send(true);
                    // Gone before the caller sweeps its directory (it would write there again).
                    let _ =
                        tokio::time::timeout(STOP_TIMEOUT, exited.wait_for(Option::is_some)).await;
                    return Err(PodError::NativeStart {
                        why,
                        log: tail(&log_path),
                    });
                }
            },
            lifeline: Mutex::new(lifeline),
            kill,
            exit,
            stopping: AtomicBool::new(false),
            netns: shape.netns,
        };
        Ok(pod)
    }

    /// Gives the pod its identity (hostname, DNS, sysctls in its own namespaces).
    pub async fn set_up(&self, sandbox: pb::CreateSandboxRequest) -> Result<(), PodError> {
        self.agent()
            .create_sandbox(sandbox)
            .await
            .map_err(agent_err("CreateSandbox"))?;
        Ok(())
    }

    async fn wait_exit(&self) -> String {
        let mut exit = self.exit.clone();
        let ended = exit.wait_for(Option::is_some).await;
        ended
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "the pod's agent is gone".into())
    }
}

/// Starts `podvisor-agent node` for `shape`, its output appended to `log`.
fn spawn(config: &NativeConfig, shape: &NativeShape, log: &Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(&config.agent);
    cmd.arg("node")
        .arg("--root")
        .arg(&shape.dir)
        .arg("--cgroup-parent")
        .arg(&shape.cgroup_parent);
    if let Some(netns) = &shape.netns {
        cmd.arg("--netns").arg(netns);
    }
    if !shape.node.network {
        cmd.arg("--new-uts");
    }
    if !shape.node.ipc {
        cmd.arg("--new-ipc");
    }
    cmd.stdin(Stdio::piped())
        .stdout(out.try_clone()?)
        .stderr(out)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd.spawn()
}

/// Reaps the agent in the background: sending `true` on the first channel kills it, the second gets
/// why it ended.
fn watch_exit(mut child: Child) -> (watch::Sender<bool>, watch::Receiver<Option<String>>) {
    let (kill, mut killed) = watch::channel(false);
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = async { killed.wait_for(|k| *k).await.is_ok() } => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let why = match status {
            Ok(status) => format!("the pod's agent exited ({status})"),
            Err(e) => format!("waiting for the pod's agent: {e}"),
        };
        let _ = tx.send(Some(why));
    });
    (kill, rx)
}

fn tail(path: &Path) -> String {
    let log = std::fs::read(path).unwrap_or_default();
    let start = log.len().saturating_sub(LOG_TAIL);
    String::from_utf8_lossy(&log[start..]).into_owned()
}

#[async_trait::async_trait]
impl Pod for NativePod {
    fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }

    async fn stop(&self) -> Option<String> {
        let first = !self.stopping.swap(true, Ordering::SeqCst);
        // Closing the lifeline has the agent remove every container and mount, then exit.
        let lifeline = lock(&self.lifeline).take();
        drop(lifeline);
        let why = match tokio::time::timeout(STOP_TIMEOUT, self.wait_exit()).await {
            Ok(why) => why,
            Err(_) => {
                tracing::warn!(
                    "the pod's agent did not exit within {STOP_TIMEOUT:?} of its lifeline closing; \
                     killing it"
                );
                let _ = self.kill.send(true);
                self.wait_exit().await
            }
        };
        first.then_some(why)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    async fn wait_unexpected_exit(&self) -> Option<String> {
        let why = self.wait_exit().await;
        (!self.stopping()).then_some(why)
    }

    async fn add_image(&self, _slot: u32, image: &ImageDisk) -> Result<(), PodError> {
        self.agent()
            .add_storage(pb::AddStorageRequest {
                id: image.storage_id.clone(),
                block_slot: 0,
                fstype: image.fstype.clone(),
                read_only: true,
                mount_point: None,
                image_path: Some(image.path.display().to_string()),
                timeout_ms: 0,
            })
            .await
            .map_err(agent_err("AddStorage"))?;
        Ok(())
    }

    async fn remove_image(&self, _slot: u32, storage_id: &str) -> Result<(), PodError> {
        super::remove_storage(self.agent(), storage_id).await
    }

    async fn port_forward(&self, port: u16) -> Result<PortStream, PodError> {
        let failed = |why: String| PodError::PortForward { port, why };
        let connect = move || std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port));
        let stream = match &self.netns {
            Some(ns) => netns::run_in(ns, connect).await?,
            None => tokio::task::spawn_blocking(connect)
                .await
                .map_err(|source| PodError::Task {
                    what: "port forward",
                    source,
                })?,
        }
        .map_err(|e| failed(format!("connecting to 127.0.0.1:{port}: {e}")))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| failed(e.to_string()))?;
        let stream = tokio::net::TcpStream::from_std(stream).map_err(|e| failed(e.to_string()))?;
        Ok(Box::new(stream))
    }
}

/// Removes what a native pod left on the node when its agent could not (it was killed with the
/// daemon, or never got to): runs `podvisor-agent sweep`, which kills the processes left in the pod's
/// cgroups, unmounts its rootfs and image mounts (their loop devices clear themselves), removes the
/// cgroups and the directory. Succeeds when there is nothing left.
pub async fn sweep(agent: &Path, pod: &NativeRecord) -> Result<(), PodError> {
    let (dir, cgroup_parent) = (&pod.dir, &pod.cgroup_parent);
    if !dir.exists() {
        return Ok(());
    }
    let run = Command::new(agent)
        .arg("sweep")
        .arg("--root")
        .arg(dir)
        .arg("--cgroup-parent")
        .arg(cgroup_parent)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let failed = |why: String| PodError::NativeSweep {
        dir: dir.to_path_buf(),
        why,
    };
    let out = tokio::time::timeout(SWEEP_TIMEOUT, run)
        .await
        .map_err(|_| failed(format!("did not finish within {SWEEP_TIMEOUT:?}")))?
        .map_err(|e| failed(format!("running {}: {e}", agent.display())))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let start = stderr.len().saturating_sub(LOG_TAIL);
    Err(failed(format!(
        "{}: {}",
        out.status,
        stderr.get(start..).unwrap_or_default().trim()
    )))
}

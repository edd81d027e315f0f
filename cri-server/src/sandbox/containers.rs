//! Containers in a pod VM: create (image slot, OCI spec, log copiers), start (exit waiter), stop
//! (signal, grace period, kill), remove, exec, stats and resource updates.

use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1::{ContainerConfig, LinuxContainerResources, PodSandboxConfig};
use podvisor_proto as pb;
use prost::Message;

use super::live::{LiveContainer, LivePod};
use super::{agent_err, lock, now_ns, EventKind, Manager, SandboxError};
use crate::logs::LogWriter;
use crate::spec::SpecError;
use crate::state::{ContainerRecord, ContainerState, PodRecord};

/// How long a killed container has to be reported exited.
const KILL_WAIT: Duration = Duration::from_secs(60);
/// How long log copiers get to drain after an exit.
const LOG_DRAIN: Duration = Duration::from_secs(10);
/// Output ExecSync keeps per stream.
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;

impl From<SpecError> for SandboxError {
    fn from(e: SpecError) -> SandboxError {
        match e {
            SpecError::InvalidArgument(m) => SandboxError::InvalidArgument(m),
            SpecError::Unimplemented(m) => SandboxError::Unimplemented(m),
            SpecError::Internal(m) => SandboxError::Vm(format!("building the OCI spec: {m}")),
        }
    }
}

/// Output of an ExecSync.
#[derive(Debug, Default)]
pub struct ExecOutput {
    /// Standard output (capped at [`MAX_EXEC_OUTPUT`]).
    pub stdout: Vec<u8>,
    /// Standard error (capped likewise).
    pub stderr: Vec<u8>,
    /// Exit code (128 + signal for a signalled process).
    pub exit_code: i32,
}

fn container_name_key(
    config: &ContainerConfig,
    pod: &PodSandboxConfig,
) -> Result<String, SandboxError> {
    let name = config
        .metadata
        .as_ref()
        .map(|m| (m.name.as_str(), m.attempt))
        .filter(|(n, _)| !n.is_empty())
        .ok_or_else(|| SandboxError::InvalidArgument("config.metadata.name: empty".into()))?;
    let p = pod.metadata.clone().unwrap_or_default();
    Ok(format!(
        "{}_{}_{}_{}_{}",
        name.0, p.name, p.namespace, p.uid, name.1
    ))
}

impl Manager {
    /// CreateContainer: attaches the image to the pod VM (once per image), builds the OCI spec and has
    /// the agent create the container; its output goes to the CRI log file.
    pub async fn create_container(
        &self,
        pod_id: &str,
        config: ContainerConfig,
    ) -> Result<String, SandboxError> {
        let pod_id = self.resolve_pod("pod_sandbox_id", pod_id)?;
        let image_ref = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| SandboxError::InvalidArgument("config.image.image: empty".into()))?;
        let lock = self.pod_lock(&pod_id);
        let _guard = lock.lock().await;
        let (mut pod, live) = self.ready_pod(&pod_id)?;
        // The pod's stored config is authoritative (kubelet resends the same one with each request).
        let pod_config = pod.cri_config();
        let name_key = container_name_key(&config, &pod_config)?;
        let images = &self.inner.images;
        let image = images.status(&image_ref)?.ok_or_else(|| {
            SandboxError::NotFound(format!("config.image.image: image {image_ref:?} not found"))
        })?;
        let image_config = images.config_json(&image)?;
        let id = super::new_id()?;
        let built = crate::spec::container_spec(&id, &config, &pod_config, &image_config)?;
        if !built.mounts.is_empty() {
            return Err(SandboxError::Unimplemented(format!(
                "config.mounts: host paths ({}) cannot be shared into a pod VM yet",
                built.mounts[0].host_path.display()
            )));
        }
        let store = &self.inner.store;
        store
            .reserve_name(&name_key, &id)
            .map_err(|e| SandboxError::AlreadyExists(format!("container {e}")))?;
        let mut record = ContainerRecord {
            id: id.clone(),
            pod_id: pod_id.clone(),
            name_key,
            config: config.encode_to_vec(),
            image_id: image.id.to_string(),
            image_ref,
            spec_json: built.oci_spec_json.clone(),
            stop_signal: built.stop_signal,
            slot: u32::MAX,
            state: ContainerState::Creating,
            created_at: now_ns(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            resources: config
                .linux
                .as_ref()
                .and_then(|l| l.resources.as_ref())
                .map(|r| r.encode_to_vec())
                .unwrap_or_default(),
        };
        store.put_container(&record)?;
        let result = self
            .create_in_guest(&mut pod, &live, &mut record, &config, &built.user)
            .await;
        match result {
            Ok(()) => {
                self.emit(&id, &pod_id, EventKind::Created);
                Ok(id)
            }
            Err(e) => {
                tracing::warn!(container = %id, "CreateContainer failed: {e}");
                let _ = live
                    .agent()
                    .remove_container(pb::ContainerRequest {
                        container_id: id.clone(),
                    })
                    .await;
                if let Err(e2) = self.forget_container(&record).await {
                    tracing::error!(container = %id, "rolling back: {e2}");
                }
                Err(e)
            }
        }
    }

    async fn create_in_guest(
        &self,
        pod: &mut PodRecord,
        live: &Arc<LivePod>,
        record: &mut ContainerRecord,
        config: &ContainerConfig,
        user: &str,
    ) -> Result<(), SandboxError> {
        let images = &self.inner.images;
        let image = images.lease(&record.image_id, &record.id).await?;
        let storage_id = image.id.hex().to_string();
        let slot = match pod.slots.iter().find(|(_, i)| **i == record.image_id) {
            Some((slot, _)) => *slot,
            None => {
                let slot = (0..self.inner.config.image_slots)
                    .find(|s| !pod.slots.contains_key(s))
                    .ok_or_else(|| {
                        SandboxError::ResourceExhausted(format!(
                            "config.image: the pod already runs {} distinct images, the most a pod VM \
                             can attach",
                            self.inner.config.image_slots
                        ))
                    })?;
                pod.slots.insert(slot, record.image_id.clone());
                self.inner.store.put_pod(pod)?;
                let path = images.block_image_path(&image);
                live.with_vm(move |vm| vm.attach_block(slot as usize, &path, true))
                    .await?;
                live.agent()
                    .add_storage(pb::AddStorageRequest {
                        id: storage_id.clone(),
                        block_slot: slot,
                        fstype: image.fs_type.extension().into(),
                        read_only: true,
                        mount_point: None,
                        timeout_ms: pb::DEFAULT_STORAGE_TIMEOUT_MS,
                    })
                    .await
                    .map_err(agent_err("AddStorage"))?;
                slot
            }
        };
        record.slot = slot;
        self.inner.store.put_container(record)?;
        let log =
            match config.log_path.as_str() {
                "" => None,
                rel => {
                    let dir = PodSandboxConfig::decode(pod.config.as_slice())
                        .map(|p| p.log_directory)
                        .unwrap_or_default();
                    let path = std::path::Path::new(&dir).join(rel);
                    Some(LogWriter::open(&path).map_err(|e| {
                        SandboxError::InvalidArgument(format!("config.log_path: {e}"))
                    })?)
                }
            };
        let live_container = Arc::new(LiveContainer::new(log));
        lock(&self.inner.containers).insert(record.id.clone(), live_container.clone());
        live.agent()
            .create_container(pb::CreateContainerRequest {
                container_id: record.id.clone(),
                oci_spec_json: record.spec_json.clone(),
                image_storage_id: storage_id,
                writable_layer_bytes: self.inner.config.writable_layer_bytes,
                user: user.into(),
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                    SandboxError::InvalidArgument(format!("config: {}", status.message()))
                }
                _ => agent_err("CreateContainer")(status),
            })?;
        live_container.start_log_copiers(&live.agent(), &record.id, config.tty);
        record.state = ContainerState::Created;
        self.inner.store.put_container(record)?;
        Ok(())
    }

    /// The record, live pod and live container of a container whose pod runs.
    pub(super) async fn running_parts(
        &self,
        field: &str,
        id: &str,
    ) -> Result<(ContainerRecord, Arc<LivePod>, Arc<LiveContainer>), SandboxError> {
        let id = self.resolve_container(field, id)?;
        let record =
            self.inner.store.container(&id)?.ok_or_else(|| {
                SandboxError::NotFound(format!("{field}: container {id} not found"))
            })?;
        let (_, live) = self.ready_pod(&record.pod_id)?;
        let lc = self.live_container(&id).ok_or_else(|| {
            SandboxError::FailedPrecondition(format!("container {id} is not running"))
        })?;
        Ok((record, live, lc))
    }

    /// StartContainer: starts the init process and watches for its exit.
    pub async fn start_container(&self, id: &str) -> Result<(), SandboxError> {
        let (record, live, lc) = self.running_parts("container_id", id).await?;
        let lock = self.pod_lock(&record.pod_id);
        let _guard = lock.lock().await;
        // Re-read under the pod lock: a concurrent start or stop may have changed it.
        let mut record = self.inner.store.container(&record.id)?.ok_or_else(|| {
            SandboxError::NotFound(format!("container {} was removed", record.id))
        })?;
        if record.state != ContainerState::Created {
            return Err(SandboxError::FailedPrecondition(format!(
                "container {} is {:?}, not created",
                record.id, record.state
            )));
        }
        live.agent()
            .start_container(pb::ContainerRequest {
                container_id: record.id.clone(),
            })
            .await
            .map_err(agent_err("StartContainer"))?;
        record.state = ContainerState::Running;
        record.started_at = now_ns();
        self.inner.store.put_container(&record)?;
        if !record.cri_config().stdin {
            // Without `stdin` the process reads EOF, as from /dev/null with other runtimes.
            let _ = live
                .agent()
                .close_stdin(pb::ProcessRequest {
                    container_id: record.id.clone(),
                    exec_id: String::new(),
                })
                .await;
        }
        self.emit(&record.id, &record.pod_id, EventKind::Started);
        self.watch_exit(record.id.clone(), live, lc);
        Ok(())
    }

    /// Waits for the init process's exit in the guest and records it.
    fn watch_exit(&self, id: String, live: Arc<LivePod>, lc: Arc<LiveContainer>) {
        let me = self.clone();
        tokio::spawn(async move {
            let waited = live
                .agent()
                .wait_process(pb::ProcessRequest {
                    container_id: id.clone(),
                    exec_id: String::new(),
                })
                .await;
            let Ok(exit) = waited.map(|r| r.into_inner()) else {
                // The agent connection ended: the pod was stopped, which records the exit itself.
                return;
            };
            lc.drain_logs(LOG_DRAIN).await;
            let store = &me.inner.store;
            let Ok(Some(mut record)) = store.container(&id) else {
                return;
            };
            if record.state == ContainerState::Running {
                record.state = ContainerState::Exited;
                record.exit_code = exit.exit_code;
                record.finished_at = if exit.exited_unix_ns > 0 {
                    exit.exited_unix_ns as i64
                } else {
                    now_ns()
                };
                record.reason = if exit.oom_killed {
                    "OOMKilled"
                } else if exit.exit_code == 0 {
                    "Completed"
                } else {
                    "Error"
                }
                .into();
                if let Err(e) = store.put_container(&record) {
                    tracing::error!(container = %id, "recording the exit: {e}");
                }
                me.emit(&id, &record.pod_id, EventKind::Stopped);
            }
            lc.set_exited();
        });
    }

    /// StopContainer: the stop signal, `timeout` seconds of grace, then SIGKILL to every process of
    /// the container. Stopping a container that is not running succeeds.
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), SandboxError> {
        let id = self.resolve_container("container_id", id)?;
        let Some(record) = self.inner.store.container(&id)? else {
            return Ok(());
        };
        if record.state != ContainerState::Running {
            return Ok(());
        }
        let (_, live) = match self.ready_pod(&record.pod_id) {
            Ok(p) => p,
            Err(_) => return Ok(()),
        };
        let Some(lc) = self.live_container(&id) else {
            return Ok(());
        };
        let signal = |sig: i32, all: bool| {
            let mut agent = live.agent();
            let id = id.clone();
            async move {
                agent
                    .signal_process(pb::SignalProcessRequest {
                        container_id: id,
                        exec_id: String::new(),
                        signal: sig as u32,
                        all,
                    })
                    .await
            }
        };
        if timeout > 0 {
            if let Err(e) = signal(record.stop_signal, false).await {
                tracing::info!(container = %id, "stop signal: {e}");
            }
            if lc.wait_exited(Duration::from_secs(timeout as u64)).await {
                return Ok(());
            }
        }
        if let Err(e) = signal(libc_sigkill(), true).await {
            tracing::info!(container = %id, "SIGKILL: {e}");
        }
        if lc.wait_exited(KILL_WAIT).await {
            Ok(())
        } else {
            Err(SandboxError::Vm(format!(
                "container {id} did not exit within {KILL_WAIT:?} of SIGKILL"
            )))
        }
    }

    /// RemoveContainer: kills it if running, removes it from the guest, detaches its image when no
    /// other container of the pod uses it, releases its image lease and record. Unknown ids succeed.
    pub async fn remove_container(&self, id: &str) -> Result<(), SandboxError> {
        let id = match self.resolve_container("container_id", id) {
            Ok(id) => id,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.stop_container(&id, 0).await?;
        let Some(record) = self.inner.store.container(&id)? else {
            return Ok(());
        };
        let lock = self.pod_lock(&record.pod_id);
        let _guard = lock.lock().await;
        if let Ok((mut pod, live)) = self.ready_pod(&record.pod_id) {
            live.agent()
                .remove_container(pb::ContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .map_err(agent_err("RemoveContainer"))?;
            let others = self
                .inner
                .store
                .pod_containers(&pod.id)?
                .into_iter()
                .any(|c| c.id != id && c.slot == record.slot);
            if !others && pod.slots.contains_key(&record.slot) {
                let storage = record
                    .image_id
                    .rsplit(':')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                live.agent()
                    .remove_storage(pb::RemoveStorageRequest { id: storage })
                    .await
                    .map_err(agent_err("RemoveStorage"))?;
                let slot = record.slot as usize;
                live.with_vm(move |vm| vm.detach_block(slot)).await?;
                pod.slots.remove(&record.slot);
                self.inner.store.put_pod(&pod)?;
            }
        }
        self.forget_container(&record).await?;
        self.emit(&id, &record.pod_id, EventKind::Deleted);
        Ok(())
    }

    /// Drops a container's record, name, image lease and live state (the guest side is gone or
    /// handled by the caller).
    pub(super) async fn forget_container(
        &self,
        record: &ContainerRecord,
    ) -> Result<(), SandboxError> {
        if let Some(lc) = lock(&self.inner.containers).remove(&record.id) {
            lc.set_exited();
        }
        self.inner.images.release(&record.id).await?;
        let store = &self.inner.store;
        store.delete_container(&record.id)?;
        store.release_name(&record.name_key, &record.id)?;
        Ok(())
    }

    /// ExecSync: runs `cmd` in the container, collects its output, and kills it after `timeout`
    /// seconds (0: no timeout) answering DeadlineExceeded.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: i64,
    ) -> Result<ExecOutput, SandboxError> {
        if cmd.is_empty() {
            return Err(SandboxError::InvalidArgument("cmd: empty".into()));
        }
        if timeout < 0 {
            return Err(SandboxError::InvalidArgument(format!(
                "timeout: {timeout} is negative"
            )));
        }
        let (record, live, _) = self.running_parts("container_id", id).await?;
        if record.state != ContainerState::Running {
            return Err(SandboxError::FailedPrecondition(format!(
                "container {} is not running",
                record.id
            )));
        }
        let process = crate::spec::exec_process(&record.spec_json, cmd, false)?;
        let exec_id = super::new_id()?[..16].to_string();
        let mut agent = live.agent();
        agent
            .exec_process(pb::ExecProcessRequest {
                container_id: record.id.clone(),
                exec_id: exec_id.clone(),
                process_json: process,
            })
            .await
            .map_err(agent_err("ExecProcess"))?;
        // ExecSync has no stdin: the command reads EOF.
        let _ = agent
            .close_stdin(pb::ProcessRequest {
                container_id: record.id.clone(),
                exec_id: exec_id.clone(),
            })
            .await;
        let read = |stream: pb::OutputStream| {
            let mut agent = live.agent();
            let req = pb::ReadOutputRequest {
                container_id: record.id.clone(),
                exec_id: exec_id.clone(),
                stream: stream.into(),
            };
            tokio::spawn(async move {
                let mut out = Vec::new();
                if let Ok(resp) = agent.read_output(req).await {
                    let mut s = resp.into_inner();
                    while let Ok(Some(chunk)) = s.message().await {
                        let room = MAX_EXEC_OUTPUT.saturating_sub(out.len());
                        out.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
                    }
                }
                out
            })
        };
        let stdout = read(pb::OutputStream::Stdout);
        let stderr = read(pb::OutputStream::Stderr);
        let wait = agent.wait_process(pb::ProcessRequest {
            container_id: record.id.clone(),
            exec_id: exec_id.clone(),
        });
        let exit = if timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(timeout as u64), wait).await {
                Ok(r) => r,
                Err(_) => {
                    let _ = live
                        .agent()
                        .signal_process(pb::SignalProcessRequest {
                            container_id: record.id.clone(),
                            exec_id,
                            signal: libc_sigkill() as u32,
                            all: false,
                        })
                        .await;
                    stdout.abort();
                    stderr.abort();
                    return Err(SandboxError::DeadlineExceeded(format!(
                        "command {cmd:?} timed out after {timeout}s"
                    )));
                }
            }
        } else {
            wait.await
        }
        .map_err(agent_err("WaitProcess"))?
        .into_inner();
        Ok(ExecOutput {
            stdout: stdout.await.unwrap_or_default(),
            stderr: stderr.await.unwrap_or_default(),
            exit_code: exit.exit_code,
        })
    }

    /// Stats of a running container from its cgroup in the guest.
    pub async fn container_stats(
        &self,
        id: &str,
    ) -> Result<(ContainerRecord, Option<pb::StatsContainerResponse>), SandboxError> {
        let id = self.resolve_container("container_id", id)?;
        let record = self.inner.store.container(&id)?.ok_or_else(|| {
            SandboxError::NotFound(format!("container_id: container {id} not found"))
        })?;
        if !matches!(
            record.state,
            ContainerState::Running | ContainerState::Created
        ) {
            return Ok((record, None));
        }
        let Ok((_, live)) = self.ready_pod(&record.pod_id) else {
            return Ok((record, None));
        };
        let stats = live
            .agent()
            .stats_container(pb::ContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(agent_err("StatsContainer"))?
            .into_inner();
        Ok((record, Some(stats)))
    }

    /// UpdateContainerResources: applies new limits in the guest and records them.
    pub async fn update_resources(
        &self,
        id: &str,
        resources: LinuxContainerResources,
    ) -> Result<(), SandboxError> {
        let (mut record, live, _) = self.running_parts("container_id", id).await?;
        let oci = crate::spec::oci_resources(&resources)?;
        live.agent()
            .update_container(pb::UpdateContainerRequest {
                container_id: record.id.clone(),
                resources_json: serde_json::to_vec(&oci).expect("resources serialize"),
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::InvalidArgument => {
                    SandboxError::InvalidArgument(format!("linux: {}", status.message()))
                }
                _ => agent_err("UpdateContainer")(status),
            })?;
        record.resources = resources.encode_to_vec();
        self.inner.store.put_container(&record)?;
        Ok(())
    }

    /// ReopenContainerLog: the log file was rotated; write to a new file at the same path.
    pub async fn reopen_log(&self, id: &str) -> Result<(), SandboxError> {
        let (record, _, lc) = self.running_parts("container_id", id).await?;
        if record.state != ContainerState::Running {
            return Err(SandboxError::FailedPrecondition(format!(
                "container {} is not running",
                record.id
            )));
        }
        match &lc.log {
            Some(log) => log
                .reopen()
                .map_err(|e| SandboxError::Vm(format!("reopening the container log: {e}"))),
            None => Ok(()),
        }
    }
}

fn libc_sigkill() -> i32 {
    9
}

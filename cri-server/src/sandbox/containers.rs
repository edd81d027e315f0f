//! Containers in a pod VM: create (image slot, OCI spec, log copiers), start (exit waiter), stop
//! (signal, grace period, kill), remove, exec, stats and resource updates.

use std::sync::Arc;
use std::time::Duration;

use k8s_cri::v1::{ContainerConfig, LinuxContainerResources};
use podvisor_proto as pb;
use prost::Message;

use super::{now_ns, EventKind, Manager, SandboxError};
use crate::logs::LogWriter;
use crate::pod::container::LiveContainer;
use crate::pod::process::{Process, SIGKILL};
use crate::pod::{ImageDisk, NewContainer, Pod, PodError, PodKind};
use crate::spec::SpecError;
use crate::state::{ContainerRecord, ContainerState, PodRecord};
use crate::text::echo;

/// Distinct images a native pod may attach (loop devices on the node, no slots to boot with).
const NATIVE_IMAGES: u32 = 64;
/// How long a killed container has to be reported exited.
const KILL_WAIT: Duration = Duration::from_secs(60);
/// How long log copiers get to drain after an exit.
const LOG_DRAIN: Duration = Duration::from_secs(10);

impl From<SpecError> for SandboxError {
    fn from(e: SpecError) -> SandboxError {
        match e {
            SpecError::InvalidArgument(m) => SandboxError::InvalidArgument(m),
            SpecError::Unimplemented(m) => SandboxError::Unimplemented(m),
            SpecError::FailedPrecondition(m) => SandboxError::FailedPrecondition(m),
            e @ SpecError::Serialize(_) => SandboxError::Spec(e),
        }
    }
}

/// The container log file: `log_path` relative (no `..`) under the pod's absolute log directory.
fn log_file(log_directory: &str, log_path: &str) -> Result<std::path::PathBuf, SandboxError> {
    let dir = std::path::Path::new(log_directory);
    if !dir.is_absolute() {
        return Err(SandboxError::InvalidArgument(format!(
            "config.log_path: the pod's log_directory {} is not an absolute path",
            echo(log_directory)
        )));
    }
    let rel = std::path::Path::new(log_path);
    let escapes = rel
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)));
    if escapes {
        return Err(SandboxError::InvalidArgument(format!(
            "config.log_path: {} must be relative to the pod's log directory, without '..'",
            echo(log_path)
        )));
    }
    Ok(dir.join(rel))
}

/// A pod error, with a request the agent refused as invalid (`InvalidArgument`, or one of `also`)
/// reported as the client's error on `field`.
fn refused_field(e: PodError, field: &str, also: &[tonic::Code]) -> SandboxError {
    match e.agent_status() {
        Some(s) if s.code() == tonic::Code::InvalidArgument || also.contains(&s.code()) => {
            SandboxError::InvalidArgument(format!("{field}: {}", s.message()))
        }
        _ => e.into(),
    }
}

/// The record of container `id` being created in pod `pod_id` from `config` and `image` (its image
/// reference and log path are the caller's to set).
fn new_record(
    id: &str,
    pod_id: &str,
    name_key: String,
    config: &ContainerConfig,
    image: &image_service::ImageRecord,
    built: &crate::spec::BuiltSpec,
) -> ContainerRecord {
    let resources = config.linux.as_ref().and_then(|l| l.resources.as_ref());
    ContainerRecord {
        id: id.into(),
        pod_id: pod_id.into(),
        name_key,
        config: config.encode_to_vec(),
        image_id: image.id.to_string(),
        image_ref: String::new(),
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
        resources: resources.map(|r| r.encode_to_vec()).unwrap_or_default(),
        log_path: String::new(),
        user: None,
    }
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
        let name_key = super::validate::container_name_key(&config, &pod_config)?;
        let images = self.images();
        let image = images.status(&image_ref)?.ok_or_else(|| {
            SandboxError::NotFound(format!(
                "config.image.image: image {} not found",
                echo(&image_ref)
            ))
        })?;
        let image_config = images.config_json(&image)?;
        let id = super::new_id()?;
        let built = crate::spec::container_spec(&config, &pod_config, &image_config, pod.kind)?;
        // As containerd: no log file unless both the pod's directory and the container's path are set.
        let log_path = match (pod_config.log_directory.as_str(), config.log_path.as_str()) {
            ("", _) | (_, "") => None,
            (dir, rel) => Some(log_file(dir, rel)?),
        };
        let store = self.store();
        store
            .reserve_name(&name_key, &id)
            .map_err(|e| SandboxError::AlreadyExists(format!("container {e}")))?;
        let mut record = new_record(&id, &pod_id, name_key, &config, &image, &built);
        record.image_ref = image_ref;
        record.log_path = log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        store.put_container(&record)?;
        let result = self
            .create_in_guest(
                &mut pod,
                &live,
                &mut record,
                &config,
                &built,
                log_path.as_deref(),
            )
            .await;
        match result {
            Ok(()) => {
                self.emit(&id, &pod_id, EventKind::Created);
                Ok(id)
            }
            Err(e) => {
                tracing::warn!(container = %id, "CreateContainer failed: {e}");
                self.roll_back_create(&live, &record).await;
                Err(e)
            }
        }
    }

    /// Removes every trace of a container whose creation failed: in the guest, its record, name and
    /// image lease, and the image slot if no other container uses it. Call with the pod lock held.
    async fn roll_back_create(&self, live: &Arc<dyn Pod>, record: &ContainerRecord) {
        let id = &record.id;
        let _ = live.remove_container(id).await;
        if let Err(e) = self.forget_container(record).await {
            tracing::error!(container = %id, "rolling back: {e}");
        }
        if let Err(e) = self.prune_slots(&record.pod_id, live).await {
            tracing::error!(container = %id, "rolling back the image slot: {e}");
        }
    }

    async fn create_in_guest(
        &self,
        pod: &mut PodRecord,
        live: &Arc<dyn Pod>,
        record: &mut ContainerRecord,
        config: &ContainerConfig,
        built: &crate::spec::BuiltSpec,
        log_path: Option<&std::path::Path>,
    ) -> Result<(), SandboxError> {
        let images = self.images();
        let image = images.lease(&record.image_id, &record.id).await?;
        let storage_id = image.id.hex().to_string();
        let slot = match pod.slots.iter().find(|(_, i)| **i == record.image_id) {
            Some((slot, _)) => *slot,
            None => {
                let limit = match pod.kind {
                    PodKind::Vm => self.config().guest.image_slots,
                    PodKind::Native => NATIVE_IMAGES,
                };
                let slot = (0..limit)
                    .find(|s| !pod.slots.contains_key(s))
                    .ok_or_else(|| {
                        SandboxError::ResourceExhausted(format!(
                            "config.image: the pod already runs {limit} distinct images, the most \
                             a pod can attach",
                        ))
                    })?;
                pod.slots.insert(slot, record.image_id.clone());
                self.store().put_pod(pod)?;
                let disk = ImageDisk {
                    path: images.block_image_path(&image),
                    fstype: image.fs_type.extension().into(),
                    storage_id: storage_id.clone(),
                };
                live.add_image(slot, &disk).await?;
                slot
            }
        };
        record.slot = slot;
        self.store().put_container(record)?;
        let log = match log_path {
            None => None,
            Some(path) => Some(
                LogWriter::open(path)
                    .map_err(|e| SandboxError::InvalidArgument(format!("config.log_path: {e}")))?,
            ),
        };
        crate::pod::files::copy_mounts(&**live, &built.mounts).await?;
        let live_container = Arc::new(LiveContainer::new(log));
        self.insert_live_container(&record.id, live_container.clone());
        let created = live
            .create_container(NewContainer {
                id: record.id.clone(),
                oci_spec_json: record.spec_json.clone(),
                image_storage_id: storage_id,
                writable_layer_bytes: self.config().writable_layer_bytes,
                user: built.user.clone(),
            })
            .await
            .map_err(|e| refused_field(e, "config", &[tonic::Code::FailedPrecondition]))?;
        live_container.start_log_copiers(&**live, &record.id, config.tty);
        record.user = Some(crate::state::ContainerUser {
            uid: created.uid,
            gid: created.gid,
            additional_gids: created.additional_gids,
        });
        record.state = ContainerState::Created;
        self.store().put_container(record)?;
        Ok(())
    }

    /// The record, live pod and live container of a container whose pod runs.
    pub(super) async fn running_parts(
        &self,
        field: &str,
        id: &str,
    ) -> Result<(ContainerRecord, Arc<dyn Pod>, Arc<LiveContainer>), SandboxError> {
        let id = self.resolve_container(field, id)?;
        let record = self
            .store()
            .container(&id)?
            .ok_or_else(|| SandboxError::NotFound(format!("{field}: container {id} not found")))?;
        let (_, live) = self.ready_pod(&record.pod_id)?;
        let lc = self.live_container(&id).ok_or_else(|| {
            SandboxError::FailedPrecondition(format!("container {id} is not running"))
        })?;
        Ok((record, live, lc))
    }

    /// Like [`Manager::running_parts`], for a container whose main process runs (exec, attach, log
    /// reopening); FailedPrecondition otherwise.
    pub(super) async fn running_process(
        &self,
        id: &str,
    ) -> Result<(ContainerRecord, Arc<dyn Pod>, Arc<LiveContainer>), SandboxError> {
        let parts = self.running_parts("container_id", id).await?;
        if parts.0.state != ContainerState::Running {
            return Err(SandboxError::FailedPrecondition(format!(
                "container {} is not running",
                parts.0.id
            )));
        }
        Ok(parts)
    }

    /// StartContainer: starts the init process and watches for its exit.
    pub async fn start_container(&self, id: &str) -> Result<(), SandboxError> {
        let (record, live, lc) = self.running_parts("container_id", id).await?;
        let lock = self.pod_lock(&record.pod_id);
        let _guard = lock.lock().await;
        // Re-read under the pod lock: a concurrent start or stop may have changed it.
        let mut record = self.store().container(&record.id)?.ok_or_else(|| {
            SandboxError::NotFound(format!("container {} was removed", record.id))
        })?;
        if record.state != ContainerState::Created {
            return Err(SandboxError::FailedPrecondition(format!(
                "container {} is {:?}, not created",
                record.id, record.state
            )));
        }
        live.start_container(&record.id, record.cri_config().stdin)
            .await?;
        record.state = ContainerState::Running;
        record.started_at = now_ns();
        self.store().put_container(&record)?;
        self.emit(&record.id, &record.pod_id, EventKind::Started);
        self.watch_exit(record.id.clone(), record.pod_id.clone(), live, lc);
        Ok(())
    }

    /// Waits for the init process's exit in the guest and records it.
    fn watch_exit(&self, id: String, pod_id: String, live: Arc<dyn Pod>, lc: Arc<LiveContainer>) {
        let me = self.clone();
        tokio::spawn(async move {
            let process = Process::main(&*live, &id);
            let exit = loop {
                match process.wait().await {
                    Ok(exit) => break exit,
                    // The pod is stopping or stopped: stopping records the exit itself.
                    Err(_) if live.stopping() || me.live_pod(&pod_id).is_none() => return,
                    Err(e) => {
                        tracing::warn!(container = %id, "waiting for the exit: {e}; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            // Under the pod lock, so a concurrent pod stop or removal sees either the recorded exit
            // or none; the logs are drained first so kubelet finds them complete with the exit.
            let lock = me.pod_lock(&pod_id);
            let _guard = lock.lock().await;
            lc.drain_logs(LOG_DRAIN).await;
            let store = &me.store();
            let Ok(Some(mut record)) = store.container(&id) else {
                lc.set_exited();
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
    /// the container. Stopping a container that is not running, or unknown, succeeds (CRI: the call
    /// is idempotent), as in containerd.
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), SandboxError> {
        let resolved = self.resolve_container("container_id", id);
        let Some(id) = super::known(resolved, "StopContainer")? else {
            return Ok(());
        };
        let Some(record) = self.store().container(&id)? else {
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
        let process = Process::main(&*live, &id);
        if timeout > 0 {
            if let Err(e) = process.signal(record.stop_signal, false).await {
                tracing::info!(container = %id, "stop signal: {e}");
            }
            if lc.wait_exited(Duration::from_secs(timeout as u64)).await {
                return Ok(());
            }
        }
        if let Err(e) = process.signal(SIGKILL, true).await {
            tracing::info!(container = %id, "SIGKILL: {e}");
        }
        if lc.wait_exited(KILL_WAIT).await {
            Ok(())
        } else {
            Err(PodError::KillTimeout {
                container: id,
                waited: KILL_WAIT,
            }
            .into())
        }
    }

    /// RemoveContainer: kills it if running, removes it from the guest, detaches its image when no
    /// other container of the pod uses it, releases its image lease and record. Unknown ids succeed.
    pub async fn remove_container(&self, id: &str) -> Result<(), SandboxError> {
        let resolved = self.resolve_container("container_id", id);
        let Some(id) = super::known(resolved, "RemoveContainer")? else {
            return Ok(());
        };
        if let Err(e) = self.stop_container(&id, 0).await {
            // The agent's RemoveContainer below kills whatever is left.
            tracing::warn!(container = %id, "stopping before removal: {e}");
        }
        let Some(record) = self.store().container(&id)? else {
            return Ok(());
        };
        let lock = self.pod_lock(&record.pod_id);
        let _guard = lock.lock().await;
        let live = self.ready_pod(&record.pod_id).ok().map(|(_, live)| live);
        if let Some(live) = &live {
            live.remove_container(&id).await?;
        }
        self.forget_container(&record).await?;
        if let Some(live) = &live {
            self.prune_slots(&record.pod_id, live).await?;
        }
        self.emit(&id, &record.pod_id, EventKind::Deleted);
        Ok(())
    }

    /// Detaches the image slots of pod `pod_id` that no container uses any more (after a removal or a
    /// failed create), unmounting them in the guest first. Steps that find nothing to undo (the
    /// storage was never mounted, the slot never filled) are not errors. Call with the pod lock held.
    async fn prune_slots(&self, pod_id: &str, live: &Arc<dyn Pod>) -> Result<(), SandboxError> {
        let store = self.store();
        let Some(mut pod) = store.pod(pod_id)? else {
            return Ok(());
        };
        let used: Vec<u32> = store
            .pod_containers(pod_id)?
            .iter()
            .map(|c| c.slot)
            .collect();
        let unused: Vec<(u32, String)> = pod
            .slots
            .iter()
            .filter(|(slot, _)| !used.contains(slot))
            .map(|(slot, image)| (*slot, image.clone()))
            .collect();
        for (slot, image) in unused {
            let storage = image.rsplit(':').next().unwrap_or_default();
            live.remove_image(slot, storage).await?;
            pod.slots.remove(&slot);
            store.put_pod(&pod)?;
        }
        Ok(())
    }

    /// Drops a container's record, name, image lease and live state (the guest side is gone or
    /// handled by the caller).
    pub(super) async fn forget_container(
        &self,
        record: &ContainerRecord,
    ) -> Result<(), SandboxError> {
        if let Some(lc) = self.take_live_container(&record.id) {
            lc.set_exited();
        }
        self.images().release(&record.id).await?;
        let store = self.store();
        store.delete_container(&record.id)?;
        store.release_name(&record.name_key, &record.id)?;
        Ok(())
    }

    /// Stats of a running container from its cgroup in the guest.
    pub async fn container_stats(
        &self,
        id: &str,
    ) -> Result<(ContainerRecord, Option<pb::StatsContainerResponse>), SandboxError> {
        let id = self.resolve_container("container_id", id)?;
        let record = self.store().container(&id)?.ok_or_else(|| {
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
        let stats = live.container_stats(&id).await?;
        Ok((record, Some(stats)))
    }

    /// Usage of containers `ids` of ready pod `pod_id` and of its guest network interfaces, in one agent
    /// call; `None` when the pod is not ready.
    pub async fn sandbox_stats(
        &self,
        pod_id: &str,
        ids: Vec<String>,
    ) -> Result<Option<pb::StatsSandboxResponse>, SandboxError> {
        let Ok((_, live)) = self.ready_pod(pod_id) else {
            return Ok(None);
        };
        Ok(Some(live.sandbox_stats(ids).await?))
    }

    /// UpdateContainerResources: applies new limits in the guest and records them.
    pub async fn update_resources(
        &self,
        id: &str,
        resources: LinuxContainerResources,
    ) -> Result<(), SandboxError> {
        let (record, live, _) = self.running_parts("container_id", id).await?;
        let oci = crate::spec::oci_resources(&resources)?;
        let lock = self.pod_lock(&record.pod_id);
        let _guard = lock.lock().await;
        let json = serde_json::to_vec(&oci).expect("resources serialize");
        live.update_container(&record.id, json)
            .await
            .map_err(|e| refused_field(e, "linux", &[]))?;
        // Re-read: the container may have exited (or been removed) meanwhile; only the resources change.
        if let Some(mut current) = self.store().container(&record.id)? {
            current.resources = resources.encode_to_vec();
            self.store().put_container(&current)?;
        }
        Ok(())
    }

    /// ReopenContainerLog: the log file was rotated; write to a new file at the same path.
    pub async fn reopen_log(&self, id: &str) -> Result<(), SandboxError> {
        let (record, _, lc) = self.running_process(id).await?;
        match &lc.log {
            Some(log) => log.reopen().map_err(|source| SandboxError::Log {
                container: record.id,
                source,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_stay_under_the_pod_log_directory() {
        let ok = log_file("/var/log/pods/ns_web_uid", "app/0.log").unwrap();
        assert_eq!(
            ok,
            std::path::Path::new("/var/log/pods/ns_web_uid/app/0.log")
        );
        for bad in ["../x.log", "/etc/passwd", "a/../../b", "./a"] {
            let e = log_file("/var/log/pods/p", bad).unwrap_err().to_string();
            assert!(e.starts_with("config.log_path"), "{bad}: {e}");
        }
        let e = log_file("relative/dir", "a.log").unwrap_err().to_string();
        assert!(e.contains("log_directory"), "{e}");
    }
}

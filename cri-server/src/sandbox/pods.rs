//! Pod sandboxes: run (size, boot, set up the guest), stop, remove, and the reconciliation after a
//! restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_cri::v1::{NamespaceMode, PodSandboxConfig};
use podvisor_proto as pb;
use prost::Message;

use super::live::LivePod;
use super::size::vm_size;
use super::{agent_err, lock, now_ns, Manager, SandboxError};
use crate::state::{ContainerState, PodRecord, PodState};

fn invalid(field: &str, msg: impl std::fmt::Display) -> SandboxError {
    SandboxError::InvalidArgument(format!("{field}: {msg}"))
}

/// The name reservation of a pod: `<name>_<namespace>_<uid>_<attempt>` (as containerd does).
fn pod_name_key(config: &PodSandboxConfig) -> Result<String, SandboxError> {
    let m = config
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("config.metadata", "missing"))?;
    for (field, v) in [
        ("config.metadata.name", &m.name),
        ("config.metadata.namespace", &m.namespace),
        ("config.metadata.uid", &m.uid),
    ] {
        if v.is_empty() {
            return Err(invalid(field, "empty"));
        }
    }
    Ok(format!(
        "{}_{}_{}_{}",
        m.name, m.namespace, m.uid, m.attempt
    ))
}

/// Refuses pod options a VM pod cannot honour.
fn check_supported(config: &PodSandboxConfig) -> Result<(), SandboxError> {
    let Some(linux) = &config.linux else {
        return Ok(());
    };
    let ns = linux
        .security_context
        .as_ref()
        .and_then(|s| s.namespace_options.as_ref());
    if let Some(ns) = ns {
        let node = NamespaceMode::Node as i32;
        if ns.network == node {
            return Err(invalid(
                "config.linux.security_context.namespace_options.network",
                "hostNetwork pods are not supported: a podvisor pod is a VM with its own network",
            ));
        }
        for (field, mode) in [("pid", ns.pid), ("ipc", ns.ipc)] {
            if mode == node {
                return Err(SandboxError::Unimplemented(format!(
                    "config.linux.security_context.namespace_options.{field}: the node's {field} \
                     namespace cannot be shared with a pod VM"
                )));
            }
        }
    }
    Ok(())
}

/// /etc/hosts of a pod.
fn hosts_file(hostname: &str) -> String {
    let mut hosts =
        String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if !hostname.is_empty() {
        hosts.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    hosts
}

impl Manager {
    /// RunPodSandbox: reserves the name, records the intent, boots the VM and sets up the guest.
    /// Returns the pod id once its agent serves.
    pub async fn run_pod(&self, config: PodSandboxConfig) -> Result<String, SandboxError> {
        let name_key = pod_name_key(&config)?;
        check_supported(&config)?;
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let c = &self.inner.config;
        let (vcpus, mem_mib) =
            vm_size(&config, c.default_mem_mib, c.guest_overhead_mib, host_cpus)?;
        let id = super::new_id()?;
        let cgroups = c.cgroups.plan(&id, &config)?;
        // Validates the port mappings and loads the CNI configuration before anything is reserved.
        let network = self
            .inner
            .network
            .prepare(&super::network::pod_network(&id, &config))?;
        self.inner
            .store
            .reserve_name(&name_key, &id)
            .map_err(|e| SandboxError::AlreadyExists(format!("pod sandbox {e}")))?;
        let lock = self.pod_lock(&id);
        let _guard = lock.lock().await;
        let mut record = PodRecord {
            id: id.clone(),
            name_key,
            config: config.encode_to_vec(),
            state: PodState::Creating,
            created_at: now_ns(),
            vcpus,
            mem_mib,
            slots: BTreeMap::new(),
            reason: String::new(),
            released: false,
            network: Some(network),
            cgroups,
        };
        self.inner.store.put_pod(&record)?;
        match self.boot_pod(&config, &mut record).await {
            Ok(live) => {
                record.state = PodState::Ready;
                if let Err(e) = self.inner.store.put_pod(&record) {
                    live.stop().await;
                    self.discard_pod(&record).await;
                    self.forget_lock(&id, &lock);
                    return Err(e.into());
                }
                lock_insert(self, &id, live);
                tracing::info!(pod = %id, vcpus, mem_mib, "pod sandbox ready");
                Ok(id)
            }
            Err(e) => {
                tracing::warn!(pod = %id, "RunPodSandbox failed: {e}");
                self.discard_pod(&record).await;
                self.forget_lock(&id, &lock);
                Err(e)
            }
        }
    }

    /// Attaches the pod network, boots the VM with it and sets up the guest (sandbox, interface).
    async fn boot_pod(
        &self,
        config: &PodSandboxConfig,
        record: &mut PodRecord,
    ) -> Result<Arc<LivePod>, SandboxError> {
        let id = record.id.clone();
        let dir = self.pod_dir(&id);
        let vsock = self.vsock_path(&id);
        for d in [&dir, &self.inner.config.run_dir.join("vm")] {
            std::fs::create_dir_all(d).map_err(|source| SandboxError::Io {
                path: d.to_path_buf(),
                source,
            })?;
        }
        if let Some(cgroups) = record.cgroups.clone() {
            let limits = crate::cgroups::limits(config);
            blocking(move || cgroups.create(&limits)).await?;
        }
        let (attachment, net) = self.attach_network(record).await?;
        let c = &self.inner.config;
        let vm = super::live::VmShape {
            vcpus: record.vcpus,
            mem_mib: record.mem_mib,
            net: Some(net),
            cgroups: record.cgroups.clone(),
        };
        let live = Arc::new(LivePod::boot(c, &dir, &vsock, vm).await?);
        // kubelet always sends the pod's DNS config; without one, the CNI result's applies.
        let dns = config
            .dns_config
            .clone()
            .unwrap_or_else(|| k8s_cri::v1::DnsConfig {
                servers: attachment.dns.nameservers.clone(),
                searches: attachment.dns.search.clone(),
                options: attachment.dns.options.clone(),
            });
        let linux = config.linux.clone().unwrap_or_default();
        let share_pid = linux
            .security_context
            .as_ref()
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.pid == NamespaceMode::Pod as i32);
        let mut entropy = [0u8; 64];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = std::io::Read::read_exact(&mut f, &mut entropy);
        }
        let request = pb::CreateSandboxRequest {
            hostname: config.hostname.clone(),
            dns_servers: dns.servers,
            dns_searches: dns.searches,
            dns_options: dns.options,
            hosts: hosts_file(&config.hostname),
            sysctls: linux.sysctls.into_iter().collect(),
            time_unix_ns: now_ns() as u64,
            entropy: entropy.to_vec(),
            share_pid_namespace: share_pid,
        };
        if let Err(status) = live.agent().create_sandbox(request).await {
            live.stop().await;
            // The agent names the field of the sandbox request it refused.
            return Err(match status.code() {
                tonic::Code::InvalidArgument => {
                    SandboxError::InvalidArgument(format!("config: {}", status.message()))
                }
                _ => agent_err("CreateSandbox")(status),
            });
        }
        if let Err(e) = self.configure_guest_network(&live, &attachment).await {
            live.stop().await;
            return Err(e);
        }
        self.watch_vm(&id, live.clone());
        Ok(live)
    }

    /// Marks the pod NOTREADY and its containers EXITED if its VM ends without being asked to.
    fn watch_vm(&self, id: &str, live: Arc<LivePod>) {
        let me = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let Some(reason) = live.wait_unexpected_exit().await else {
                return;
            };
            tracing::warn!(pod = %id, "pod VM ended: {reason}");
            // Release the dead VM first: RPCs holding the pod lock then fail fast instead of waiting.
            live.stop().await;
            let lock = me.pod_lock(&id);
            let _guard = lock.lock().await;
            if let Err(e) = me.stop_locked(&id, &format!("VM ended: {reason}")).await {
                tracing::error!(pod = %id, "recording the VM exit: {e}");
            }
        });
    }

    /// Removes every trace of a pod whose RunPodSandbox did not complete. If its network cannot be
    /// released, the pod is kept NOTREADY (unreleased) for Stop, Remove or the next start to retry.
    async fn discard_pod(&self, record: &PodRecord) {
        if let Err(e) = self.release_pod_resources(record).await {
            let kept = PodRecord {
                state: PodState::NotReady,
                reason: format!("RunPodSandbox failed and its resources were not released: {e}"),
                released: false,
                ..record.clone()
            };
            if let Err(e) = self.inner.store.put_pod(&kept) {
                tracing::error!(pod = %record.id, "recording the failed pod: {e}");
            }
            return;
        }
        let dir = self.pod_dir(&record.id);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!(pod = %record.id, "removing {}: {e}", dir.display());
            }
        }
        let store = &self.inner.store;
        if let Err(e) = store
            .delete_pod(&record.id)
            .and_then(|_| store.release_name(&record.name_key, &record.id))
        {
            tracing::error!(pod = %record.id, "discarding the pod record: {e}");
        }
    }

    /// StopPodSandbox: kills the containers (with the VM) and releases the VM. Idempotent.
    pub async fn stop_pod(&self, id: &str) -> Result<(), SandboxError> {
        let id = self.resolve_pod("pod_sandbox_id", id)?;
        // Stop the VM before waiting for the pod lock: an operation stuck on an unresponsive guest
        // then fails and releases the lock.
        if let Some(live) = self.live_pod(&id) {
            live.stop().await;
        }
        let lock = self.pod_lock(&id);
        let _guard = lock.lock().await;
        self.stop_locked(&id, "pod sandbox stopped").await
    }

    /// Stops pod `id` with its lock held: stops the VM, marks running containers exited with `why`,
    /// releases host resources once.
    async fn stop_locked(&self, id: &str, why: &str) -> Result<(), SandboxError> {
        let store = &self.inner.store;
        let Some(mut record) = store.pod(id)? else {
            return Ok(());
        };
        let live = lock(&self.inner.pods).remove(id);
        if let Some(live) = live {
            live.stop().await;
        }
        let now = now_ns();
        for mut c in store.pod_containers(id)? {
            if !matches!(c.state, ContainerState::Running | ContainerState::Created) {
                continue;
            }
            let was_running = c.state == ContainerState::Running;
            c.state = ContainerState::Exited;
            c.finished_at = now;
            // A container that never started did not succeed either: kubelet must not count it as
            // completed.
            c.exit_code = if was_running { 137 } else { 128 };
            c.reason = if was_running {
                "Error"
            } else {
                "ContainerCannotRun"
            }
            .into();
            c.message = why.into();
            store.put_container(&c)?;
            if let Some(lc) = self.live_container(&c.id) {
                lc.set_exited();
                lc.drain_logs(std::time::Duration::from_secs(5)).await;
            }
            self.emit(&c.id, id, super::EventKind::Stopped);
        }
        if record.state != PodState::NotReady || !record.released {
            record.state = PodState::NotReady;
            if record.reason.is_empty() {
                record.reason = why.into();
            }
            record.slots.clear();
            let released = self.release_pod_resources(&record).await;
            record.released = released.is_ok();
            store.put_pod(&record)?;
            released?;
        }
        Ok(())
    }

    /// Host resources a stopped pod gives back (the VM itself, and with it the tap, is gone by
    /// now): the VM's socket, the pod network (CNI DEL with the recorded result, namespace) and the
    /// host cgroups.
    async fn release_pod_resources(&self, record: &PodRecord) -> Result<(), SandboxError> {
        let sock = self.vsock_path(&record.id);
        match std::fs::remove_file(&sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(pod = %record.id, "removing {}: {e}", sock.display()),
        }
        // Each resource is released even if another one fails; the first failure is reported.
        let network = match &record.network {
            Some(network) => self.release_network(&record.id, network).await,
            None => Ok(()),
        };
        let cgroups = match record.cgroups.clone() {
            Some(cgroups) => blocking(move || cgroups.remove()).await,
            None => Ok(()),
        };
        network.and(cgroups)
    }

    /// RemovePodSandbox: stops the pod if needed, removes its containers, files and record.
    /// Removing an unknown pod succeeds (kubelet retries).
    pub async fn remove_pod(&self, id: &str) -> Result<(), SandboxError> {
        let id = match self.resolve_pod("pod_sandbox_id", id) {
            Ok(id) => id,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let pod_lock = self.pod_lock(&id);
        let _guard = pod_lock.lock().await;
        self.stop_locked(&id, "pod sandbox removed").await?;
        let store = &self.inner.store;
        for c in store.pod_containers(&id)? {
            self.forget_container(&c).await?;
        }
        if let Some(record) = store.pod(&id)? {
            let dir = self.pod_dir(&id);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(SandboxError::Io { path: dir, source }),
            }
            store.delete_pod(&id)?;
            store.release_name(&record.name_key, &id)?;
        }
        self.forget_lock(&id, &pod_lock);
        tracing::info!(pod = %id, "pod sandbox removed");
        Ok(())
    }

    /// The live VM of a pod that must be ready.
    pub(super) fn ready_pod(&self, id: &str) -> Result<(PodRecord, Arc<LivePod>), SandboxError> {
        let record = self
            .inner
            .store
            .pod(id)?
            .ok_or_else(|| SandboxError::NotFound(format!("pod sandbox {id} not found")))?;
        match (record.state, self.live_pod(id)) {
            (PodState::Ready, Some(live)) => Ok((record, live)),
            _ => Err(SandboxError::FailedPrecondition(format!(
                "pod sandbox {id} is not ready{}",
                if record.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", record.reason)
                }
            ))),
        }
    }

    /// After a restart: no VM survived. Pods that were being created are discarded (the client never
    /// got their id), ready pods become NOTREADY with their containers EXITED, and host resources are
    /// released once. Returns how many pods were touched.
    pub async fn reconcile(&self) -> Result<usize, SandboxError> {
        let store = &self.inner.store;
        let mut touched = 0;
        // No VM outlives the daemon: every socket left in the VM socket directory is stale.
        let vm_dir = self.inner.config.run_dir.join("vm");
        for entry in std::fs::read_dir(&vm_dir).into_iter().flatten().flatten() {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!("removing stale {}: {e}", entry.path().display());
            }
        }
        for c in store.containers()? {
            if c.state == ContainerState::Creating {
                // CreateContainer never answered: nothing refers to this container.
                self.forget_container(&c).await?;
                touched += 1;
            }
        }
        for pod in store.pods()? {
            match pod.state {
                PodState::Creating => {
                    tracing::info!(pod = %pod.id, "discarding a pod whose creation was interrupted");
                    for c in store.pod_containers(&pod.id)? {
                        self.forget_container(&c).await?;
                    }
                    self.discard_pod(&pod).await;
                    touched += 1;
                }
                PodState::Ready => {
                    self.stop_locked(&pod.id, "the pod VM ended when the daemon stopped")
                        .await?;
                    touched += 1;
                }
                PodState::NotReady if !pod.released => {
                    self.stop_locked(&pod.id, &pod.reason.clone()).await?;
                    touched += 1;
                }
                PodState::NotReady => {}
            }
        }
        let pruned = store.prune_names()?;
        if pruned > 0 {
            tracing::info!(
                names = pruned,
                "released names reserved by records that were never written"
            );
        }
        Ok(touched)
    }
}

/// Runs a blocking host cgroup operation off the async threads.
async fn blocking(
    f: impl FnOnce() -> Result<(), crate::cgroups::CgroupError> + Send + 'static,
) -> Result<(), SandboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SandboxError::Cgroup(format!("cgroup task: {e}")))?
        .map_err(SandboxError::from)
}

fn lock_insert(m: &Manager, id: &str, live: Arc<LivePod>) {
    lock(&m.inner.pods).insert(id.into(), live);
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::LinuxPodSandboxConfig;

    #[test]
    fn names_and_host_namespaces_are_checked() {
        let mut c = PodSandboxConfig::default();
        assert!(pod_name_key(&c)
            .unwrap_err()
            .to_string()
            .contains("config.metadata"));
        c.metadata = Some(k8s_cri::v1::PodSandboxMetadata {
            name: "web".into(),
            namespace: "default".into(),
            uid: "".into(),
            attempt: 1,
        });
        assert!(pod_name_key(&c)
            .unwrap_err()
            .to_string()
            .starts_with("config.metadata.uid"));
        c.metadata.as_mut().unwrap().uid = "u1".into();
        assert_eq!(pod_name_key(&c).unwrap(), "web_default_u1_1");
        c.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(k8s_cri::v1::LinuxSandboxSecurityContext {
                namespace_options: Some(k8s_cri::v1::NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = check_supported(&c).unwrap_err();
        assert!(
            matches!(e, SandboxError::InvalidArgument(ref m) if m.contains("hostNetwork")),
            "{e}"
        );
    }
}

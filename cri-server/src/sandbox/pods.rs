//! Pod sandboxes: run (size, boot, set up the guest), stop, remove, and the reconciliation after a
//! restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_cri::v1::PodSandboxConfig;
use podvisor_proto as pb;
use prost::Message;

use super::size::vm_size;
use super::validate;
use super::{now_ns, Manager, SandboxError};
use crate::network::NetworkRecord;
use crate::pod::native::{NativePod, NativeRecord, NativeShape};
use crate::pod::vm::{VmPod, VmShape};
use crate::pod::{net, Pod, PodError, PodKind};
use crate::state::{ContainerState, PodRecord, PodState};

impl Manager {
    /// RunPodSandbox: decides the pod's kind, reserves the name, records the intent, and starts the
    /// pod (boots its VM, or starts its agent on the node) and sets it up. Returns the pod id once its
    /// agent serves.
    pub async fn run_pod(
        &self,
        mut config: PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<String, SandboxError> {
        let (sandbox, mut record) = self.plan_pod(&mut config, runtime_handler)?;
        let id = record.id.clone();
        self.store()
            .reserve_name(&record.name_key, &id)
            .map_err(|e| SandboxError::AlreadyExists(format!("pod sandbox {e}")))?;
        let lock = self.pod_lock(&id);
        let _guard = lock.lock().await;
        self.store().put_pod(&record)?;
        let started = match (record.kind, record.network.clone()) {
            (PodKind::Vm, Some(intent)) => {
                self.boot_pod(&config, sandbox, &intent, &mut record).await
            }
            // pod_kind never gives a pod on the node's network a VM.
            (PodKind::Vm, None) => Err(SandboxError::InvalidArgument(
                "config.linux.security_context.namespace_options.network: a pod VM has its own"
                    .into(),
            )),
            (PodKind::Native, intent) => {
                self.start_native(&config, sandbox, intent.as_ref(), &mut record)
                    .await
            }
        };
        let live = match started {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!(pod = %id, "RunPodSandbox failed: {e}");
                self.discard_pod(&record).await;
                self.forget_lock(&id, &lock);
                return Err(e);
            }
        };
        record.state = PodState::Ready;
        if let Err(e) = self.store().put_pod(&record) {
            live.stop().await;
            self.discard_pod(&record).await;
            self.forget_lock(&id, &lock);
            return Err(e.into());
        }
        self.insert_live_pod(&id, live);
        let (kind, vcpus, mem_mib) = (record.kind, record.vcpus, record.mem_mib);
        tracing::info!(pod = %id, ?kind, vcpus, mem_mib, "pod sandbox ready");
        Ok(id)
    }

    /// Checks everything checkable on the host before anything is created, and decides the pod: its
    /// kind, its guest's sandbox request, and its record (state `Creating`, with the intent of every
    /// host resource). `config.hostname` becomes the pod's (the node's when it has none).
    fn plan_pod(
        &self,
        config: &mut PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<(pb::CreateSandboxRequest, PodRecord), SandboxError> {
        let name_key = validate::pod_name_key(config)?;
        let c = &self.config();
        let kind = validate::pod_kind(config, runtime_handler, c.native.enabled)?;
        let sandbox = validate::sandbox_request(config, &validate::node_hostname()?, kind)?;
        config.hostname = sandbox.hostname.clone();
        let (vcpus, mem_mib) = match kind {
            PodKind::Vm => {
                let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
                vm_size(config, c.default_mem_mib, c.guest_overhead_mib, host_cpus)?
            }
            PodKind::Native => (0, 0),
        };
        validate::check_host_cpusets(config)?;
        let files = match kind {
            PodKind::Vm => vec![&c.guest.kernel, &c.guest.initramfs],
            PodKind::Native => vec![&c.native.agent],
        };
        if let Some(missing) = files.into_iter().find(|f| !f.is_file()) {
            return Err(SandboxError::FailedPrecondition(format!(
                "the runtime is not ready: {} is missing",
                missing.display()
            )));
        }
        let id = super::new_id()?;
        let (cgroups, native) = match kind {
            PodKind::Vm => (c.cgroups.plan(&id, config)?, None),
            PodKind::Native => {
                let cgroup_parent = c.cgroups.sandbox_path(&id, config)?;
                let dir = self.native_dir(&id);
                (None, Some(NativeRecord { dir, cgroup_parent }))
            }
        };
        // Validates the port mappings and loads the CNI configuration.
        let network = match sandbox.node_namespaces {
            Some(node) if node.network => None,
            _ => Some(self.network().prepare(&net::pod_network(&id, config))?),
        };
        let record = PodRecord {
            id,
            name_key,
            config: config.encode_to_vec(),
            state: PodState::Creating,
            created_at: now_ns(),
            vcpus,
            mem_mib,
            slots: BTreeMap::new(),
            reason: String::new(),
            released: false,
            network,
            cgroups,
            runtime_handler: runtime_handler.into(),
            kind,
            native,
        };
        Ok((sandbox, record))
    }

    /// Attaches the pod network, boots the VM with it and sets up the guest (sandbox, interface). Each
    /// host resource is recorded before it is created, so a failure here is rolled back by the caller.
    async fn boot_pod(
        &self,
        config: &PodSandboxConfig,
        mut sandbox: pb::CreateSandboxRequest,
        intent: &NetworkRecord,
        record: &mut PodRecord,
    ) -> Result<Arc<dyn Pod>, SandboxError> {
        let id = record.id.clone();
        let dir = self.pod_dir(&id);
        for d in [&dir, &self.config().run_dir.join("vm")] {
            create_dir(d)?;
        }
        if let Some(cgroups) = record.cgroups.clone() {
            let limits = crate::cgroups::limits(config);
            crate::pod::blocking("cgroup", move || cgroups.create(&limits)).await?;
        }
        let network = self.network();
        let attachment = net::attach(network, intent).await?;
        record.network = Some(attachment.record().clone());
        self.store().put_pod(record)?;
        let nic = net::vm_nic(network, &attachment).await?;
        fill_dns(config, &mut sandbox, Some(&attachment.dns))?;
        let shape = VmShape {
            vcpus: record.vcpus,
            mem_mib: record.mem_mib,
            dir,
            vsock: self.vsock_path(&id),
            nic: Some(nic),
            cgroups: record.cgroups.clone(),
        };
        let vm = VmPod::boot(&self.config().guest, shape).await?;
        sandbox.time_unix_ns = now_ns() as u64;
        sandbox.entropy = entropy();
        if let Err(e) = vm.set_up(sandbox, &attachment).await {
            vm.stop().await;
            return Err(refused_sandbox(e));
        }
        let pod: Arc<dyn Pod> = Arc::new(vm);
        self.watch_pod(&id, pod.clone());
        Ok(pod)
    }

    /// Attaches the pod network (unless the pod is on the node's), starts the pod's agent on the node
    /// in the pod's namespaces and sets the pod up. Recorded before created, as [`Self::boot_pod`].
    async fn start_native(
        &self,
        config: &PodSandboxConfig,
        mut sandbox: pb::CreateSandboxRequest,
        intent: Option<&NetworkRecord>,
        record: &mut PodRecord,
    ) -> Result<Arc<dyn Pod>, SandboxError> {
        let id = record.id.clone();
        let native = record.native.clone().expect("a native pod has its record");
        let log_dir = self.pod_dir(&id);
        create_dir(&log_dir)?;
        let (netns, dns) = match intent {
            Some(intent) => {
                let attachment = net::attach(self.network(), intent).await?;
                record.network = Some(attachment.record().clone());
                self.store().put_pod(record)?;
                (Some(attachment.netns.clone()), Some(attachment.dns.clone()))
            }
            None => (None, None),
        };
        fill_dns(config, &mut sandbox, dns.as_ref())?;
        let shape = NativeShape {
            dir: native.dir,
            log: log_dir.join("agent.log"),
            netns,
            node: sandbox.node_namespaces.unwrap_or_default(),
            cgroup_parent: native.cgroup_parent,
        };
        let pod = NativePod::start(&self.config().native, shape).await?;
        if let Err(e) = pod.set_up(sandbox).await {
            pod.stop().await;
            return Err(refused_sandbox(e));
        }
        let pod: Arc<dyn Pod> = Arc::new(pod);
        self.watch_pod(&id, pod.clone());
        Ok(pod)
    }

    /// Marks the pod NOTREADY and its containers EXITED if it ends without being asked to.
    fn watch_pod(&self, id: &str, live: Arc<dyn Pod>) {
        let me = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let Some(reason) = live.wait_unexpected_exit().await else {
                return;
            };
            tracing::warn!(pod = %id, "pod ended: {reason}");
            // Release the dead pod first: RPCs holding the pod lock then fail fast instead of waiting.
            live.stop().await;
            let lock = me.pod_lock(&id);
            let _guard = lock.lock().await;
            if let Err(e) = me
                .stop_locked(&id, &format!("the pod ended: {reason}"))
                .await
            {
                tracing::error!(pod = %id, "recording the pod's end: {e}");
            }
        });
    }

    /// Removes every trace of a pod whose RunPodSandbox did not complete. Host resources that cannot
    /// be released now are left to the background retrier; the pod itself goes (its client never got
    /// its id).
    async fn discard_pod(&self, record: &PodRecord) {
        if let Err(e) = self.release_or_defer(record).await {
            tracing::error!(pod = %record.id, "recording the failed pod's release: {e}");
        }
        let dir = self.pod_dir(&record.id);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!(pod = %record.id, "removing {}: {e}", dir.display());
            }
        }
        let store = self.store();
        if let Err(e) = store
            .delete_pod(&record.id)
            .and_then(|_| store.release_name(&record.name_key, &record.id))
        {
            tracing::error!(pod = %record.id, "discarding the pod record: {e}");
        }
    }

    /// StopPodSandbox: kills the containers (with the VM) and releases the VM. Idempotent: stopping
    /// an unknown pod succeeds (CRI; kubelet retries stops after restarts), as in containerd.
    pub async fn stop_pod(&self, id: &str) -> Result<(), SandboxError> {
        let Some(id) = super::known(self.resolve_pod("pod_sandbox_id", id), "StopPodSandbox")?
        else {
            return Ok(());
        };
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
        let store = self.store();
        let Some(mut record) = store.pod(id)? else {
            return Ok(());
        };
        let live = self.take_live_pod(id);
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
            // Released now or handed to the background retrier: either way this pod is done with them.
            self.release_or_defer(&record).await?;
            record.released = true;
            store.put_pod(&record)?;
        }
        Ok(())
    }

    /// RemovePodSandbox: stops the pod if needed, removes its containers, files and record.
    /// Removing an unknown pod succeeds (kubelet retries).
    pub async fn remove_pod(&self, id: &str) -> Result<(), SandboxError> {
        let Some(id) = super::known(self.resolve_pod("pod_sandbox_id", id), "RemovePodSandbox")?
        else {
            return Ok(());
        };
        let pod_lock = self.pod_lock(&id);
        let _guard = pod_lock.lock().await;
        self.stop_locked(&id, "pod sandbox removed").await?;
        let store = self.store();
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

    /// The live pod of a pod that must be ready.
    pub(super) fn ready_pod(&self, id: &str) -> Result<(PodRecord, Arc<dyn Pod>), SandboxError> {
        let record = self
            .store()
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

    /// CNI CHECK of a ready pod's network (None when the pod is not ready or has no result).
    pub async fn check_network(&self, pod: &PodRecord) -> Option<Result<(), String>> {
        let net = pod.network.as_ref().filter(|n| n.result.is_some())?;
        if pod.state != PodState::Ready {
            return None;
        }
        Some(self.network().check(net).await.map_err(|e| e.to_string()))
    }

    /// At daemon shutdown: stops every native pod (its agent removes its containers and mounts), so that
    /// none outlives the daemon, even when the service manager kills what the daemon leaves; VM pods
    /// end with the process. The records stay for the next start's reconcile.
    pub async fn stop_native_pods(&self) {
        let pods = match self.store().pods() {
            Ok(pods) => pods,
            Err(e) => {
                tracing::error!("native pods left running at shutdown: reading records: {e}");
                return;
            }
        };
        let stops = pods
            .iter()
            .filter(|p| p.kind == PodKind::Native)
            .filter_map(|p| self.live_pod(&p.id))
            .map(|pod| async move { pod.stop().await });
        let stopped = futures_util::future::join_all(stops).await.len();
        if stopped > 0 {
            tracing::info!(pods = stopped, "native pods stopped with the daemon");
        }
    }

    /// After a restart: no VM survived. Pods that were being created are discarded (the client never
    /// got their id), ready pods become NOTREADY with their containers EXITED, and host resources are
    /// released once. Returns how many pods were touched.
    pub async fn reconcile(&self) -> Result<usize, SandboxError> {
        let store = self.store();
        let mut touched = 0;
        // No VM outlives the daemon: every socket left in the VM socket directory is stale.
        let vm_dir = self.config().run_dir.join("vm");
        for entry in std::fs::read_dir(&vm_dir).into_iter().flatten().flatten() {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!("removing stale {}: {e}", entry.path().display());
            }
        }
        for c in store.containers()? {
            if c.state == ContainerState::Creating {
                // CreateContainer never answered: nothing refers to this container.
                if let Err(e) = self.forget_container(&c).await {
                    tracing::error!(container = %c.id, "discarding an interrupted container: {e}");
                }
                touched += 1;
            }
        }
        // One pod's trouble never stops the daemon: what cannot be released now is retried in the
        // background (see `release`), other failures are logged and the pod is left as it is.
        for pod in store.pods()? {
            let done = match pod.state {
                PodState::Creating => {
                    tracing::info!(pod = %pod.id, "discarding a pod whose creation was interrupted");
                    for c in store.pod_containers(&pod.id)? {
                        if let Err(e) = self.forget_container(&c).await {
                            tracing::error!(container = %c.id, "discarding a container: {e}");
                        }
                    }
                    self.discard_pod(&pod).await;
                    Ok(())
                }
                PodState::Ready => {
                    self.stop_locked(&pod.id, "the pod ended when the daemon stopped")
                        .await
                }
                PodState::NotReady if !pod.released => {
                    self.stop_locked(&pod.id, &pod.reason.clone()).await
                }
                PodState::NotReady => continue,
            };
            touched += 1;
            if let Err(e) = done {
                tracing::error!(pod = %pod.id, "reconciling the pod: {e}");
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

fn create_dir(dir: &std::path::Path) -> Result<(), SandboxError> {
    std::fs::create_dir_all(dir).map_err(|source| SandboxError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// A pod's resolver without a DNS config (kubelet always sends one): the CNI result's, or the node's
/// when CNI has none (checked like the rest of the request).
fn fill_dns(
    config: &PodSandboxConfig,
    sandbox: &mut pb::CreateSandboxRequest,
    cni: Option<&crate::network::Dns>,
) -> Result<(), SandboxError> {
    if config.dns_config.is_some() {
        return Ok(());
    }
    match cni.filter(|d| !d.nameservers.is_empty()) {
        Some(cni) => {
            sandbox.dns_servers = cni.nameservers.clone();
            sandbox.dns_searches = cni.search.clone();
            sandbox.dns_options = cni.options.clone();
        }
        None => {
            let node = validate::node_dns();
            sandbox.dns_servers = node.servers;
            sandbox.dns_searches = node.searches;
            sandbox.dns_options = node.options;
        }
    }
    validate::check_sandbox(sandbox, false)
}

/// A failed sandbox set-up; the agent names the field of the request it refused.
fn refused_sandbox(e: PodError) -> SandboxError {
    match e.agent_status() {
        Some(s) if s.code() == tonic::Code::InvalidArgument => {
            SandboxError::InvalidArgument(format!("config: {}", s.message()))
        }
        _ => e.into(),
    }
}

/// 64 random bytes for the guest's entropy pool; zeros if the host's source cannot be read (the guest
/// kernel has sources of its own).
fn entropy() -> Vec<u8> {
    super::random_bytes::<64>().unwrap_or([0; 64]).to_vec()
}

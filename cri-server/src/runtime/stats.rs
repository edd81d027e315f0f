//! Stats RPCs: container and pod stats from the guest's cgroups, and the pod metrics.

use k8s_cri::v1::*;
use tonic::Status;

use super::{convert, metrics, to_status, Runtime};
use crate::sandbox::SandboxError;
use crate::state::{labels_match, ContainerState, PodState};

impl Runtime {
    /// ListContainerStats: running containers matching `filter`.
    pub(super) async fn list_container_stats(
        &self,
        filter: ContainerStatsFilter,
    ) -> Result<Vec<ContainerStats>, Status> {
        let all = self
            .manager
            .store()
            .containers()
            .map_err(|e| to_status(e.into()))?;
        let mut stats = Vec::new();
        for c in all.iter().filter(|c| c.state == ContainerState::Running) {
            if !(filter.id.is_empty() || c.id.starts_with(&filter.id))
                || !(filter.pod_sandbox_id.is_empty()
                    || c.pod_id.starts_with(&filter.pod_sandbox_id))
            {
                continue;
            }
            let (record, s) = match self.manager.container_stats(&c.id).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::info!(container = %c.id, "stats: {e}");
                    continue;
                }
            };
            let cri = self.stats.container(&record, s.as_ref());
            if labels_match(
                &cri.attributes.clone().unwrap_or_default().labels,
                &filter.label_selector,
            ) {
                stats.push(cri);
            }
        }
        Ok(stats)
    }

    /// ListPodSandboxStats: ready pods matching `filter` (pods removed meanwhile are skipped).
    pub(super) async fn list_pod_stats(
        &self,
        filter: PodSandboxStatsFilter,
    ) -> Result<Vec<PodSandboxStats>, Status> {
        let pods = self
            .manager
            .store()
            .pods()
            .map_err(|e| to_status(e.into()))?;
        let mut stats = Vec::new();
        for p in pods.iter().filter(|p| p.state == PodState::Ready) {
            if !(filter.id.is_empty() || p.id.starts_with(&filter.id)) {
                continue;
            }
            let s = match self.pod_stats(&p.id).await {
                Ok(s) => s,
                // Removed while listing.
                Err(SandboxError::NotFound(_)) => continue,
                Err(e) => return Err(to_status(e)),
            };
            if labels_match(
                &s.attributes.clone().unwrap_or_default().labels,
                &filter.label_selector,
            ) {
                stats.push(s);
            }
        }
        Ok(stats)
    }

    /// ListPodSandboxMetrics: the metrics of every ready pod, one agent call per pod. A pod whose agent
    /// fails is left out (logged), so one sick VM does not blank a whole scrape.
    pub(super) async fn list_pod_metrics(&self) -> Result<Vec<PodSandboxMetrics>, Status> {
        let store = self.manager.store();
        let pods = store.pods().map_err(|e| to_status(e.into()))?;
        let mut pod_metrics = Vec::new();
        for p in pods.iter().filter(|p| p.state == PodState::Ready) {
            let containers: Vec<_> = store
                .pod_containers(&p.id)
                .map_err(|e| to_status(e.into()))?
                .into_iter()
                .filter(|c| c.state == ContainerState::Running)
                .collect();
            let ids = containers.iter().map(|c| c.id.clone()).collect();
            let s = match self.manager.sandbox_stats(&p.id, ids).await {
                Ok(Some(s)) => s,
                // Stopped or removed while listing.
                Ok(None) | Err(SandboxError::NotFound(_)) => continue,
                Err(e) => {
                    tracing::warn!(pod = %p.id, "pod metrics: {e}");
                    continue;
                }
            };
            let now = crate::sandbox::now_ns();
            pod_metrics.push(metrics::pod_metrics(p, &containers, &s, now));
        }
        Ok(pod_metrics)
    }

    /// Stats of pod `id`: its running containers' stats and their sums.
    pub(super) async fn pod_stats(
        &self,
        id: &str,
    ) -> std::result::Result<PodSandboxStats, SandboxError> {
        let store = self.manager.store();
        let pod = store.pod(id)?.ok_or_else(|| {
            SandboxError::NotFound(format!("pod_sandbox_id: pod sandbox {id} not found"))
        })?;
        let mut containers = Vec::new();
        for c in store
            .pod_containers(id)?
            .iter()
            .filter(|c| c.state == ContainerState::Running)
        {
            if let Ok((record, s)) = self.manager.container_stats(&c.id).await {
                containers.push(self.stats.container(&record, s.as_ref()));
            }
        }
        let mut stats = convert::pod_stats(&pod, containers);
        // A VM pod's CPU is what its threads used on the host (vCPUs and device threads), guest
        // kernel and agent included, as the pod's cgroup is for a runc pod.
        let host_cpu = match (&pod.cgroups, pod.state) {
            (Some(cgroups), PodState::Ready) => {
                let cgroups = cgroups.clone();
                tokio::task::spawn_blocking(move || cgroups.cpu_usage_ns())
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        if let (Some(usage), Some(cpu)) =
            (host_cpu, stats.linux.as_mut().and_then(|l| l.cpu.as_mut()))
        {
            let ts = crate::sandbox::now_ns();
            *cpu = CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: Some(UInt64Value { value: usage }),
                usage_nano_cores: self
                    .stats
                    .rate(&format!("pod:{id}"), ts as u64, usage)
                    .map(|value| UInt64Value { value }),
            };
        }
        Ok(stats)
    }
}

//! State records and guest stats → CRI messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_cri::v1::*;
use podvisor_proto as pb;
use prost::Message;

use crate::sandbox::{now_ns, ContainerEvent, EventKind, Manager};
use crate::state::{ContainerRecord, ContainerState as St, PodRecord, PodState};

fn pod_state(pod: &PodRecord) -> i32 {
    match pod.state {
        PodState::Ready => PodSandboxState::SandboxReady as i32,
        PodState::Creating | PodState::NotReady => PodSandboxState::SandboxNotready as i32,
    }
}

fn container_state(c: &ContainerRecord) -> i32 {
    (match c.state {
        St::Creating | St::Created => ContainerState::ContainerCreated,
        St::Running => ContainerState::ContainerRunning,
        St::Exited => ContainerState::ContainerExited,
    }) as i32
}

/// A pod as ListPodSandbox reports it.
pub fn cri_pod(pod: &PodRecord) -> PodSandbox {
    let config = pod.cri_config();
    PodSandbox {
        id: pod.id.clone(),
        metadata: config.metadata,
        state: pod_state(pod),
        created_at: pod.created_at,
        labels: config.labels,
        annotations: config.annotations,
        runtime_handler: pod.runtime_handler.clone(),
    }
}

/// A pod's status.
pub fn pod_status(pod: &PodRecord) -> PodSandboxStatus {
    let config = pod.cri_config();
    let options = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone());
    PodSandboxStatus {
        id: pod.id.clone(),
        metadata: config.metadata,
        state: pod_state(pod),
        created_at: pod.created_at,
        network: Some(pod_network_status(pod)),
        linux: Some(LinuxPodSandboxStatus {
            namespaces: Some(Namespace { options }),
        }),
        labels: config.labels,
        annotations: config.annotations,
        runtime_handler: pod.runtime_handler.clone(),
    }
}

/// A ready pod's addresses from its CNI result (a stopped pod has none, as in containerd).
fn pod_network_status(pod: &PodRecord) -> PodSandboxNetworkStatus {
    let ips = match (&pod.network, pod.state) {
        (Some(net), crate::state::PodState::Ready) => net.pod_ips(),
        _ => Vec::new(),
    };
    let mut ips = ips.into_iter().map(|ip| ip.to_string());
    PodSandboxNetworkStatus {
        ip: ips.next().unwrap_or_default(),
        additional_ips: ips.map(|ip| PodIp { ip }).collect(),
    }
}

/// Verbose pod information (PodSandboxStatus verbose=true), with the outcome of a CNI CHECK of a
/// ready pod's network.
pub fn pod_info(pod: &PodRecord, cni_check: Option<Result<(), String>>) -> HashMap<String, String> {
    let network = pod.network.as_ref().map(|n| {
        serde_json::json!({
            "netns": n.netns,
            "ips": n.pod_ips(),
            "cniResult": n.result.as_deref().and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok()),
            "cniCheck": match &cni_check {
                None => "not run (the pod is not ready)".to_string(),
                Some(Ok(())) => "ok".to_string(),
                Some(Err(e)) => e.clone(),
            },
        })
    });
    let info = serde_json::json!({
        "kind": pod.kind,
        "native": pod.native,
        "network": network,
        "vcpus": pod.vcpus,
        "memoryMiB": pod.mem_mib,
        "imageSlots": pod.slots,
        "cgroups": pod.cgroups,
        "state": format!("{:?}", pod.state),
        "reason": pod.reason,
        "hostResourcesReleased": pod.released,
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

/// A container as ListContainers reports it.
pub fn cri_container(c: &ContainerRecord) -> Container {
    let config = c.cri_config();
    Container {
        id: c.id.clone(),
        pod_sandbox_id: c.pod_id.clone(),
        metadata: config.metadata,
        image: config.image,
        image_ref: c.image_id.clone(),
        state: container_state(c),
        created_at: c.created_at,
        labels: config.labels,
        annotations: config.annotations,
        image_id: c.image_id.clone(),
    }
}

/// A container's status. As containerd: `image` is the image's first tag and `image_ref` its first
/// repo digest when `manager` still has the image (kubelet shows them as the pod's image and image
/// id), else what the container was created with.
pub fn container_status(manager: &Manager, c: &ContainerRecord) -> ContainerStatus {
    let config = c.cri_config();
    let image = manager.image_record(&c.image_id);
    let image_spec = config.image.map(|mut spec| {
        if let Some(tag) = image.as_ref().and_then(|i| i.repo_tags.first()) {
            spec.image = tag.clone();
        }
        spec
    });
    let image_ref = image
        .as_ref()
        .and_then(|i| i.repo_digests.first().cloned())
        .unwrap_or_else(|| c.image_id.clone());
    let resources = LinuxContainerResources::decode(c.resources.as_slice()).ok();
    ContainerStatus {
        id: c.id.clone(),
        metadata: config.metadata,
        state: container_state(c),
        created_at: c.created_at,
        started_at: c.started_at,
        finished_at: c.finished_at,
        exit_code: c.exit_code,
        image: image_spec,
        image_ref,
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: config.labels,
        annotations: config.annotations,
        mounts: config.mounts,
        // Absolute, as containerd reports it: kubelet and crictl open this path to serve logs.
        log_path: c.log_path.clone(),
        resources: resources.map(|r| ContainerResources {
            linux: Some(r),
            windows: None,
        }),
        image_id: c.image_id.clone(),
        user: c.user.as_ref().map(|u| ContainerUser {
            linux: Some(LinuxContainerUser {
                uid: u.uid.into(),
                gid: u.gid.into(),
                supplemental_groups: u.additional_gids.iter().map(|&g| g.into()).collect(),
            }),
        }),
    }
}

/// Verbose container information (ContainerStatus verbose=true).
pub fn container_info(c: &ContainerRecord) -> String {
    let spec: serde_json::Value = serde_json::from_slice(&c.spec_json).unwrap_or_default();
    serde_json::json!({
        "sandboxID": c.pod_id,
        "imageSlot": c.slot,
        "stopSignal": c.stop_signal,
        "runtimeSpec": spec,
    })
    .to_string()
}

/// A CRI container event with the pod's and its containers' current status.
pub fn event(manager: &Manager, ev: &ContainerEvent) -> ContainerEventResponse {
    let store = manager.store();
    let kind = match ev.kind {
        EventKind::Created => ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => ContainerEventType::ContainerDeletedEvent,
    };
    ContainerEventResponse {
        container_id: ev.container_id.clone(),
        container_event_type: kind as i32,
        created_at: ev.at,
        pod_sandbox_status: store.pod(&ev.pod_id).ok().flatten().map(|p| pod_status(&p)),
        containers_statuses: store
            .pod_containers(&ev.pod_id)
            .unwrap_or_default()
            .iter()
            .map(|c| container_status(manager, c))
            .collect(),
    }
}

fn u64v(v: u64) -> Option<UInt64Value> {
    Some(UInt64Value { value: v })
}

/// Turns cumulative CPU time into a rate (usage_nano_cores) from the previous sample of each
/// container.
#[derive(Clone, Default)]
pub struct Stats {
    last: Arc<Mutex<HashMap<String, (u64, u64)>>>,
}

impl Stats {
    /// CPU cores used (in nano cores) since the previous sample of `key`, which this one replaces.
    pub fn rate(&self, key: &str, ts: u64, usage_ns: u64) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (pts, pusage) = last.insert(key.to_string(), (ts, usage_ns))?;
        let dt = ts.checked_sub(pts).filter(|d| *d > 0)?;
        let du = usage_ns.checked_sub(pusage)?;
        Some((du as u128 * 1_000_000_000 / dt as u128) as u64)
    }

    /// CRI stats of a container; without guest stats only the attributes.
    pub fn container(
        &self,
        c: &ContainerRecord,
        s: Option<&pb::StatsContainerResponse>,
    ) -> ContainerStats {
        let config = c.cri_config();
        let attributes = Some(ContainerAttributes {
            id: c.id.clone(),
            metadata: config.metadata,
            labels: config.labels,
            annotations: config.annotations,
        });
        let Some(s) = s else {
            return ContainerStats {
                attributes,
                ..Default::default()
            };
        };
        let ts = if s.timestamp_unix_ns > 0 {
            s.timestamp_unix_ns
        } else {
            now_ns() as u64
        };
        let nano_cores = self.rate(&c.id, ts, s.cpu_usage_ns);
        let available = s.memory_limit_bytes.checked_sub(s.memory_working_set_bytes);
        ContainerStats {
            attributes,
            cpu: Some(CpuUsage {
                timestamp: ts as i64,
                usage_core_nano_seconds: u64v(s.cpu_usage_ns),
                usage_nano_cores: nano_cores.and_then(u64v),
            }),
            memory: Some(MemoryUsage {
                timestamp: ts as i64,
                working_set_bytes: u64v(s.memory_working_set_bytes),
                available_bytes: available.and_then(u64v),
                usage_bytes: u64v(s.memory_usage_bytes),
                rss_bytes: u64v(s.memory_rss_bytes),
                page_faults: u64v(s.page_faults),
                major_page_faults: u64v(s.major_page_faults),
            }),
            writable_layer: Some(FilesystemUsage {
                timestamp: ts as i64,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: "/".into(),
                }),
                used_bytes: u64v(s.writable_layer_used_bytes),
                inodes_used: u64v(s.writable_layer_inodes_used),
            }),
            swap: None,
        }
    }
}

/// Pod stats: the sum of its containers' CPU and memory.
pub fn pod_stats(pod: &PodRecord, containers: Vec<ContainerStats>) -> PodSandboxStats {
    let config = pod.cri_config();
    let ts = now_ns();
    let sum = |f: &dyn Fn(&ContainerStats) -> Option<u64>| -> Option<UInt64Value> {
        let vals: Vec<u64> = containers.iter().filter_map(f).collect();
        (!vals.is_empty()).then(|| UInt64Value {
            value: vals.iter().sum(),
        })
    };
    let cpu = CpuUsage {
        timestamp: ts,
        usage_core_nano_seconds: sum(&|c| {
            c.cpu
                .as_ref()?
                .usage_core_nano_seconds
                .as_ref()
                .map(|v| v.value)
        }),
        usage_nano_cores: sum(&|c| c.cpu.as_ref()?.usage_nano_cores.as_ref().map(|v| v.value)),
    };
    let memory = MemoryUsage {
        timestamp: ts,
        working_set_bytes: sum(&|c| {
            c.memory
                .as_ref()?
                .working_set_bytes
                .as_ref()
                .map(|v| v.value)
        }),
        usage_bytes: sum(&|c| c.memory.as_ref()?.usage_bytes.as_ref().map(|v| v.value)),
        rss_bytes: sum(&|c| c.memory.as_ref()?.rss_bytes.as_ref().map(|v| v.value)),
        ..Default::default()
    };
    PodSandboxStats {
        attributes: Some(PodSandboxAttributes {
            id: pod.id.clone(),
            metadata: config.metadata,
            labels: config.labels,
            annotations: config.annotations,
        }),
        linux: Some(LinuxPodSandboxStats {
            cpu: Some(cpu),
            memory: Some(memory),
            network: None,
            process: None,
            containers,
        }),
        windows: None,
    }
}

//! CRI request material shared by the daemon tests and benches: pod and container configs, and
//! RunPodSandbox / CreateContainer calls that must succeed.

use std::path::Path;
use std::time::Instant;

use tonic::transport::Channel;

/// A pod config named `name` in namespace `e2e`, with cluster DNS settings and an `app` label.
pub fn pod_config(name: &str, uid: &str, logs: &Path) -> k8s_cri::v1::PodSandboxConfig {
    use k8s_cri::v1::{DnsConfig, PodSandboxConfig, PodSandboxMetadata};
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["e2e.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: std::collections::HashMap::from([("app".into(), name.into())]),
        ..Default::default()
    }
}

/// A container config running `args` from `image`, logging to `<name>.log`, labelled `name=<name>`,
/// with a memory limit unless `memory` is 0.
pub fn container_config(
    name: &str,
    image: &str,
    args: &[&str],
    memory: i64,
) -> k8s_cri::v1::ContainerConfig {
    use k8s_cri::v1::*;
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: args.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: std::collections::HashMap::from([("name".into(), name.into())]),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: memory,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The CRI runtime service client.
type Runtime = k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>;

/// RunPodSandbox under the default handler that must succeed; returns the pod id.
pub async fn run_pod(rt: &mut Runtime, config: &k8s_cri::v1::PodSandboxConfig) -> String {
    run_pod_with(rt, config, "").await
}

/// RunPodSandbox under runtime handler `handler` that must succeed; returns the pod id.
pub async fn run_pod_with(
    rt: &mut Runtime,
    config: &k8s_cri::v1::PodSandboxConfig,
    handler: &str,
) -> String {
    rt.run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: handler.into(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

/// CreateContainer that must succeed; prints how long it took and returns the container id.
pub async fn create_container(
    rt: &mut Runtime,
    pod: &str,
    config: k8s_cri::v1::ContainerConfig,
    pod_config: &k8s_cri::v1::PodSandboxConfig,
) -> String {
    let start = Instant::now();
    let id = rt
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    eprintln!("CreateContainer took {:?}", start.elapsed());
    id
}

/// ListPodSandbox without a filter, which must succeed.
pub async fn list_pods(rt: &mut Runtime) -> Vec<k8s_cri::v1::PodSandbox> {
    rt.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
}

/// ListContainers with `filter` (None: all), which must succeed.
pub async fn list_containers(
    rt: &mut Runtime,
    filter: Option<k8s_cri::v1::ContainerFilter>,
) -> Vec<k8s_cri::v1::Container> {
    rt.list_containers(k8s_cri::v1::ListContainersRequest { filter })
        .await
        .expect("ListContainers")
        .into_inner()
        .containers
}

/// PodSandboxStatus (verbose) that must succeed: the status and the `info` map.
pub async fn pod_status(
    rt: &mut Runtime,
    id: &str,
) -> (
    k8s_cri::v1::PodSandboxStatus,
    std::collections::HashMap<String, String>,
) {
    let r = rt
        .pod_sandbox_status(k8s_cri::v1::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    (r.status.expect("a status"), r.info)
}

/// ContainerStatus that must succeed.
pub async fn container_status(rt: &mut Runtime, id: &str) -> k8s_cri::v1::ContainerStatus {
    rt.container_status(k8s_cri::v1::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("a status")
}

//! The bad requests of the pod e2e test (`cri_pods/main.rs`): each answered with the right code and a
//! message naming the field, before any VM exists.

use std::path::Path;

use k8s_cri::v1::*;
use tonic::Code;

use super::{code, Rt};
use podvisor_testkit::cri::{container_config, list_pods, pod_config};

/// Bad requests answered with the right code and a message naming the field, before any VM exists.
pub async fn invalid_requests(rt: &mut Rt, image: &str, logs: &Path) {
    let unknown = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let (c, m) = code(
        rt.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: unknown.into(),
            verbose: false,
        })
        .await,
    );
    assert_eq!(c, Code::NotFound, "{m}");
    let (c, m) = code(
        rt.container_status(ContainerStatusRequest {
            container_id: unknown.into(),
            verbose: false,
        })
        .await,
    );
    assert_eq!(c, Code::NotFound, "{m}");
    let (c, m) = code(
        rt.start_container(StartContainerRequest {
            container_id: unknown.into(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound, "{m}");
    // Stopping what does not exist succeeds (CRI: stops are idempotent; kubelet retries them).
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: unknown.into(),
    })
    .await
    .expect("StopPodSandbox of an unknown pod");
    rt.stop_container(StopContainerRequest {
        container_id: unknown.into(),
        timeout: 0,
    })
    .await
    .expect("StopContainer of an unknown container");
    let (c, m) = code(
        rt.exec_sync(ExecSyncRequest {
            container_id: unknown.into(),
            cmd: vec!["true".into()],
            timeout: 1,
        })
        .await,
    );
    assert_eq!(c, Code::NotFound, "{m}");
    // Removing what does not exist succeeds: kubelet retries removals.
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: unknown.into(),
    })
    .await
    .unwrap();
    rt.remove_container(RemoveContainerRequest {
        container_id: unknown.into(),
    })
    .await
    .unwrap();

    let mut empty_name = pod_config("", "u", logs);
    empty_name.metadata.as_mut().unwrap().name.clear();
    let (c, m) = code(
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(empty_name),
            runtime_handler: String::new(),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("config.metadata.name"), "{m}");
    let mut bad = pod_config("bad", "u", logs);
    bad.linux = Some(LinuxPodSandboxConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: -5,
            ..Default::default()
        }),
        ..Default::default()
    });
    let (c, m) = code(
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(bad),
            runtime_handler: String::new(),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(
        m.contains("config.linux.resources.memory_limit_in_bytes"),
        "{m}"
    );
    let mut host_net = pod_config("hostnet", "u", logs);
    host_net.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption {
                network: NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    // Under the default handler it would run natively (tests/cri_native.rs); the VM handler by name
    // cannot give it the node's network.
    let (c, m) = code(
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(host_net),
            runtime_handler: "podvisor".into(),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("hostNetwork"), "{m}");
    let (c, m) = code(
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config("h", "u", logs)),
            runtime_handler: "runc".into(),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    assert!(m.contains("runtime_handler"), "{m}");
    let (c, m) = code(
        rt.create_container(CreateContainerRequest {
            pod_sandbox_id: unknown.into(),
            config: Some(container_config("x", image, &["true"], 0)),
            sandbox_config: None,
        })
        .await,
    );
    assert_eq!(c, Code::NotFound, "{m}");
    // Nothing was left behind by the refused requests.
    let pods = list_pods(rt).await;
    assert!(pods.is_empty(), "{pods:?}");
}

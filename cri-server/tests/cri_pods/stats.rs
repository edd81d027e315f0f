//! Stats, metrics and resource updates of the pod e2e test (`cri_pods/main.rs`), on pod A's running talker
//! and sleeper: CRI stats, every cAdvisor metric critest expects with plausible values, and
//! UpdateContainerResources with its bad requests.

use k8s_cri::v1::*;
use tonic::Code;

use super::cri_metrics;
use super::{code, status, Rt};

/// Checks stats, metrics and resource updates of `talker` and `sleeper` (64 MiB, 0.5 CPU) in `pod`.
pub async fn stats_and_resources(rt: &mut Rt, pod: &str, talker: &str, sleeper: &str) {
    // Stats and resources.
    let s = rt
        .container_stats(ContainerStatsRequest {
            container_id: talker.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert!(s.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    assert!(s.memory.unwrap().working_set_bytes.unwrap().value > 0);
    let all = rt
        .list_container_stats(ListContainerStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.stats.len(), 2, "{all:?}");
    let ps = rt
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ps.stats.unwrap().linux.unwrap().containers.len(), 2);
    // Metrics: seconds of CPU in the talker and a ping of the gateway (network traffic), then every
    // cAdvisor name critest expects, with plausible values.
    let burn = "timeout 6 sh -c 'while :; do :; done'; \
                ping -c 2 -W 2 $(ip route | awk '/^default/ {print $3}') >/dev/null; true";
    rt.exec_sync(ExecSyncRequest {
        container_id: talker.into(),
        cmd: vec!["sh".into(), "-c".into(), burn.into()],
        timeout: 180,
    })
    .await
    .expect("ExecSync burn");
    let (pod_level, per) = cri_metrics::check(rt, pod, &[talker, sleeper]).await;
    let value = cri_metrics::value;
    assert!(
        value(
            &pod_level,
            "container_network_receive_bytes_total",
            &["eth0"]
        ) > Some(0)
    );
    let cpu = value(
        &per[talker],
        "container_cpu_usage_seconds_total",
        &["total"],
    );
    assert!(cpu >= Some(1), "{cpu:?}");
    assert!(value(&per[talker], "container_memory_working_set_bytes", &[]) > Some(0));
    let sleeper_m = &per[sleeper];
    assert_eq!(
        value(sleeper_m, "container_spec_memory_limit_bytes", &[]),
        Some(64 << 20)
    );
    assert_eq!(
        value(sleeper_m, "container_spec_cpu_quota", &[]),
        Some(50_000)
    );
    assert!(value(sleeper_m, "container_cpu_cfs_periods_total", &[]).is_some());
    rt.update_container_resources(UpdateContainerResourcesRequest {
        container_id: sleeper.into(),
        linux: Some(LinuxContainerResources {
            memory_limit_in_bytes: 96 << 20,
            cpu_shares: 512,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("UpdateContainerResources");
    let res = status(rt, sleeper).await.resources.unwrap().linux.unwrap();
    assert_eq!(res.memory_limit_in_bytes, 96 << 20);
    let (c, m) = code(
        rt.update_container_resources(UpdateContainerResourcesRequest {
            container_id: sleeper.into(),
            linux: Some(LinuxContainerResources {
                memory_limit_in_bytes: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.starts_with("linux.memory_limit_in_bytes"), "{m}");
    let (c, m) = code(
        rt.update_container_resources(UpdateContainerResourcesRequest {
            container_id: sleeper.into(),
            linux: Some(LinuxContainerResources {
                cpu_quota: -7,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
}

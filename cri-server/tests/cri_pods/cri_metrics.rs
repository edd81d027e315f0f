//! Checks of ListMetricDescriptors / ListPodSandboxMetrics against the names cri-tools' validation suite
//! expects (pkg/validate/pod.go).

use std::collections::HashMap;

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

/// cri-tools `expectedMetricDescriptorNames` but the ones whose values need what the guest kernel leaves
/// out (PSI: container_pressure_*; the hugetlb controller: container_hugetlb_*), which are only described.
pub const EXPECTED_WITH_VALUES: [&str; 48] = [
    "container_blkio_device_usage_total",
    "container_cpu_cfs_periods_total",
    "container_cpu_cfs_throttled_periods_total",
    "container_cpu_cfs_throttled_seconds_total",
    "container_cpu_system_seconds_total",
    "container_cpu_usage_seconds_total",
    "container_cpu_user_seconds_total",
    "container_file_descriptors",
    "container_fs_inodes_free",
    "container_fs_inodes_total",
    "container_fs_limit_bytes",
    "container_fs_reads_bytes_total",
    "container_fs_reads_total",
    "container_fs_usage_bytes",
    "container_fs_writes_bytes_total",
    "container_fs_writes_total",
    "container_last_seen",
    "container_memory_cache",
    "container_memory_failcnt",
    "container_memory_failures_total",
    "container_memory_kernel_usage",
    "container_memory_mapped_file",
    "container_memory_max_usage_bytes",
    "container_memory_rss",
    "container_memory_swap",
    "container_memory_usage_bytes",
    "container_memory_working_set_bytes",
    "container_network_receive_bytes_total",
    "container_network_receive_errors_total",
    "container_network_receive_packets_dropped_total",
    "container_network_receive_packets_total",
    "container_network_transmit_bytes_total",
    "container_network_transmit_errors_total",
    "container_network_transmit_packets_dropped_total",
    "container_network_transmit_packets_total",
    "container_oom_events_total",
    "container_processes",
    "container_sockets",
    "container_spec_cpu_period",
    "container_spec_cpu_quota",
    "container_spec_cpu_shares",
    "container_spec_memory_limit_bytes",
    "container_spec_memory_reservation_limit_bytes",
    "container_spec_memory_swap_limit_bytes",
    "container_start_time_seconds",
    "container_threads",
    "container_threads_max",
    "container_ulimits_soft",
];

/// The value of the first `name` metric whose label values end with `extra`.
pub fn value(metrics: &[Metric], name: &str, extra: &[&str]) -> Option<u64> {
    metrics
        .iter()
        .find(|m| {
            m.name == name
                && m.label_values
                    .ends_with(&extra.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        })
        .and_then(|m| m.value.as_ref())
        .map(|v| v.value)
}

/// Lists the descriptors and the metrics of pod `pod`; checks that every expected name has values with as
/// many labels as its descriptor, and that `containers` each have metrics. Returns the pod-level and the
/// per-container metrics.
pub async fn check(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    containers: &[&str],
) -> (Vec<Metric>, HashMap<String, Vec<Metric>>) {
    let descs = rt
        .list_metric_descriptors(ListMetricDescriptorsRequest {})
        .await
        .expect("ListMetricDescriptors")
        .into_inner()
        .descriptors;
    let keys: HashMap<_, _> = descs
        .iter()
        .map(|d| (d.name.clone(), d.label_keys.len()))
        .collect();
    let all = rt
        .list_pod_sandbox_metrics(ListPodSandboxMetricsRequest {})
        .await
        .expect("ListPodSandboxMetrics")
        .into_inner()
        .pod_metrics;
    let m = all
        .into_iter()
        .find(|m| m.pod_sandbox_id == pod)
        .expect("metrics of the pod");
    let per_container: HashMap<_, _> = m
        .container_metrics
        .into_iter()
        .map(|c| (c.container_id, c.metrics))
        .collect();
    for c in containers {
        assert!(per_container.contains_key(*c), "metrics of container {c}");
    }
    let every = m.metrics.iter().chain(per_container.values().flatten());
    let mut found = HashMap::new();
    for metric in every {
        let n = keys
            .get(&metric.name)
            .unwrap_or_else(|| panic!("{} described", metric.name));
        assert_eq!(metric.label_values.len(), *n, "labels of {metric:?}");
        found.insert(metric.name.as_str(), ());
    }
    let missing: Vec<_> = EXPECTED_WITH_VALUES
        .iter()
        .filter(|n| !found.contains_key(**n))
        .collect();
    assert!(missing.is_empty(), "no values for {missing:?}");
    (m.metrics, per_container)
}

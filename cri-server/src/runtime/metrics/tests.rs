use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_cri::v1::{ContainerConfig, ContainerMetadata, PodSandboxConfig, PodSandboxMetadata};
use prost::Message;

use super::*;
use crate::state::{ContainerState, PodState};

/// cri-tools pkg/validate/pod.go `expectedMetricDescriptorNames` (kubelet with CRI-O and cAdvisor, Kubernetes
/// 1.37): ListMetricDescriptors must list all of them.
const CRITEST_EXPECTED: [&str; 56] = [
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
    "container_hugetlb_max_usage_bytes",
    "container_hugetlb_usage_bytes",
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
    "container_pressure_cpu_stalled_seconds_total",
    "container_pressure_cpu_waiting_seconds_total",
    "container_pressure_io_stalled_seconds_total",
    "container_pressure_io_waiting_seconds_total",
    "container_pressure_memory_stalled_seconds_total",
    "container_pressure_memory_waiting_seconds_total",
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

/// Values that need what the guest kernel leaves out: PSI and the hugetlb controller (cAdvisor reports
/// nothing for them either then).
const GUEST_LACKS: [&str; 8] = [
    "container_hugetlb_max_usage_bytes",
    "container_hugetlb_usage_bytes",
    "container_pressure_cpu_stalled_seconds_total",
    "container_pressure_cpu_waiting_seconds_total",
    "container_pressure_io_stalled_seconds_total",
    "container_pressure_io_waiting_seconds_total",
    "container_pressure_memory_stalled_seconds_total",
    "container_pressure_memory_waiting_seconds_total",
];

fn pod() -> PodRecord {
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: "u1".into(),
            namespace: "shop".into(),
            attempt: 0,
        }),
        ..Default::default()
    };
    PodRecord {
        id: "p".repeat(64),
        name_key: String::new(),
        config: config.encode_to_vec(),
        state: PodState::Ready,
        created_at: 1,
        vcpus: 2,
        mem_mib: 256,
        slots: BTreeMap::new(),
        reason: String::new(),
        released: false,
        network: None,
        cgroups: None,
        runtime_handler: String::new(),
        kind: Default::default(),
        native: None,
    }
}

fn container(id: &str, name: &str) -> ContainerRecord {
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        ..Default::default()
    };
    ContainerRecord {
        id: id.into(),
        pod_id: "p".repeat(64),
        name_key: String::new(),
        config: config.encode_to_vec(),
        image_id: "sha256:abc".into(),
        image_ref: "docker.io/library/busybox:1.36".into(),
        spec_json: Vec::new(),
        stop_signal: 15,
        slot: 1,
        state: ContainerState::Running,
        created_at: 1_700_000_000_000_000_000,
        started_at: 1_700_000_002_500_000_000,
        finished_at: 0,
        exit_code: 0,
        reason: String::new(),
        message: String::new(),
        resources: Vec::new(),
        log_path: String::new(),
        user: None,
    }
}

/// What the agent reads from the cgroup v2 files of a guest container created with critest's metrics
/// resources (cpu.max "20000 100000", cpu.weight 39 from shares 1024, memory.max 64 MiB; no swap in the
/// guest) running busybox: see guest/agent/src/container/stats/tests.rs for the file contents.
fn guest_stats() -> pb::StatsContainerResponse {
    pb::StatsContainerResponse {
        cpu_usage_ns: 1_503_211_000,
        cpu_user_ns: 1_002_114_000,
        cpu_system_ns: 501_097_000,
        memory_usage_bytes: 4_096_000,
        memory_working_set_bytes: 4_096_000 - 2_809_856,
        memory_rss_bytes: 1_191_936,
        memory_limit_bytes: 64 << 20,
        page_faults: 2045,
        major_page_faults: 31,
        oom_kills: 1,
        pids: 3,
        timestamp_unix_ns: 1_700_000_100_000_000_000,
        cpu_periods: 40,
        cpu_throttled_periods: 7,
        cpu_throttled_ns: 2_350_812_000,
        memory_cache_bytes: 3_530_752,
        memory_mapped_file_bytes: 2_433_024,
        memory_kernel_bytes: 749_568,
        memory_max_usage_bytes: 5_242_880,
        memory_failcnt: 12,
        processes: 2,
        file_descriptors: 9,
        sockets: 1,
        nofile_soft_limit: 1024,
        writable_layer_capacity_bytes: 64 << 20,
        writable_layer_used_bytes: 45_056,
        writable_layer_inodes_total: 16_384,
        writable_layer_inodes_free: 16_370,
        block_io: vec![pb::BlockIoStats {
            major: 254,
            minor: 0,
            device: "/dev/vda".into(),
            read_bytes: 1_052_672,
            write_bytes: 0,
            reads: 47,
            writes: 0,
        }],
        cpu_quota_us: 20_000,
        cpu_period_us: 100_000,
        cpu_weight: 39,
        ..Default::default()
    }
}

fn sandbox_stats(ids: &[&str]) -> pb::StatsSandboxResponse {
    pb::StatsSandboxResponse {
        containers: ids
            .iter()
            .map(|id| pb::ContainerStats {
                container_id: id.to_string(),
                stats: Some(guest_stats()),
            })
            .collect(),
        interfaces: vec![pb::InterfaceStats {
            name: "eth0".into(),
            rx_bytes: 104_562,
            rx_packets: 761,
            rx_errors: 1,
            rx_dropped: 2,
            tx_bytes: 23_180,
            tx_packets: 259,
            tx_errors: 4,
            tx_dropped: 5,
        }],
    }
}

#[test]
fn descriptors_cover_the_critest_list() {
    let descs = metric_descriptors();
    let by_name: HashMap<_, _> = descs.iter().map(|d| (d.name.as_str(), d)).collect();
    assert_eq!(by_name.len(), descs.len(), "unique names");
    for name in CRITEST_EXPECTED {
        let d = by_name
            .get(name)
            .unwrap_or_else(|| panic!("{name} described"));
        assert!(!d.help.is_empty(), "{name} help");
        assert_eq!(d.label_keys[..6], BASE_LABELS, "{name} base labels");
    }
    let keys = |n: &str| by_name[n].label_keys[6..].to_vec();
    assert_eq!(keys("container_cpu_usage_seconds_total"), ["cpu"]);
    assert_eq!(
        keys("container_memory_failures_total"),
        ["failure_type", "scope"]
    );
    assert_eq!(keys("container_network_receive_bytes_total"), ["interface"]);
    assert_eq!(keys("container_fs_usage_bytes"), ["device"]);
    assert_eq!(
        keys("container_blkio_device_usage_total"),
        ["device", "major", "minor", "operation"]
    );
    assert!(keys("container_memory_rss").is_empty());
}

#[test]
fn pod_metrics_have_every_value_the_guest_can_give() {
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    let containers = [container(&a, "app"), container(&b, "sidecar")];
    let now = 1_700_000_100_500_000_000;
    let m = pod_metrics(&pod(), &containers, &sandbox_stats(&[&a, &b, "gone"]), now);
    assert_eq!(m.pod_sandbox_id, "p".repeat(64));
    assert_eq!(m.container_metrics.len(), 2, "unknown containers left out");

    let descs: HashMap<String, MetricDescriptor> = metric_descriptors()
        .into_iter()
        .map(|d| (d.name.clone(), d))
        .collect();
    let all = m
        .metrics
        .iter()
        .chain(m.container_metrics.iter().flat_map(|c| &c.metrics));
    let mut seen = HashSet::new();
    for metric in all {
        let d = &descs[&metric.name];
        assert_eq!(
            metric.label_values.len(),
            d.label_keys.len(),
            "{}",
            metric.name
        );
        // cAdvisor's counters: the `_total`s but the inode count, and failcnt.
        let counter = (metric.name.ends_with("_total")
            && metric.name != "container_fs_inodes_total")
            || metric.name == "container_memory_failcnt";
        let want = if counter { C } else { G };
        assert_eq!(metric.metric_type, want as i32, "{}", metric.name);
        seen.insert(metric.name.as_str());
    }
    for name in CRITEST_EXPECTED {
        assert_eq!(
            seen.contains(name),
            !GUEST_LACKS.contains(&name),
            "{name} has values"
        );
    }

    // The network is the pod's.
    let rx = &m.metrics[0];
    assert_eq!(rx.name, "container_network_receive_bytes_total");
    let p = "p".repeat(64);
    assert_eq!(
        rx.label_values,
        ["POD", p.as_str(), "", p.as_str(), "shop", "web", "eth0"]
    );
    assert_eq!(rx.value.as_ref().unwrap().value, 104_562);
    assert!(m.container_metrics[0]
        .metrics
        .iter()
        .all(|x| !x.name.starts_with("container_network_")));

    let app = &m.container_metrics[0];
    assert_eq!(app.container_id, a);
    let value = |name: &str, extra: &[&str]| -> u64 {
        let found: Vec<_> = app
            .metrics
            .iter()
            .filter(|x| x.name == name && x.label_values[6..] == *extra)
            .collect();
        assert_eq!(found.len(), 1, "{name}{extra:?}");
        found[0].value.as_ref().unwrap().value
    };
    assert_eq!(
        app.metrics[0].label_values,
        [
            "app",
            a.as_str(),
            "docker.io/library/busybox:1.36",
            a.as_str(),
            "shop",
            "web",
            "total"
        ]
    );
    assert_eq!(app.metrics[0].timestamp, 1_700_000_100_000_000_000);
    // Seconds are whole.
    assert_eq!(value("container_cpu_usage_seconds_total", &["total"]), 1);
    assert_eq!(value("container_cpu_user_seconds_total", &[]), 1);
    assert_eq!(value("container_cpu_system_seconds_total", &[]), 0);
    assert_eq!(value("container_cpu_cfs_throttled_seconds_total", &[]), 2);
    assert_eq!(value("container_cpu_cfs_periods_total", &[]), 40);
    assert_eq!(value("container_memory_working_set_bytes", &[]), 1_286_144);
    assert_eq!(
        value(
            "container_memory_failures_total",
            &["pgmajfault", "hierarchy"]
        ),
        31
    );
    assert_eq!(
        value("container_memory_failures_total", &["pgfault", "container"]),
        2045
    );
    assert_eq!(value("container_oom_events_total", &[]), 1);
    assert_eq!(value("container_fs_limit_bytes", &["tmpfs"]), 64 << 20);
    assert_eq!(
        value("container_fs_reads_bytes_total", &["/dev/vda"]),
        1_052_672
    );
    assert_eq!(
        value(
            "container_blkio_device_usage_total",
            &["/dev/vda", "254", "0", "Read"]
        ),
        1_052_672
    );
    // cpu.weight 39 back to shares as cAdvisor converts it (runc wrote 39 for 1024 shares).
    assert_eq!(value("container_spec_cpu_shares", &[]), 998);
    assert_eq!(value("container_spec_cpu_quota", &[]), 20_000);
    assert_eq!(value("container_spec_memory_limit_bytes", &[]), 64 << 20);
    assert_eq!(value("container_spec_memory_swap_limit_bytes", &[]), 0);
    assert_eq!(value("container_start_time_seconds", &[]), 1_700_000_002);
    assert_eq!(value("container_last_seen", &[]), 1_700_000_100);
    assert_eq!(value("container_ulimits_soft", &["max_open_files"]), 1024);
    assert_eq!(
        (
            value("container_threads", &[]),
            value("container_processes", &[])
        ),
        (3, 2)
    );
}

#[test]
fn no_quota_no_cfs_figures_and_pressure_when_the_guest_has_psi() {
    let a = "a".repeat(64);
    let mut s = sandbox_stats(&[&a]);
    let stats = s.containers[0].stats.as_mut().unwrap();
    stats.cpu_quota_us = 0;
    stats.pressure = Some(pb::Pressure {
        cpu_some_us: 3_500_000,
        ..Default::default()
    });
    let m = pod_metrics(&pod(), &[container(&a, "app")], &s, 1);
    let names: HashSet<_> = m.container_metrics[0]
        .metrics
        .iter()
        .map(|x| x.name.as_str())
        .collect();
    for gone in [
        "container_cpu_cfs_periods_total",
        "container_cpu_cfs_throttled_periods_total",
        "container_cpu_cfs_throttled_seconds_total",
        "container_spec_cpu_quota",
    ] {
        assert!(!names.contains(gone), "{gone}");
    }
    let waiting = m.container_metrics[0]
        .metrics
        .iter()
        .find(|x| x.name == "container_pressure_cpu_waiting_seconds_total")
        .unwrap();
    assert_eq!(waiting.value.as_ref().unwrap().value, 3);
    assert_eq!(weight_to_shares(1), 2);
    assert_eq!(weight_to_shares(10_000), 262_144);
}

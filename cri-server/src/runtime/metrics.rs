//! ListMetricDescriptors / ListPodSandboxMetrics: cAdvisor's `container_*` metrics (names, types, help text,
//! label keys) from the guest's cgroups and interfaces. With a VM, cAdvisor on the host only sees the VM's
//! threads, so these are the only per-container numbers.
//!
//! Values are whole numbers (CRI carries `uint64`): seconds are truncated, as in CRI-O and containerd. Every
//! metric carries [`BASE_LABELS`] then its own labels. Per container: what its guest cgroup, processes and
//! writable layer give; per pod (`PodSandboxMetrics.metrics`, `container="POD"` as kubelet labels the
//! sandbox): the network counters of the guest's interfaces, which all its containers share.

use k8s_cri::v1::{ContainerMetrics, Metric, MetricDescriptor, MetricType, PodSandboxMetrics};
use podvisor_proto as pb;

use crate::state::{ContainerRecord, PodRecord};

/// The labels of every metric, in order: those kubelet's cAdvisor endpoint puts on container series, sorted
/// as Prometheus exposes them.
pub const BASE_LABELS: [&str; 6] = ["container", "id", "image", "name", "namespace", "pod"];

/// One metric: name, help, type and its labels after [`BASE_LABELS`].
struct Def(
    &'static str,
    &'static str,
    MetricType,
    &'static [&'static str],
);

use MetricType::{Counter as C, Gauge as G};

const DEVICE: &[&str] = &["device"];
const IFACE: &[&str] = &["interface"];

/// Every metric this runtime describes, as cAdvisor names and documents them.
#[rustfmt::skip]
const DEFS: &[Def] = &[
    Def("container_blkio_device_usage_total", "Blkio Device bytes usage", C, &["device", "major", "minor", "operation"]),
    Def("container_cpu_cfs_periods_total", "Number of elapsed enforcement period intervals.", C, &[]),
    Def("container_cpu_cfs_throttled_periods_total", "Number of throttled period intervals.", C, &[]),
    Def("container_cpu_cfs_throttled_seconds_total", "Total time duration the container has been throttled.", C, &[]),
    Def("container_cpu_system_seconds_total", "Cumulative system cpu time consumed in seconds.", C, &[]),
    Def("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", C, &["cpu"]),
    Def("container_cpu_user_seconds_total", "Cumulative user cpu time consumed in seconds.", C, &[]),
    Def("container_file_descriptors", "Number of open file descriptors for the container.", G, &[]),
    Def("container_fs_inodes_free", "Number of available Inodes", G, DEVICE),
    Def("container_fs_inodes_total", "Number of Inodes", G, DEVICE),
    Def("container_fs_limit_bytes", "Number of bytes that can be consumed by the container on this filesystem.", G, DEVICE),
    Def("container_fs_reads_bytes_total", "Cumulative count of bytes read", C, DEVICE),
    Def("container_fs_reads_total", "Cumulative count of reads completed", C, DEVICE),
    Def("container_fs_usage_bytes", "Number of bytes that are consumed by the container on this filesystem.", G, DEVICE),
    Def("container_fs_writes_bytes_total", "Cumulative count of bytes written", C, DEVICE),
    Def("container_fs_writes_total", "Cumulative count of writes completed", C, DEVICE),
    Def("container_hugetlb_max_usage_bytes", "Maximum hugepage usages recorded", G, &["pagesize"]),
    Def("container_hugetlb_usage_bytes", "Current hugepage usage", G, &["pagesize"]),
    Def("container_last_seen", "Last time a container was seen by the exporter", G, &[]),
    Def("container_memory_cache", "Number of bytes of page cache memory.", G, &[]),
    Def("container_memory_failcnt", "Number of memory usage hits limits", C, &[]),
    Def("container_memory_failures_total", "Cumulative count of memory allocation failures.", C, &["failure_type", "scope"]),
    Def("container_memory_kernel_usage", "Size of kernel memory allocated in bytes.", G, &[]),
    Def("container_memory_mapped_file", "Size of memory mapped files in bytes.", G, &[]),
    Def("container_memory_max_usage_bytes", "Maximum memory usage recorded in bytes", G, &[]),
    Def("container_memory_rss", "Size of RSS in bytes.", G, &[]),
    Def("container_memory_swap", "Container swap usage in bytes.", G, &[]),
    Def("container_memory_usage_bytes", "Current memory usage in bytes, including all memory regardless of when it was accessed", G, &[]),
    Def("container_memory_working_set_bytes", "Current working set in bytes.", G, &[]),
    Def("container_network_receive_bytes_total", "Cumulative count of bytes received", C, IFACE),
    Def("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving", C, IFACE),
    Def("container_network_receive_packets_dropped_total", "Cumulative count of packets dropped while receiving", C, IFACE),
    Def("container_network_receive_packets_total", "Cumulative count of packets received", C, IFACE),
    Def("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted", C, IFACE),
    Def("container_network_transmit_errors_total", "Cumulative count of errors encountered while transmitting", C, IFACE),
    Def("container_network_transmit_packets_dropped_total", "Cumulative count of packets dropped while transmitting", C, IFACE),
    Def("container_network_transmit_packets_total", "Cumulative count of packets transmitted", C, IFACE),
    Def("container_oom_events_total", "Count of out of memory events observed for the container", C, &[]),
    Def("container_pressure_cpu_stalled_seconds_total", "Total time duration no tasks in the container could make progress due to CPU congestion.", C, &[]),
    Def("container_pressure_cpu_waiting_seconds_total", "Total time duration tasks in the container have waited due to CPU congestion.", C, &[]),
    Def("container_pressure_io_stalled_seconds_total", "Total time duration no tasks in the container could make progress due to IO congestion.", C, &[]),
    Def("container_pressure_io_waiting_seconds_total", "Total time duration tasks in the container have waited due to IO congestion.", C, &[]),
    Def("container_pressure_memory_stalled_seconds_total", "Total time duration no tasks in the container could make progress due to memory congestion.", C, &[]),
    Def("container_pressure_memory_waiting_seconds_total", "Total time duration tasks in the container have waited due to memory congestion.", C, &[]),
    Def("container_processes", "Number of processes running inside the container.", G, &[]),
    Def("container_sockets", "Number of open sockets for the container.", G, &[]),
    Def("container_spec_cpu_period", "CPU period of the container.", G, &[]),
    Def("container_spec_cpu_quota", "CPU quota of the container.", G, &[]),
    Def("container_spec_cpu_shares", "CPU share of the container.", G, &[]),
    Def("container_spec_memory_limit_bytes", "Memory limit for the container.", G, &[]),
    Def("container_spec_memory_reservation_limit_bytes", "Memory reservation limit for the container.", G, &[]),
    Def("container_spec_memory_swap_limit_bytes", "Memory swap limit for the container.", G, &[]),
    Def("container_start_time_seconds", "Start time of the container since unix epoch in seconds.", G, &[]),
    Def("container_threads", "Number of threads running inside the container", G, &[]),
    Def("container_threads_max", "Maximum number of threads allowed inside the container, infinity if value is zero", G, &[]),
    Def("container_ulimits_soft", "Soft ulimit values for the container root process. Unlimited if -1, except priority and nice", G, &["ulimit"]),
];

/// ListMetricDescriptors: every metric of [`DEFS`].
pub fn metric_descriptors() -> Vec<MetricDescriptor> {
    DEFS.iter()
        .map(|Def(name, help, _, extra)| MetricDescriptor {
            name: (*name).into(),
            help: (*help).into(),
            label_keys: BASE_LABELS
                .iter()
                .chain(extra.iter())
                .map(|k| k.to_string())
                .collect(),
        })
        .collect()
}

/// Collects the metrics of one subject (a container, or the pod) at one timestamp.
struct Out {
    base: Vec<String>,
    ts: i64,
    metrics: Vec<Metric>,
}

impl Out {
    fn new(base: [&str; 6], ts: i64) -> Self {
        Self {
            base: base.iter().map(|v| v.to_string()).collect(),
            ts,
            metrics: Vec::new(),
        }
    }

    /// Adds `name{base..., extra...} value`; `extra` matches the metric's own labels.
    fn add(&mut self, name: &'static str, extra: &[&str], value: u64) {
        let def = DEFS.iter().find(|d| d.0 == name).expect("metric in DEFS");
        debug_assert_eq!(def.3.len(), extra.len(), "labels of {name}");
        let mut label_values = self.base.clone();
        label_values.extend(extra.iter().map(|v| v.to_string()));
        self.metrics.push(Metric {
            name: name.into(),
            timestamp: self.ts,
            metric_type: def.2 as i32,
            label_values,
            value: Some(k8s_cri::v1::UInt64Value { value }),
        });
    }
}

const NS_PER_S: u64 = 1_000_000_000;

/// cgroup v2 cpu.weight as cgroup v1 cpu.shares, as cAdvisor converts it ([1, 10000] to [2, 262144]).
fn weight_to_shares(weight: u64) -> u64 {
    2 + (weight.saturating_sub(1) * 262_142) / 9_999
}

/// The metrics of container `c` from its guest stats `s`, at `now` (ns since the epoch).
pub fn container_metrics(
    pod: &PodRecord,
    c: &ContainerRecord,
    s: &pb::StatsContainerResponse,
    now: i64,
) -> ContainerMetrics {
    let meta = pod.cri_config().metadata.unwrap_or_default();
    let name = c.cri_config().metadata.map(|m| m.name).unwrap_or_default();
    let base = [
        name.as_str(),
        c.id.as_str(),
        c.image_ref.as_str(),
        c.id.as_str(),
        meta.namespace.as_str(),
        meta.name.as_str(),
    ];
    let ts = if s.timestamp_unix_ns > 0 {
        s.timestamp_unix_ns as i64
    } else {
        now
    };
    let mut out = Out::new(base, ts);
    cpu(&mut out, s);
    memory(&mut out, s);
    processes(&mut out, s);
    filesystem(&mut out, s);
    spec(&mut out, s);
    let started = if c.started_at > 0 {
        c.started_at
    } else {
        c.created_at
    };
    out.add(
        "container_start_time_seconds",
        &[],
        started.max(0) as u64 / NS_PER_S,
    );
    out.add("container_last_seen", &[], now.max(0) as u64 / NS_PER_S);
    ContainerMetrics {
        container_id: c.id.clone(),
        metrics: out.metrics,
    }
}

fn cpu(out: &mut Out, s: &pb::StatsContainerResponse) {
    out.add(
        "container_cpu_usage_seconds_total",
        &["total"],
        s.cpu_usage_ns / NS_PER_S,
    );
    out.add(
        "container_cpu_user_seconds_total",
        &[],
        s.cpu_user_ns / NS_PER_S,
    );
    out.add(
        "container_cpu_system_seconds_total",
        &[],
        s.cpu_system_ns / NS_PER_S,
    );
    // cAdvisor reports CFS figures only for a container with a quota.
    if s.cpu_quota_us > 0 {
        out.add("container_cpu_cfs_periods_total", &[], s.cpu_periods);
        out.add(
            "container_cpu_cfs_throttled_periods_total",
            &[],
            s.cpu_throttled_periods,
        );
        out.add(
            "container_cpu_cfs_throttled_seconds_total",
            &[],
            s.cpu_throttled_ns / NS_PER_S,
        );
    }
    if let Some(p) = &s.pressure {
        let us = 1_000_000;
        out.add(
            "container_pressure_cpu_waiting_seconds_total",
            &[],
            p.cpu_some_us / us,
        );
        out.add(
            "container_pressure_cpu_stalled_seconds_total",
            &[],
            p.cpu_full_us / us,
        );
        out.add(
            "container_pressure_io_waiting_seconds_total",
            &[],
            p.io_some_us / us,
        );
        out.add(
            "container_pressure_io_stalled_seconds_total",
            &[],
            p.io_full_us / us,
        );
        out.add(
            "container_pressure_memory_waiting_seconds_total",
            &[],
            p.memory_some_us / us,
        );
        out.add(
            "container_pressure_memory_stalled_seconds_total",
            &[],
            p.memory_full_us / us,
        );
    }
}

fn memory(out: &mut Out, s: &pb::StatsContainerResponse) {
    out.add("container_memory_usage_bytes", &[], s.memory_usage_bytes);
    out.add(
        "container_memory_working_set_bytes",
        &[],
        s.memory_working_set_bytes,
    );
    out.add("container_memory_rss", &[], s.memory_rss_bytes);
    out.add("container_memory_cache", &[], s.memory_cache_bytes);
    out.add("container_memory_swap", &[], s.memory_swap_bytes);
    out.add(
        "container_memory_mapped_file",
        &[],
        s.memory_mapped_file_bytes,
    );
    out.add("container_memory_kernel_usage", &[], s.memory_kernel_bytes);
    out.add(
        "container_memory_max_usage_bytes",
        &[],
        s.memory_max_usage_bytes,
    );
    out.add("container_memory_failcnt", &[], s.memory_failcnt);
    // cgroup v2 counts faults of the cgroup and its children alike: both scopes get the same numbers.
    for scope in ["container", "hierarchy"] {
        out.add(
            "container_memory_failures_total",
            &["pgfault", scope],
            s.page_faults,
        );
        out.add(
            "container_memory_failures_total",
            &["pgmajfault", scope],
            s.major_page_faults,
        );
    }
    out.add("container_oom_events_total", &[], s.oom_kills);
}

fn processes(out: &mut Out, s: &pb::StatsContainerResponse) {
    out.add("container_processes", &[], s.processes);
    out.add("container_threads", &[], s.pids);
    out.add("container_threads_max", &[], s.pids_limit);
    out.add("container_file_descriptors", &[], s.file_descriptors);
    out.add("container_sockets", &[], s.sockets);
    if s.nofile_soft_limit > 0 {
        out.add(
            "container_ulimits_soft",
            &["max_open_files"],
            s.nofile_soft_limit,
        );
    }
}

/// The writable layer (a tmpfs in the guest: device "tmpfs") and the block devices' I/O.
fn filesystem(out: &mut Out, s: &pb::StatsContainerResponse) {
    if s.writable_layer_capacity_bytes > 0 {
        let dev = &["tmpfs"];
        out.add("container_fs_usage_bytes", dev, s.writable_layer_used_bytes);
        out.add(
            "container_fs_limit_bytes",
            dev,
            s.writable_layer_capacity_bytes,
        );
        out.add(
            "container_fs_inodes_total",
            dev,
            s.writable_layer_inodes_total,
        );
        out.add(
            "container_fs_inodes_free",
            dev,
            s.writable_layer_inodes_free,
        );
    }
    for d in &s.block_io {
        let dev = &[d.device.as_str()];
        out.add("container_fs_reads_bytes_total", dev, d.read_bytes);
        out.add("container_fs_reads_total", dev, d.reads);
        out.add("container_fs_writes_bytes_total", dev, d.write_bytes);
        out.add("container_fs_writes_total", dev, d.writes);
        let (major, minor) = (d.major.to_string(), d.minor.to_string());
        for (op, v) in [("Read", d.read_bytes), ("Write", d.write_bytes)] {
            let labels = [d.device.as_str(), major.as_str(), minor.as_str(), op];
            out.add("container_blkio_device_usage_total", &labels, v);
        }
    }
}

/// Limits, from the cgroup files as cAdvisor reads them (0: unlimited).
fn spec(out: &mut Out, s: &pb::StatsContainerResponse) {
    out.add("container_spec_cpu_period", &[], s.cpu_period_us);
    if s.cpu_quota_us > 0 {
        out.add("container_spec_cpu_quota", &[], s.cpu_quota_us);
    }
    if s.cpu_weight > 0 {
        out.add(
            "container_spec_cpu_shares",
            &[],
            weight_to_shares(s.cpu_weight),
        );
    }
    out.add(
        "container_spec_memory_limit_bytes",
        &[],
        s.memory_limit_bytes,
    );
    out.add(
        "container_spec_memory_reservation_limit_bytes",
        &[],
        s.memory_reservation_bytes,
    );
    out.add(
        "container_spec_memory_swap_limit_bytes",
        &[],
        s.memory_swap_limit_bytes,
    );
}

/// The metrics of a pod: its network counters (pod level) and each of its containers' metrics.
pub fn pod_metrics(
    pod: &PodRecord,
    containers: &[ContainerRecord],
    s: &pb::StatsSandboxResponse,
    now: i64,
) -> PodSandboxMetrics {
    let meta = pod.cri_config().metadata.unwrap_or_default();
    let base = [
        "POD",
        pod.id.as_str(),
        "",
        pod.id.as_str(),
        &meta.namespace,
        &meta.name,
    ];
    let mut out = Out::new(base, now);
    for i in &s.interfaces {
        let l = &[i.name.as_str()];
        out.add("container_network_receive_bytes_total", l, i.rx_bytes);
        out.add("container_network_receive_packets_total", l, i.rx_packets);
        out.add("container_network_receive_errors_total", l, i.rx_errors);
        out.add(
            "container_network_receive_packets_dropped_total",
            l,
            i.rx_dropped,
        );
        out.add("container_network_transmit_bytes_total", l, i.tx_bytes);
        out.add("container_network_transmit_packets_total", l, i.tx_packets);
        out.add("container_network_transmit_errors_total", l, i.tx_errors);
        out.add(
            "container_network_transmit_packets_dropped_total",
            l,
            i.tx_dropped,
        );
    }
    let container_metrics = s
        .containers
        .iter()
        .filter_map(|cs| {
            let c = containers.iter().find(|c| c.id == cs.container_id)?;
            Some(container_metrics(pod, c, cs.stats.as_ref()?, now))
        })
        .collect();
    PodSandboxMetrics {
        pod_sandbox_id: pod.id.clone(),
        metrics: out.metrics,
        container_metrics,
    }
}

#[cfg(test)]
mod tests;

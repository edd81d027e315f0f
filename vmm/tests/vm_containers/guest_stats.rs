//! Checks of the agent's StatsSandbox answer for a running container in a real guest.

use podvisor_proto as pb;
use tonic::transport::Channel;
use tonic::Code;

/// StatsSandbox for running container `id` (plus an unknown id, left out): the guest's cgroup v2, /proc and
/// writable layer figures are there and plausible. Prints them. Returns the answer.
pub async fn check(agent: &mut pb::AgentClient<Channel>, id: &str) -> pb::StatsSandboxResponse {
    let r = agent
        .stats_sandbox(pb::StatsSandboxRequest {
            container_ids: vec![id.into(), "no-such-container".into()],
        })
        .await
        .expect("StatsSandbox")
        .into_inner();
    eprintln!("StatsSandbox: {r:?}");
    assert_eq!(r.containers.len(), 1, "unknown ids are left out: {r:?}");
    assert_eq!(r.containers[0].container_id, id);
    let s = r.containers[0].stats.as_ref().expect("stats");
    assert!(
        s.cpu_usage_ns > 0 && s.cpu_usage_ns >= s.cpu_user_ns,
        "{s:?}"
    );
    // No quota: cpu.max is "max 100000".
    assert_eq!((s.cpu_quota_us, s.cpu_period_us), (0, 100_000), "{s:?}");
    assert!((1..=10_000).contains(&s.cpu_weight), "{s:?}");
    assert!(s.memory_usage_bytes > 0 && s.memory_working_set_bytes <= s.memory_usage_bytes);
    assert!(
        s.memory_max_usage_bytes >= s.memory_usage_bytes,
        "memory.peak: {s:?}"
    );
    assert!(s.memory_rss_bytes > 0 && s.memory_kernel_bytes > 0, "{s:?}");
    assert!(s.processes >= 2 && s.pids >= s.processes, "{s:?}");
    // Every process has its stdio open.
    assert!(s.file_descriptors >= 3 * s.processes, "{s:?}");
    assert!(s.nofile_soft_limit > 0, "{s:?}");
    assert!(
        s.writable_layer_capacity_bytes > s.writable_layer_used_bytes,
        "{s:?}"
    );
    assert!(
        s.writable_layer_inodes_total > s.writable_layer_inodes_free,
        "{s:?}"
    );
    assert!(s.pressure.is_none(), "the guest kernel has no PSI");
    let many = agent
        .stats_sandbox(pb::StatsSandboxRequest {
            container_ids: vec![id.into(); 257],
        })
        .await
        .unwrap_err();
    assert_eq!(many.code(), Code::InvalidArgument, "{many:?}");
    r
}

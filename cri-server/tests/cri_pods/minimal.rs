//! The "minimal client" pass of the pod e2e test (`cri_pods/main.rs`): a pod and a container configured
//! as crictl and critest configure them (metadata, image and command only: no hostname, DNS config,
//! log directory or resources), and every status read back complete, with containerd's defaults.

use std::time::Duration;

use k8s_cri::v1::*;

use super::{wait_exited, Rt};
use podvisor_testkit::cri::{create_container, list_containers, list_pods, run_pod};

/// Runs pod `db` (uid `uid-b`) as a minimal client configures it, with one minimal container from
/// `image`; checks every status, stops the container (exit 0 on SIGTERM) and returns the pod id.
pub async fn minimal_pod(rt: &mut Rt, image: &str) -> String {
    let config = pod_config("db", "uid-b");
    let pod = run_pod(rt, &config).await;
    let command = ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"];
    let c = create_container(rt, &pod, container_config("once", image, &command), &config).await;
    rt.start_container(StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    check_statuses(rt, &pod, &c, image).await;
    rt.stop_container(StopContainerRequest {
        container_id: c.clone(),
        timeout: 30,
    })
    .await
    .unwrap();
    let s = wait_exited(rt, &c, Duration::from_secs(180)).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"), "{s:?}");
    pod
}

/// A pod config with only metadata.
pub fn pod_config(name: &str, uid: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: podvisor_testkit::cri::pod_config(name, uid, std::path::Path::new("")).metadata,
        ..Default::default()
    }
}

/// A container config with only metadata, image and command.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    let full = podvisor_testkit::cri::container_config(name, image, command, 0);
    ContainerConfig {
        metadata: full.metadata,
        image: full.image,
        command: full.command,
        ..Default::default()
    }
}

/// The node's hostname and its non-loopback name servers: what a pod without hostname and DNS
/// config gets (containerd's defaults).
fn node_defaults() -> (String, Vec<String>) {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let servers = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .map(|s| s.trim().to_string())
        .filter(|s| {
            s.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .collect();
    (hostname, servers)
}

/// Reads back the minimal pod `pod` and its running container `ctr` (from `image`) and checks every
/// field a client reads.
pub async fn check_statuses(rt: &mut Rt, pod: &str, ctr: &str, image: &str) {
    let st = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    let ps = st.status.expect("status");
    assert_eq!(ps.id, pod);
    assert_eq!(ps.metadata.as_ref().unwrap().name, "db");
    assert_eq!(ps.state, PodSandboxState::SandboxReady as i32);
    assert!(ps.created_at > 0);
    let ip = &ps.network.as_ref().expect("network").ip;
    assert!(ip.parse::<std::net::IpAddr>().is_ok(), "pod ip {ip:?}");
    assert!(ps.linux.is_some());
    assert_eq!(st.containers_statuses.len(), 1);

    let (hostname, servers) = node_defaults();
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: ctr.into(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "hostname; echo \"env=$HOSTNAME\"; cat /etc/hostname /etc/resolv.conf".into(),
            ],
            timeout: 120,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.exit_code, 0, "{stdout}");
    assert!(
        stdout.starts_with(&format!("{hostname}\nenv={hostname}\n{hostname}\n")),
        "the node's hostname: {stdout}"
    );
    for server in servers {
        assert!(
            stdout.contains(&format!("nameserver {server}")),
            "the node's DNS: {stdout}"
        );
    }

    let s = rt
        .container_status(ContainerStatusRequest {
            container_id: ctr.into(),
            verbose: false,
        })
        .await
        .expect("ContainerStatus")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(s.id, ctr);
    assert_eq!(s.metadata.as_ref().unwrap().name, "once");
    assert_eq!(s.state, ContainerState::ContainerRunning as i32);
    assert!(s.created_at > 0 && s.started_at >= s.created_at, "{s:?}");
    assert_eq!((s.finished_at, s.exit_code), (0, 0));
    assert_eq!(s.image.as_ref().unwrap().image, image);
    assert!(s.image_ref.contains("@sha256:"), "{}", s.image_ref);
    assert!(s.image_id.starts_with("sha256:"), "{}", s.image_id);
    assert!(s.reason.is_empty() && s.message.is_empty(), "{s:?}");
    assert!(s.log_path.is_empty(), "no log without a log directory");
    assert!(s.mounts.is_empty());
    let user = s
        .user
        .as_ref()
        .and_then(|u| u.linux.as_ref())
        .expect("user");
    assert_eq!((user.uid, user.gid), (0, 0), "the image's root: {user:?}");
    let by_pod = ContainerFilter {
        pod_sandbox_id: pod.into(),
        ..Default::default()
    };
    let listed = list_containers(rt, Some(by_pod)).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].image_ref, s.image_id,
        "ListContainers: the image id"
    );
    let pods = list_pods(rt).await;
    assert!(pods.iter().any(|p| p.id == pod
        && p.state == PodSandboxState::SandboxReady as i32
        && p.runtime_handler.is_empty()));
}

//! Self-contained steps of the scenario: the sandbox and image set-up, an OOM kill, refused requests,
//! and the tear-down that must leave nothing behind.

use std::time::{Duration, Instant};

use pb::AgentClient;
use podvisor_proto as pb;
use tonic::transport::Channel;
use tonic::Code;

use super::oci::spec;
use super::{container, create, exec_req, wait, Timings};

/// GuestDetails, CreateSandbox (as the daemon sends it) and the image storage; returns whether the
/// pod avoids AVX.
pub async fn set_up(agent: &mut AgentClient<Channel>, t: &mut Timings) -> bool {
    let details = t
        .time(
            "GuestDetails",
            agent.guest_details(pb::GuestDetailsRequest {}),
        )
        .await
        .unwrap()
        .into_inner();
    eprintln!("guest: {details:?}");
    for c in ["memory", "pids", "cpu"] {
        assert!(
            details.cgroup_controllers.iter().any(|x| x == c),
            "{details:?}"
        );
    }
    // As the daemon sets it: whether vmm::default_cmdline passed `noxsave` on this host.
    let avoid_avx = vmm::KvmHost::detect().guest_xsave_disabled();
    let sandbox = pb::CreateSandboxRequest {
        hostname: "pod-a".into(),
        avoid_avx,
        dns_servers: vec!["10.96.0.10".into()],
        dns_searches: vec!["default.svc.cluster.local".into()],
        dns_options: vec!["ndots:5".into()],
        time_unix_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        entropy: vec![7; 64],
        ..Default::default()
    };
    t.time("CreateSandbox", agent.create_sandbox(sandbox))
        .await
        .unwrap();
    t.time(
        "AddStorage",
        agent.add_storage(pb::AddStorageRequest {
            id: "busybox".into(),
            block_slot: 0,
            fstype: "ext4".into(),
            read_only: true,
            mount_point: None,
            image_path: None,
            timeout_ms: 60_000,
        }),
    )
    .await
    .unwrap();
    avoid_avx
}

/// c3: memory-limited, touches more than the limit: OOM event, exit 137, oom_killed; the events seen
/// meanwhile include c1's exit.
pub async fn oom_kill(agent: &mut AgentClient<Channel>, events: &mut tonic::Streaming<pb::Event>) {
    let hog = spec(
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        Some(16 << 20),
    );
    agent.create_container(create("c3", hog)).await.unwrap();
    agent.start_container(container("c3")).await.unwrap();
    let waited = wait(agent, "c3", "").await;
    assert_eq!(
        (waited.exit_code, waited.signal, waited.oom_killed),
        (137, 9, true),
        "{waited:?}"
    );
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen
        .iter()
        .any(|e: &pb::Event| e.kind() == pb::EventKind::Oom && e.container_id == "c3")
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = tokio::time::timeout(left, events.message())
            .await
            .expect("OOM event in time")
            .unwrap()
            .unwrap();
        seen.push(e);
    }
    assert!(
        seen.iter()
            .any(|e| e.kind() == pb::EventKind::Exit && e.container_id == "c1" && e.exit_code == 7),
        "{seen:?}"
    );
}

/// Bad requests: clear codes, nothing left behind.
pub async fn bad_requests(agent: &mut AgentClient<Channel>) {
    let code =
        |r: Result<tonic::Response<pb::CreateContainerResponse>, tonic::Status>| r.unwrap_err();
    let e = code(
        agent
            .create_container(create("bad/id", spec(&["true"], None)))
            .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("container_id:"), "{}", e.message());
    assert_eq!(
        code(
            agent
                .create_container(create("c1", spec(&["true"], None)))
                .await
        )
        .code(),
        Code::AlreadyExists
    );
    let mut req = create("c5", spec(&["true"], None));
    req.image_storage_id = "nope".into();
    assert_eq!(
        code(agent.create_container(req).await).code(),
        Code::NotFound
    );
    let e = code(agent.create_container(create("c5", b"{}".to_vec())).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("oci_spec_json"), "{}", e.message());
    let e = code(
        agent
            .create_container(create("c5", spec(&["/no/such/binary"], None)))
            .await,
    );
    eprintln!("missing entry point: {:?} {}", e.code(), e.message());
    assert_ne!(e.code(), Code::Ok);
    let gone = agent.stats_container(container("c5")).await.unwrap_err();
    assert_eq!(
        gone.code(),
        Code::NotFound,
        "a failed create leaves no container"
    );
    let e = agent
        .exec_process(exec_req("zz", "e", &["true"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = agent
        .signal_process(pb::SignalProcessRequest {
            container_id: "c2".into(),
            exec_id: String::new(),
            signal: 99,
            all: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

/// Removes every container (removal is idempotent), destroys the sandbox and removes the storage.
pub async fn tear_down(agent: &mut AgentClient<Channel>, t: &mut Timings) {
    for c in ["c1", "c2", "c3", "c4"] {
        let removed = t
            .time("RemoveContainer", agent.remove_container(container(c)))
            .await
            .unwrap()
            .into_inner()
            .removed;
        assert!(removed, "{c}");
    }
    assert!(
        !agent
            .remove_container(container("c1"))
            .await
            .unwrap()
            .into_inner()
            .removed
    );
    let destroyed = t
        .time(
            "DestroySandbox",
            agent.destroy_sandbox(pb::DestroySandboxRequest {}),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(destroyed.removed_containers.is_empty());
    t.time(
        "RemoveStorage",
        agent.remove_storage(pb::RemoveStorageRequest {
            id: "busybox".into(),
        }),
    )
    .await
    .unwrap();
}

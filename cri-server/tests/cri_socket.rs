//! Starts the real `podvisor` binary on a temporary socket and talks CRI v1 to it.

use std::process::Command;

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    CheckpointContainerRequest, ListPodSandboxRequest, RuntimeConfigRequest, StatusRequest,
    VersionRequest,
};
use podvisor_testkit::daemon::{connect, Daemon};

#[tokio::test]
async fn version_status_and_clear_unimplemented_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/podvisor.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    cmd.args(["--metrics-addr", "127.0.0.1:0"]);
    cmd.arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"));
    let daemon = Daemon::start(cmd, &socket, dir.path()).await;
    let mut client = RuntimeServiceClient::new(connect(socket.clone()).await);
    let version = client
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.runtime_name, "podvisor");
    assert_eq!(version.runtime_api_version, "v1");

    let status = client
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let conditions = status.status.unwrap().conditions;
    let runtime = conditions
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .unwrap();
    // The guest directory is empty, so the runtime cannot be ready whatever the host.
    assert!(!runtime.status);
    assert!(!runtime.reason.is_empty());
    assert!(conditions
        .iter()
        .any(|c| c.r#type == "NetworkReady" && !c.status));

    let pods = client
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(pods.items.is_empty());
    let config = client
        .runtime_config(RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        config.linux.unwrap().cgroup_driver,
        k8s_cri::v1::CgroupDriver::Cgroupfs as i32
    );
    // The one RPC podvisor does not implement says so by name.
    let err = client
        .checkpoint_container(CheckpointContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("checkpoint_container"));
    drop(daemon);
}

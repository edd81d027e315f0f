//! Starts the real `podvisor` binary on a temporary socket and talks CRI v1 to it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ListPodSandboxRequest, StatusRequest, VersionRequest};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(socket: std::path::PathBuf) -> Channel {
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap()
}

#[tokio::test]
async fn version_status_and_clear_unimplemented_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/podvisor.sock");
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--guest-dir")
            .arg(dir.path().join("guest"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

    let err = client
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("list_pod_sandbox"));
    drop(daemon);
}

//! The second half of the pod scenario: the daemon is killed with SIGKILL while it boots a second pod;
//! the restarted daemon reports pod A NOTREADY with its containers EXITED, keeps earlier results,
//! leaves nothing of the half-booted pod, runs new pods (a minimal client's too) and releases every
//! host resource and image lease when the pods are removed.

use std::path::PathBuf;
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::cri::{list_containers, list_pods, pod_config};
use podvisor_testkit::daemon::{connect, Daemon};
use tonic::Code;

use super::{code, files_under, minimal, podvisor, status, Left, Rt};

/// Kills `daemon` while it boots pod B, restarts it and checks what it reports and releases.
pub async fn crash_and_restart(rt: Rt, mut daemon: Daemon, first: Left) {
    // Crash: SIGKILL the daemon while it boots pod B. The sleeper keeps running in pod A until then.
    let mut rt2 = rt.clone();
    let logs_b = first.logs.clone();
    let booting = tokio::spawn(async move {
        rt2.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config("db", "uid-b", &logs_b)),
            runtime_handler: String::new(),
        })
        .await
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    daemon.kill9();
    assert!(booting.await.unwrap().is_err());
    let pods_dir = first.d.join("state/pods");
    assert_eq!(
        std::fs::read_dir(&pods_dir).unwrap().count(),
        2,
        "pod A and the half-booted pod B"
    );

    let daemon = Daemon::start_with(
        podvisor(&first.d),
        &first.socket,
        &first.guest,
        Some(&first.daemon_log),
    )
    .await;
    let chan = connect(first.socket.clone()).await;
    let mut rt = RuntimeServiceClient::new(chan.clone());
    let mut img = ImageServiceClient::new(chan);
    let pods = list_pods(&mut rt).await;
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(
        (pods[0].id.as_str(), pods[0].state),
        (first.pod.as_str(), PodSandboxState::SandboxNotready as i32)
    );
    let s = status(&mut rt, &first.sleeper).await;
    assert_eq!(s.state, ContainerState::ContainerExited as i32, "{s:?}");
    assert!(
        !s.reason.is_empty() && s.message.contains("daemon"),
        "{s:?}"
    );
    assert_eq!(
        status(&mut rt, &first.talker).await.exit_code,
        137,
        "earlier results are kept"
    );
    // Only pod A's console log is left; no VM socket survives the crash.
    let left: Vec<PathBuf> = files_under(&pods_dir);
    assert!(left.iter().all(|p| p.starts_with(&first.pod)), "{left:?}");
    let sockets = files_under(&first.d.join("run/vm"));
    assert!(sockets.is_empty(), "{sockets:?}");
    let (c, _) = code(
        rt.exec_sync(ExecSyncRequest {
            container_id: first.talker.clone(),
            cmd: vec!["true".into()],
            timeout: 5,
        })
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition);

    // The name of the interrupted pod B is free again and the restarted daemon runs pods, for a
    // minimal client too (crictl, critest: metadata only, no hostname, DNS or log directory).
    let pod_b = minimal::minimal_pod(&mut rt, &first.image).await;

    // Stop and remove are idempotent: each is sent twice.
    for p in [&first.pod, &pod_b] {
        let id = || p.to_string();
        for time in ["first", "second"] {
            let stop = StopPodSandboxRequest {
                pod_sandbox_id: id(),
            };
            let stopped = rt.stop_pod_sandbox(stop).await;
            assert!(stopped.is_ok(), "StopPodSandbox, {time} time: {stopped:?}");
        }
        for time in ["first", "second"] {
            let remove = RemovePodSandboxRequest {
                pod_sandbox_id: id(),
            };
            let removed = rt.remove_pod_sandbox(remove).await;
            assert!(
                removed.is_ok(),
                "RemovePodSandbox, {time} time: {removed:?}"
            );
        }
    }
    assert!(list_containers(&mut rt, None).await.is_empty());
    assert!(
        files_under(&pods_dir).is_empty(),
        "{:?}",
        files_under(&pods_dir)
    );
    // Every image lease was released: the image can be removed.
    img.remove_image(RemoveImageRequest {
        image: Some(ImageSpec {
            image: first.image.clone(),
            ..Default::default()
        }),
    })
    .await
    .expect("RemoveImage after all containers are gone");
    drop(daemon);
    // A VM being stopped is not an error: no exit-watch retries while pods stop.
    let log = std::fs::read_to_string(&first.daemon_log).unwrap();
    assert!(
        !log.contains("waiting for the exit"),
        "{}",
        log.lines()
            .filter(|l| l.contains("waiting for the exit"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

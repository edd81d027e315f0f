//! Pod benchmark through the real daemon over CRI: RunPodSandbox until the pod is ready, and
//! CreateContainer + StartContainer, serially and for 5 pods in parallel. The peer in the same run is
//! QEMU's microvm booting the same kernel and initramfs until the agent starts (the guest's share of a
//! pod start). Prints one JSON line per metric:
//! `{"metric":..,"unit":..,"ours":..,"peer":..,"peer_value":..,"ratio":..}`.
//!
//! `cargo bench -p cri-server --bench pods`; PODVISOR_BENCH_PARALLEL (default 5) sets the parallel pods.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../vmm/tests/common/qemu.rs"]
mod qemu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{connect, pod_prerequisites, push_pod_image, Daemon};
use image_service::testing::{self, Registry};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

fn pod_config(name: &str, logs: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        labels: HashMap::new(),
        ..Default::default()
    }
}

/// (RunPodSandbox seconds, Create+Start seconds, pod id).
async fn one_pod(mut rt: Rt, name: String, image: String, logs: PathBuf) -> (f64, f64, String) {
    let config = pod_config(&name, &logs);
    let start = Instant::now();
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let run = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                command: vec!["sleep".into(), "100000".into()],
                log_path: format!("{name}-app.log"),
                ..Default::default()
            }),
            sandbox_config: Some(config),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest { container_id: id })
        .await
        .expect("StartContainer");
    (run, start.elapsed().as_secs_f64(), pod)
}

async fn remove(rt: &mut Rt, pod: &str) {
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

fn line(metric: &str, unit: &str, ours: f64, peer: Option<(&str, f64)>) {
    match peer {
        Some((name, p)) => println!(
            r#"{{"metric":"{metric}","unit":"{unit}","ours":{ours:.3},"peer":"{name}","peer_value":{p:.3},"ratio":{:.3}}}"#,
            ours / p
        ),
        None => println!(r#"{{"metric":"{metric}","unit":"{unit}","ours":{ours:.3}}}"#),
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs this without --bench; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(guest) = pod_prerequisites("bench pods") else {
        return;
    };
    let parallel: usize = std::env::var("PODVISOR_BENCH_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let d = dir.path();
    let image = push_pod_image(&reg, d, "bench/busybox");
    testing::write_hosts(&d.join("certs.d"), &reg.host, &reg.host).unwrap();
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let socket = d.join("podvisor.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    cmd.arg("--state-dir")
        .arg(d.join("state"))
        .arg("--run-dir")
        .arg(d.join("run"))
        .arg("--certs-dir")
        .arg(d.join("certs.d"))
        .args(["--image-slots", "1", "--default-pod-memory-mib", "256"]);
    let _daemon = Daemon::start_with(cmd, &socket, &guest, Some(&d.join("daemon.log"))).await;
    let chan = connect(socket).await;
    let mut rt = RuntimeServiceClient::new(chan.clone());
    ImageServiceClient::new(chan)
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("PullImage");

    // The peer first, on the same quiet machine state as our serial pod.
    let q = tokio::task::spawn_blocking({
        let (d, guest) = (d.to_path_buf(), guest.clone());
        move || {
            qemu::qemu_boot(
                &d,
                &guest.join("vmlinux"),
                &guest.join("initramfs.cpio"),
                "starting: pid 1,",
                Duration::from_secs(600),
                Duration::ZERO,
            )
        }
    })
    .await
    .unwrap();
    eprintln!("qemu microvm: agent start after {:.2}s", q.to_marker);

    let (run, create, pod) =
        one_pod(rt.clone(), "serial".into(), image.clone(), logs.clone()).await;
    eprintln!("serial: RunPodSandbox {run:.2}s, Create+Start {create:.2}s");
    remove(&mut rt, &pod).await;

    let start = Instant::now();
    let tasks: Vec<_> = (0..parallel)
        .map(|i| {
            tokio::spawn(one_pod(
                rt.clone(),
                format!("par{i}"),
                image.clone(),
                logs.clone(),
            ))
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let wall = start.elapsed().as_secs_f64();
    for (_, _, pod) in &results {
        remove(&mut rt, pod).await;
    }
    let runs: Vec<f64> = results.iter().map(|r| r.0).collect();
    let creates: Vec<f64> = results.iter().map(|r| r.1).collect();
    eprintln!("{parallel} in parallel: RunPodSandbox {runs:.1?}, Create+Start {creates:.1?}, all in {wall:.1}s");

    let peer = Some(("qemu-microvm-boot-to-agent-start", q.to_marker));
    line("run_pod_sandbox_serial", "s", run, peer);
    line("create_start_container_serial", "s", create, None);
    line(
        &format!("run_pod_sandbox_parallel{parallel}_mean"),
        "s",
        mean(&runs),
        peer,
    );
    line(
        &format!("create_start_container_parallel{parallel}_mean"),
        "s",
        mean(&creates),
        None,
    );
    line(
        &format!("pods_parallel{parallel}_all_ready_wall"),
        "s",
        wall,
        None,
    );
}

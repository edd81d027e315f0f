//! Pod benchmark through the real daemon over CRI: RunPodSandbox until the pod is ready, and
//! CreateContainer + StartContainer, serially and for 5 pods in parallel. The peer in the same run is
//! QEMU's microvm booting the same kernel and initramfs until the agent starts (the guest's share of a
//! pod start), once alone and as many times at once as pods are started in parallel. Prints one JSON line per metric:
//! `{"metric":..,"unit":..,"ours":..,"peer":..,"peer_value":..,"ratio":..}`.
//!
//! `cargo bench -p cri-server --bench pods`; PODVISOR_BENCH_PARALLEL (default 5) sets the parallel pods.

use std::path::PathBuf;

use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::bed::{pull, PodBed};
use podvisor_testkit::cri::{container_config, create_container, pod_config, run_pod};
use podvisor_testkit::daemon::{connect, podvisor_cmd, Daemon};
use podvisor_testkit::qemu;
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

/// (RunPodSandbox seconds, Create+Start seconds, pod id).
async fn one_pod(mut rt: Rt, name: String, image: String, logs: PathBuf) -> (f64, f64, String) {
    let config = pod_config(&name, &format!("uid-{name}"), &logs);
    let start = Instant::now();
    let pod = run_pod(&mut rt, &config).await;
    let run = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let app = container_config("app", &image, &["sleep", "100000"], 0);
    let id = create_container(&mut rt, &pod, app, &config).await;
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
    let parallel: usize = std::env::var("PODVISOR_BENCH_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let Some(bed) = PodBed::new("bench pods", "bench/busybox") else {
        return;
    };
    let (d, guest, image) = (bed.dir(), bed.guest.clone(), bed.image.clone());
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let socket = d.join("podvisor.sock");
    let cmd = podvisor_cmd(
        env!("CARGO_BIN_EXE_podvisor"),
        d,
        &["--image-slots", "1", "--default-pod-memory-mib", "256"],
    );
    let _daemon = Daemon::start_with(cmd, &socket, &guest, Some(&d.join("daemon.log"))).await;
    let chan = connect(socket).await;
    let mut rt = RuntimeServiceClient::new(chan.clone());
    pull(chan, &image).await;

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

    // The parallel peer: as many QEMU boots of the same guest at once.
    let boots: Vec<_> = (0..parallel)
        .map(|i| {
            let (dir, guest) = (d.join(format!("qemu{i}")), guest.clone());
            std::fs::create_dir_all(&dir).unwrap();
            tokio::task::spawn_blocking(move || {
                qemu::qemu_boot(
                    &dir,
                    &guest.join("vmlinux"),
                    &guest.join("initramfs.cpio"),
                    "starting: pid 1,",
                    Duration::from_secs(900),
                    Duration::ZERO,
                )
                .to_marker
            })
        })
        .collect();
    let mut qemu_parallel = Vec::new();
    for b in boots {
        qemu_parallel.push(b.await.unwrap());
    }
    eprintln!("{parallel} QEMU boots in parallel: {qemu_parallel:.1?}");

    let peer = Some(("qemu-microvm-boot-to-agent-start", q.to_marker));
    line("run_pod_sandbox_serial", "s", run, peer);
    line("create_start_container_serial", "s", create, None);
    let peer = Some((
        "qemu-microvm-boot-to-agent-start-parallel",
        mean(&qemu_parallel),
    ));
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

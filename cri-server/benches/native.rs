//! Native pod benchmark through CRI: RunPodSandbox + CreateContainer + StartContainer of a native pod,
//! on the node's network (a kube-proxy-like pod) and in a network namespace of its own (the `native`
//! handler, CNI), against the same requests to containerd 1.6 + runc in the same run, on the same CNI
//! network and image, alternating between the two. Prints one JSON line per metric (medians):
//! `{"metric":..,"unit":..,"ours":..,"peer":..,"peer_value":..,"ratio":..}`.
//!
//! `cargo bench -p cri-server --bench native`; PODVISOR_BENCH_RUNS (default 7) sets the runs per case.

use std::path::Path;
use std::time::Instant;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::bed::{pull, PodBed};
use podvisor_testkit::containerd::{push_pause_image, CriContainerd};
use podvisor_testkit::cri::{container_config, pod_config};
use podvisor_testkit::daemon::{connect, podvisor_cmd, Daemon};
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

/// One start: RunPodSandbox + CreateContainer + StartContainer, seconds; the pod is removed after.
async fn start_one(rt: &mut Rt, handler: &str, config: &PodSandboxConfig, image: &str) -> f64 {
    let start = Instant::now();
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let mut app = container_config("app", image, &["sleep", "100000"], 0);
    if let Some(sc) = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
    {
        app.linux.as_mut().unwrap().security_context = Some(LinuxContainerSecurityContext {
            namespace_options: sc.namespace_options.clone(),
            ..Default::default()
        });
    }
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(app),
            sandbox_config: Some(config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest { container_id: id })
        .await
        .expect("StartContainer");
    let took = start.elapsed().as_secs_f64();
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
    took
}

/// A pod config: on the node's network (`host`) or with one of its own.
fn config(name: &str, run: usize, host: bool, logs: &Path) -> PodSandboxConfig {
    let mut c = pod_config(name, &format!("uid-{name}-{run}"), logs);
    c.metadata.as_mut().unwrap().attempt = run as u32;
    if host {
        // As kubelet sends it: no hostname, the node's namespaces.
        c.hostname.clear();
        c.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Node as i32,
                    ipc: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn line(metric: &str, ours: f64, peer: f64) {
    println!(
        r#"{{"metric":"{metric}","unit":"s","ours":{ours:.4},"peer":"containerd-1.6-runc","peer_value":{peer:.4},"ratio":{:.3}}}"#,
        ours / peer
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs this without --bench; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runs: usize = std::env::var("PODVISOR_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7)
        .max(1);
    let Some(bed) = PodBed::native("bench native", "bench/busybox") else {
        return;
    };
    let (d, image) = (bed.dir(), bed.image.clone());
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let socket = d.join("podvisor.sock");
    let cmd = podvisor_cmd(env!("CARGO_BIN_EXE_podvisor"), d, &[]);
    let _daemon = Daemon::start_with(cmd, &socket, &bed.guest, Some(&d.join("daemon.log"))).await;
    let chan = connect(socket).await;
    let mut ours = RuntimeServiceClient::new(chan.clone());
    pull(chan, &image).await;

    let pause = push_pause_image(&bed.reg, d);
    let (ctrd, peer_chan) =
        match CriContainerd::start(&d.join("containerd"), &d.join("cni"), &bed.reg.host, &pause)
            .await
        {
            Ok(c) => c,
            Err(e) => panic!("the peer (containerd) did not start: {e}"),
        };
    for reference in [&pause, &image] {
        ImageServiceClient::new(peer_chan.clone())
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: reference.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("containerd pull {reference}: {e}\n{}", ctrd.log_tail()));
    }
    let mut peer = RuntimeServiceClient::new(peer_chan);

    for (case, host, handler) in [("host_network", true, ""), ("own_network", false, "native")] {
        let (mut o, mut p) = (Vec::new(), Vec::new());
        // One warm-up each, then alternate so that both see the same machine.
        for run in 0..=runs {
            let name = format!("{}-{run}", case.replace('_', "-"));
            let ours_s =
                start_one(&mut ours, handler, &config(&name, run, host, &logs), &image).await;
            let peer_s = start_one(&mut peer, "", &config(&name, run, host, &logs), &image).await;
            eprintln!("{case} run {run}: ours {ours_s:.3}s, containerd+runc {peer_s:.3}s");
            if run > 0 {
                o.push(ours_s);
                p.push(peer_s);
            }
        }
        line(
            &format!("native_pod_{case}_run_create_start"),
            median(o),
            median(p),
        );
    }
}

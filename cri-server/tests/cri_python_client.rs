//! A pod lifecycle driven by a CRI client we did not write: `e2e/cri_pod_lifecycle.py` on PyPI
//! `container-runtime-interface-api` (installed by `e2e/setup-host.sh` into ~/.cache/podvisor/venv),
//! against the real daemon, a real registry and real VMs — and the same life as a native pod.

use std::path::Path;

use podvisor_testkit::bed::PodBed;
use podvisor_testkit::daemon::{podvisor_cmd, Daemon};
use podvisor_testkit::http::free_port;
use podvisor_testkit::python::python;

#[tokio::test]
async fn python_cri_client_drives_a_pod() {
    let test = "python_cri_client_drives_a_pod";
    if let Some(bed) = PodBed::new(test, "py/busybox") {
        drive(test, bed, "").await;
    }
}

#[tokio::test]
async fn python_cri_client_drives_a_native_pod() {
    let test = "python_cri_client_drives_a_native_pod";
    if let Some(bed) = PodBed::native(test, "py/native") {
        drive(test, bed, "native").await;
    }
}

/// Runs the Python scenario on `bed` with pods of `handler`.
async fn drive(test: &str, bed: PodBed, handler: &str) {
    let Some(python) = python(
        test,
        "cri_api.v1.api_pb2_grpc, prometheus_client.openmetrics.parser",
    ) else {
        return;
    };
    let (d, guest, image) = (bed.dir(), &bed.guest, &bed.image);
    let socket = d.join("podvisor.sock");
    let daemon_log = d.join("daemon.log");
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let cmd = podvisor_cmd(
        env!("CARGO_BIN_EXE_podvisor"),
        d,
        &[
            "--image-slots",
            "1",
            "--default-pod-memory-mib",
            "256",
            "--metrics-addr",
            &metrics,
        ],
    );
    let _daemon = Daemon::start_with(cmd, &socket, guest, Some(&daemon_log)).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/cri_pod_lifecycle.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .env("RUNTIME_SOCK", format!("unix://{}", socket.display()))
        .env("IMAGE", image)
        .env("LOG_DIR", &logs)
        .env("METRICS_URL", format!("http://{metrics}/metrics"))
        .env("RUNTIME_HANDLER", handler)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || !stdout.contains("PASS") {
        let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
        let agents: String = std::fs::read_dir(d.join("state/pods"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| std::fs::read_to_string(p.path().join("agent.log")).ok())
            .collect();
        panic!(
            "the Python CRI client scenario failed ({handler:?}); daemon log tail:\n{}\nagent logs:\n{agents}",
            &log[log.len().saturating_sub(10_000)..]
        );
    }
}

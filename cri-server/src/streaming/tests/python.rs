//! The Python `kubernetes` client's WebSocket exec (`WSClient`, `v4.channel.k8s.io`) against
//! the server: a client this project did not write. Skipped when the interpreter or the
//! packages are missing (`e2e/setup-host.sh` installs them; PODVISOR_REQUIRE_PYTHON=1 makes that a
//! failure, as in CI).

use std::path::PathBuf;
use std::process::Command;

use super::{exec_req, harness};

fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/podvisor/venv/bin/python3"))
        .filter(|p| p.exists());
    let candidates = std::env::var_os("PODVISOR_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(venv)
        .chain(Some(PathBuf::from("python3")));
    candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import kubernetes.stream.ws_client, websocket"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_kubernetes_ws_client() {
    let Some(py) = python() else {
        let why = "python3 with the `kubernetes` and `websocket-client` packages not found";
        if std::env::var("PODVISOR_REQUIRE_PYTHON").as_deref() == Ok("1") {
            panic!("python_kubernetes_ws_client: PODVISOR_REQUIRE_PYTHON=1 but {why}");
        }
        println!("SKIPPED python_kubernetes_ws_client: {why}");
        return;
    };
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../e2e/streaming/python_ws_exec.py");
    let h = harness().await;
    let ok = h
        .server
        .exec_url(&exec_req(&["echo", "0"], true, true, true, false))
        .unwrap();
    let fail = h
        .server
        .exec_url(&exec_req(&["echo", "5"], false, true, true, false))
        .unwrap();
    let pf = h
        .server
        .port_forward_url(&k8s_cri::v1::PortForwardRequest {
            pod_sandbox_id: "pod1".into(),
            port: vec![],
        })
        .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).arg(script).args([ok, fail, pf]).output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("ALL OK"), "{stdout}");
}

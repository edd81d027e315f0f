//! A pod lifecycle driven by a CRI client we did not write: `e2e/cri_pod_lifecycle.py` on PyPI
//! `container-runtime-interface-api` (installed by `e2e/setup-host.sh` into ~/.cache/podvisor/venv),
//! against the real daemon, a real registry and real VMs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{pod_prerequisites, podvisor_cmd, push_pod_image, Daemon};
use image_service::testing::{self, Registry};

fn python() -> Result<PathBuf, String> {
    let python = std::env::var_os("PODVISOR_E2E_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/podvisor/venv/bin/python"))
        })
        .ok_or("HOME is not set")?;
    let ok = Command::new(&python)
        .args(["-c", "import cri_api.v1.api_pb2_grpc"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import cri_api (run e2e/setup-host.sh)",
            python.display()
        ))
    }
}

#[tokio::test]
async fn python_cri_client_drives_a_pod() {
    let Some(guest) = pod_prerequisites("python_cri_client_drives_a_pod") else {
        return;
    };
    let python = match python() {
        Ok(p) => p,
        Err(e) if std::env::var("PODVISOR_REQUIRE_PYTHON").as_deref() == Ok("1") => {
            panic!("python_cri_client_drives_a_pod: {e}")
        }
        Err(e) => {
            println!("SKIPPED python_cri_client_drives_a_pod: {e}");
            return;
        }
    };
    let reg = Registry::start(None).unwrap();
    let dir = testing::tempdir();
    let d = dir.path();
    let image = push_pod_image(&reg, d, "py/busybox");
    testing::write_hosts(&d.join("certs.d"), &reg.host, &reg.host).unwrap();
    let socket = d.join("podvisor.sock");
    let daemon_log = d.join("daemon.log");
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let cmd = podvisor_cmd(
        d,
        &["--image-slots", "1", "--default-pod-memory-mib", "256"],
    );
    let _daemon = Daemon::start_with(cmd, &socket, &guest, Some(&daemon_log)).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/cri_pod_lifecycle.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .env("RUNTIME_SOCK", format!("unix://{}", socket.display()))
        .env("IMAGE", &image)
        .env("LOG_DIR", &logs)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || !stdout.contains("PASS") {
        let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
        panic!(
            "the Python CRI client scenario failed; daemon log tail:\n{}",
            &log[log.len().saturating_sub(10_000)..]
        );
    }
}

//! Shared by the daemon tests: start the real `podvisor` binary and connect to its CRI socket.
#![allow(dead_code)]

pub mod cri_metrics;
pub mod net;
pub mod procfs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A running daemon, killed and reaped on drop.
pub struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Daemon {
    /// Spawns `cmd` (a `podvisor` command line) with `--socket socket --guest-dir <dir>/guest` added and
    /// waits (bounded) for the socket to appear.
    pub async fn start(cmd: Command, socket: &Path, dir: &Path) -> Daemon {
        Daemon::start_with(cmd, socket, &dir.join("guest"), None).await
    }

    /// Like [`Daemon::start`] with an explicit guest directory, its log appended to `log` if given.
    pub async fn start_with(
        mut cmd: Command,
        socket: &Path,
        guest_dir: &Path,
        log: Option<&Path>,
    ) -> Daemon {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::null(),
        };
        let child = cmd
            .arg("--socket")
            .arg(socket)
            .arg("--guest-dir")
            .arg(guest_dir)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon
    }

    /// SIGKILL, as a crash would, and reap.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Waits (bounded) for the daemon to exit by itself; its exit status if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// A gRPC channel over the unix socket, retrying (bounded) while the daemon is not accepting yet
/// (a socket file left by a killed daemon exists before the new one binds).
pub async fn connect(socket: PathBuf) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = socket.clone();
        let result =
            Endpoint::from_static("http://[::]:50051")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = s.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await;
        match result {
            Ok(channel) => return channel,
            Err(e) if Instant::now() > deadline => {
                panic!("connecting to {}: {e}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Guest kernel + initramfs directory built by `guest/build.sh`, if this host can run pod VMs.
/// Otherwise prints a SKIPPED line and returns None — or panics when PODVISOR_REQUIRE_KVM=1.
pub fn pod_prerequisites(test: &str) -> Option<PathBuf> {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
    let why = if !Path::new("/dev/kvm").exists() {
        Some("/dev/kvm not available".to_string())
    } else if !guest.join("vmlinux").is_file() || !guest.join("initramfs.cpio").is_file() {
        Some(format!(
            "{} has no vmlinux/initramfs.cpio (run guest/build.sh)",
            guest.display()
        ))
    } else {
        image_service::testing::skip_reason()
    };
    match why {
        None => Some(guest),
        Some(reason) if std::env::var("PODVISOR_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("{test}: PODVISOR_REQUIRE_KVM=1 but {reason}")
        }
        Some(reason) => {
            println!("SKIPPED {test}: {reason}");
            None
        }
    }
}

/// Busybox applets of the pod test image.
const APPLETS: [&str; 17] = [
    "sh", "echo", "sleep", "cat", "dd", "hostname", "id", "ls", "true", "head", "wc", "ps", "env",
    "kill", "mkdir", "date", "nc",
];

/// Pushes a busybox image for pods (static busybox, applets, passwd, the usual mount points) to
/// `reg` as `<repo>:v1`; returns its reference.
pub fn push_pod_image(reg: &image_service::testing::Registry, dir: &Path, repo: &str) -> String {
    use image_service::testing::{OciLayout, TarBuilder};
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut t = TarBuilder::default();
    t.dir("bin/", 0o755).file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        t.link(tar::EntryType::Symlink, &format!("bin/{applet}"), "busybox");
    }
    for d in [
        "etc/",
        "proc/",
        "sys/",
        "dev/",
        "tmp/",
        "root/",
        "home/",
        "home/app/",
        "var/",
        "run/",
    ] {
        t.dir(d, 0o755);
    }
    t.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .file("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n");
    let layer = t.finish();
    let mut layout = OciLayout::new(&dir.join(format!("layout-{}", repo.replace('/', "-"))));
    let m = layout.image("amd64", &[(&layer, "gzip")], "");
    layout.tag(&m, "v1");
    let reference = format!("{repo}:v1");
    reg.push(layout.path(), "v1", &reference, false).unwrap();
    format!("{}/{reference}", reg.host)
}

/// The `podvisor` daemon command line of the pod tests: state, run, registry and CNI config under
/// `dir` (a [`net::TestNetwork`] writes the conflist there), plus `extra` flags.
pub fn podvisor_cmd(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--certs-dir")
        .arg(dir.join("certs.d"))
        .arg("--cni-conf-dir")
        .arg(dir.join("cni"))
        .arg("--cni-bin-dir")
        .arg(net::CNI_BIN_DIR)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(extra);
    cmd
}

/// A pod config named `name` in namespace `e2e`, with cluster DNS settings and an `app` label.
pub fn pod_config(name: &str, uid: &str, logs: &Path) -> k8s_cri::v1::PodSandboxConfig {
    use k8s_cri::v1::{DnsConfig, PodSandboxConfig, PodSandboxMetadata};
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["e2e.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: std::collections::HashMap::from([("app".into(), name.into())]),
        ..Default::default()
    }
}

/// A container config running `args` from `image`, logging to `<name>.log`, labelled `name=<name>`,
/// with a memory limit unless `memory` is 0.
pub fn container_config(
    name: &str,
    image: &str,
    args: &[&str],
    memory: i64,
) -> k8s_cri::v1::ContainerConfig {
    use k8s_cri::v1::*;
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: args.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: std::collections::HashMap::from([("name".into(), name.into())]),
        linux: Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                memory_limit_in_bytes: memory,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

type Runtime = k8s_cri::v1::runtime_service_client::RuntimeServiceClient<Channel>;

/// RunPodSandbox that must succeed; returns the pod id.
pub async fn run_pod(rt: &mut Runtime, config: &k8s_cri::v1::PodSandboxConfig) -> String {
    rt.run_pod_sandbox(k8s_cri::v1::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

/// CreateContainer that must succeed; prints how long it took and returns the container id.
pub async fn create_container(
    rt: &mut Runtime,
    pod: &str,
    config: k8s_cri::v1::ContainerConfig,
    pod_config: &k8s_cri::v1::PodSandboxConfig,
) -> String {
    let start = Instant::now();
    let id = rt
        .create_container(k8s_cri::v1::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    eprintln!("CreateContainer took {:?}", start.elapsed());
    id
}

/// The e2e venv's Python (`PODVISOR_E2E_PYTHON`, else ~/.cache/podvisor/venv) if it can import
/// `module`. Otherwise prints a SKIPPED line and returns None — or panics when
/// PODVISOR_REQUIRE_PYTHON=1 (the test suite installs the venv).
pub fn python(test: &str, module: &str) -> Option<PathBuf> {
    let python = std::env::var_os("PODVISOR_E2E_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/podvisor/venv/bin/python"))
        })?;
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(python);
    }
    let why = format!(
        "{} cannot import {module} (run e2e/setup-host.sh)",
        python.display()
    );
    if std::env::var("PODVISOR_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("{test}: PODVISOR_REQUIRE_PYTHON=1 but {why}");
    }
    println!("SKIPPED {test}: {why}");
    None
}

/// A free TCP port on the host (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.1 from 127.0.0.1:`port`: (status line, content type, body).
pub fn http_get(port: u16, path: &str) -> (String, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (
        head.lines().next().unwrap().to_string(),
        ctype,
        body.to_string(),
    )
}

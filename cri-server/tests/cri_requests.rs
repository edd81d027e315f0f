//! The CRI surface without pod VMs, through the real daemon's socket: what minimal and hostile clients
//! send is answered with the right code before anything is created (no CNI call, no VM), and faults
//! never wedge the daemon: a pod whose CNI DEL keeps failing does not block RunPodSandbox's rollback,
//! a restart, or a crash in the middle of RunPodSandbox; its release is retried in the background.
//!
//! The network is a real CNI bridge whose `bridge` plugin is wrapped by a script that records each
//! call and fails DEL (or holds ADD) while a marker file exists. The "guest kernel" is not a kernel,
//! so a RunPodSandbox that passes validation fails right after CNI ADD, which exercises the rollback.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::cni::{TestNetwork, CNI_BIN_DIR};
use podvisor_testkit::cri::list_pods;
use podvisor_testkit::daemon::{connect, Daemon};
use podvisor_testkit::http::{free_port, http_get};
use tonic::transport::Channel;
use tonic::Code;

type Rt = RuntimeServiceClient<Channel>;

/// The wrapped CNI plugins and their switches.
struct Cni {
    bin: PathBuf,
    calls: PathBuf,
    fail_del: PathBuf,
    hold_add: PathBuf,
    holder_pid: PathBuf,
}

impl Cni {
    fn new(dir: &Path) -> Cni {
        let bin = dir.join("cni-bin");
        std::fs::create_dir_all(&bin).unwrap();
        let cni = Cni {
            calls: dir.join("cni-calls"),
            fail_del: dir.join("fail-del"),
            hold_add: dir.join("hold-add"),
            holder_pid: dir.join("holder-pid"),
            bin,
        };
        let script = format!(
            "#!/bin/sh\n\
             echo \"$CNI_COMMAND\" >> {calls}\n\
             if [ \"$CNI_COMMAND\" = DEL ] && [ -e {fail} ]; then\n\
               echo '{{\"cniVersion\":\"1.0.0\",\"code\":999,\"msg\":\"DEL refused by the test\"}}'\n\
               exit 1\n\
             fi\n\
             if [ \"$CNI_COMMAND\" = ADD ] && [ -e {hold} ]; then\n\
               echo $$ > {pid}\n\
               while [ -e {hold} ]; do sleep 0.1; done\n\
             fi\n\
             exec {CNI_BIN_DIR}/bridge\n",
            calls = cni.calls.display(),
            fail = cni.fail_del.display(),
            hold = cni.hold_add.display(),
            pid = cni.holder_pid.display(),
        );
        let wrapper = cni.bin.join("bridge");
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        for plugin in ["host-local", "portmap"] {
            std::os::unix::fs::symlink(Path::new(CNI_BIN_DIR).join(plugin), cni.bin.join(plugin))
                .unwrap();
        }
        cni
    }

    /// The CNI ADD, CHECK and DEL commands run so far (VERSION queries are not counted).
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l != "VERSION")
            .map(String::from)
            .collect()
    }

    fn set(path: &Path, on: bool) {
        if on {
            std::fs::write(path, "").unwrap();
        } else {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The daemon of this test: state, sockets, namespaces and CNI under `dir`.
fn podvisor(dir: &Path, cni: &Cni, metrics_port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--netns-dir")
        .arg(dir.join("netns"))
        .arg("--cni-conf-dir")
        .arg(dir.join("cni"))
        .arg("--cni-bin-dir")
        .arg(&cni.bin)
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")]);
    cmd
}

/// A guest directory whose kernel is not one: a VM boot fails at once.
fn broken_guest(dir: &Path) -> PathBuf {
    let guest = dir.join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    std::fs::write(guest.join("vmlinux"), b"not an ELF kernel").unwrap();
    std::fs::write(guest.join("initramfs.cpio"), b"").unwrap();
    guest
}

/// A pod config with only metadata, as crictl and critest send.
fn minimal_pod(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "e2e".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let e = r.expect_err("expected an error");
    (e.code(), e.message().to_string())
}

async fn run(rt: &mut Rt, config: PodSandboxConfig) -> (Code, String) {
    code(
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await,
    )
}

/// `podvisor_pending_releases` from /metrics.
fn pending_releases(port: u16) -> u64 {
    let (_, _, body) = http_get(port, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("podvisor_pending_releases "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no podvisor_pending_releases in\n{body}"))
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Polls `f` until it holds (bounded).
async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_cni_faults_never_wedge_the_daemon() {
    let dir = image_service::testing::tempdir();
    let d = dir.path();
    let Some(net) = TestNetwork::new(d, "bad_requests_and_cni_faults_never_wedge_the_daemon")
    else {
        return;
    };
    let cni = Cni::new(d);
    let guest = broken_guest(d);
    let socket = d.join("podvisor.sock");
    let log = d.join("daemon.log");
    let port = free_port();
    let start = || Daemon::start_with(podvisor(d, &cni, port), &socket, &guest, Some(&log));
    let mut daemon = start().await;
    let mut rt = RuntimeServiceClient::new(connect(socket.clone()).await);

    minimal_client_answers(&mut rt).await;
    bounded_answers(&mut rt).await;
    bad_pods_cost_nothing(&mut rt, &cni, d).await;

    // A pod whose CNI DEL fails: RunPodSandbox fails (the boot fails after CNI ADD) and rolls back
    // what it can; the network is left to the background retrier, nothing else remains.
    Cni::set(&cni.fail_del, true);
    let (c, m) = run(&mut rt, minimal_pod("faulty")).await;
    assert_eq!(c, Code::Internal, "{m}");
    assert_eq!(cni.calls(), ["ADD", "DEL"], "ADD, then the failed DEL");
    assert!(list_pods(&mut rt).await.is_empty());
    assert_eq!(pending_releases(port), 1);
    assert_eq!(entries(&d.join("netns")).len(), 1, "the namespace waits");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("were not released") && text.contains("DEL refused by the test"),
        "a warning names the pod and the cause"
    );

    // A restart is not blocked by it, and the release survives the restart.
    daemon.kill9();
    let mut daemon = start().await;
    let mut rt = RuntimeServiceClient::new(connect(socket.clone()).await);
    assert!(list_pods(&mut rt).await.is_empty());
    assert_eq!(pending_releases(port), 1);

    // Once DEL works again the retrier releases it: no namespace, no IP left.
    Cni::set(&cni.fail_del, false);
    eventually("the deferred release", Duration::from_secs(60), || {
        pending_releases(port) == 0
    })
    .await;
    assert!(entries(&d.join("netns")).is_empty());
    assert!(net.allocations().is_empty(), "{:?}", net.allocations());

    // A crash in the middle of CNI ADD, then a restart while DEL fails: the daemon starts, the
    // interrupted pod is discarded, its release deferred and later done.
    Cni::set(&cni.hold_add, true);
    Cni::set(&cni.fail_del, true);
    let mut rt2 = rt.clone();
    let booting = tokio::spawn(async move { run(&mut rt2, minimal_pod("interrupted")).await });
    eventually("CNI ADD to start", Duration::from_secs(30), || {
        cni.holder_pid.exists()
    })
    .await;
    daemon.kill9();
    let _ = booting.await;
    // The plugin outlives the daemon (its child): end it so its ADD never completes.
    let pid = std::fs::read_to_string(&cni.holder_pid).unwrap();
    let _ = Command::new("kill").args(["-9", pid.trim()]).status();
    Cni::set(&cni.hold_add, false);
    let _daemon = start().await;
    let mut rt = RuntimeServiceClient::new(connect(socket.clone()).await);
    assert!(list_pods(&mut rt).await.is_empty());
    assert_eq!(pending_releases(port), 1);
    Cni::set(&cni.fail_del, false);
    eventually(
        "the release after the crash",
        Duration::from_secs(60),
        || pending_releases(port) == 0,
    )
    .await;
    assert!(entries(&d.join("netns")).is_empty());
    assert!(net.allocations().is_empty(), "{:?}", net.allocations());
}

/// What crictl and critest rely on: idempotent stops and removals, and the handlers in Status.
async fn minimal_client_answers(rt: &mut Rt) {
    let unknown = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: unknown.into(),
    })
    .await
    .expect("StopPodSandbox of an unknown pod succeeds");
    rt.stop_container(StopContainerRequest {
        container_id: unknown.into(),
        timeout: 0,
    })
    .await
    .expect("StopContainer of an unknown container succeeds");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: unknown.into(),
    })
    .await
    .expect("RemovePodSandbox of an unknown pod succeeds");
    let status = rt
        .status(StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let handlers: Vec<&str> = status
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    // Native pods are on by default.
    assert_eq!(handlers, ["", "podvisor", "native"]);
    assert!(status.features.is_some());
}

/// Echoed client input is bounded: a 1 MiB id gives a short NotFound, not a 1 MiB message.
async fn bounded_answers(rt: &mut Rt) {
    let huge = "f".repeat(1 << 20);
    for (c, m) in [
        code(
            rt.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: huge.clone(),
                verbose: false,
            })
            .await,
        ),
        code(
            rt.container_status(ContainerStatusRequest {
                container_id: huge.clone(),
                verbose: false,
            })
            .await,
        ),
    ] {
        assert_eq!(c, Code::NotFound, "{}", &m[..m.len().min(200)]);
        assert!(m.len() < 512, "message of {} bytes", m.len());
    }
    let (c, m) = code(
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(minimal_pod("x")),
            runtime_handler: huge,
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    assert!(m.len() < 512 && m.contains("runtime_handler"), "{m}");
}

/// Pod configs that cannot run are refused before any CNI call (or VM): each with InvalidArgument
/// naming the field.
async fn bad_pods_cost_nothing(rt: &mut Rt, cni: &Cni, d: &Path) {
    let resources = |r: LinuxContainerResources| LinuxPodSandboxConfig {
        resources: Some(r),
        ..Default::default()
    };
    let mut cases: Vec<(PodSandboxConfig, String)> = Vec::new();
    let mut with = |field: &str, f: &dyn Fn(&mut PodSandboxConfig)| {
        let mut p = minimal_pod("bad");
        f(&mut p);
        cases.push((p, field.to_string()));
    };
    with("config.metadata.name", &|p| {
        p.metadata.as_mut().unwrap().name = "a\0b".into()
    });
    with("config.metadata.name", &|p| {
        p.metadata.as_mut().unwrap().name = "n".repeat(128 << 10)
    });
    with("config.metadata.namespace", &|p| {
        p.metadata.as_mut().unwrap().namespace = "a;b=c".into()
    });
    with("config.hostname", &|p| p.hostname = "Bad_Host".into());
    with("config.dns_config.servers[0]", &|p| {
        p.dns_config = Some(DnsConfig {
            servers: vec!["not-an-ip".into()],
            ..Default::default()
        })
    });
    with("config.linux.sysctls", &|p| {
        p.linux = Some(LinuxPodSandboxConfig {
            sysctls: [("kernel.panic".to_string(), "1".to_string())].into(),
            ..Default::default()
        })
    });
    with("config.linux.resources.memory_limit_in_bytes", &|p| {
        p.linux = Some(resources(LinuxContainerResources {
            memory_limit_in_bytes: 100 << 30,
            ..Default::default()
        }))
    });
    with("config.linux.resources.memory_limit_in_bytes", &|p| {
        p.linux = Some(resources(LinuxContainerResources {
            memory_limit_in_bytes: 1,
            ..Default::default()
        }))
    });
    with("config.linux.resources.cpuset_cpus", &|p| {
        p.linux = Some(resources(LinuxContainerResources {
            cpuset_cpus: "4095".into(),
            ..Default::default()
        }))
    });
    with("config.linux.resources.cpu_period", &|p| {
        p.linux = Some(resources(LinuxContainerResources {
            cpu_period: 10,
            cpu_quota: 20_000,
            ..Default::default()
        }))
    });
    with("config.linux.overhead.cpu_quota", &|p| {
        p.linux = Some(LinuxPodSandboxConfig {
            overhead: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 5,
                ..Default::default()
            }),
            ..Default::default()
        })
    });
    for (config, field) in cases {
        let (c, m) = run(rt, config).await;
        assert_eq!(c, Code::InvalidArgument, "{field}: {m}");
        assert!(m.starts_with(&field), "{field}: {m}");
        assert!(m.len() < 512 && !m.contains('\0'), "{m}");
    }
    assert!(cni.calls().is_empty(), "CNI ran: {:?}", cni.calls());
    assert!(entries(&d.join("netns")).is_empty());
    assert!(list_pods(rt).await.is_empty());
}

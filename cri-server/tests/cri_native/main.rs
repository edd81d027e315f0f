//! Native pods end to end: the `podvisor` daemon, a real `docker-registry`, real CNI and the Rust CRI
//! client. A kube-proxy-like pod (hostNetwork, hostPID, hostIPC) runs on the node with the node's
//! namespaces, serves on a node port, sees a node SysV segment and node processes; a pod of the
//! `native` handler gets its own namespaces and CNI address, and its memory limit is a real cgroup
//! limit (OOMKilled, 137). A privileged node agent in the host pod programs the node's iptables,
//! creates a bridge on the node and shares mounts with it (Bidirectional, HostToContainer). Removing a
//! pod, and killing the daemon with SIGKILL, leave no process, mount, loop device or cgroup behind.

mod leftovers;
mod node_agent;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::bed::{dump_failure, pull, PodBed};
use podvisor_testkit::cri::{
    container_config, container_status, create_container, pod_config, pod_status, run_pod_with,
};
use podvisor_testkit::daemon::{connect, podvisor_cmd, Daemon};
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

/// The node port the host pod listens on.
const NODE_PORT: u16 = 39_471;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_pods_share_the_node() {
    let Some(bed) = PodBed::native("native_pods_share_the_node", "e2e/native") else {
        return;
    };
    let d = bed.dir().to_path_buf();
    let daemon_log = d.join("daemon.log");
    let result = tokio::spawn(scenario(bed.guest.clone(), d.clone(), bed.image.clone())).await;
    if let Err(e) = result {
        dump_failure(&d, &daemon_log);
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn start(guest: &Path, d: &Path, extra: &[&str]) -> (Daemon, Rt, Channel) {
    let socket = d.join("podvisor.sock");
    let cmd = podvisor_cmd(env!("CARGO_BIN_EXE_podvisor"), d, extra);
    let daemon = Daemon::start_with(cmd, &socket, guest, Some(&d.join("daemon.log"))).await;
    let chan = connect(socket).await;
    (daemon, RuntimeServiceClient::new(chan.clone()), chan)
}

async fn scenario(guest: PathBuf, d: PathBuf, image: String) {
    let (daemon, mut rt, chan) = start(&guest, &d, &[]).await;
    pull(chan, &image).await;
    assert_eq!(handlers(&mut rt).await, ["", "podvisor", "native"]);
    let logs = d.join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();

    let host_pod = host_pod(&mut rt, &image, &logs, &d).await;
    let isolated = isolated_pod(&mut rt, &image, &logs).await;

    // Stop and remove the host pod: nothing of it stays on the node.
    let before = leftovers::of_pod(&d, &host_pod);
    assert!(
        !before.is_clean(),
        "the running pod should be visible: {before:?}"
    );
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: host_pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: host_pod.clone(),
    })
    .await
    .unwrap();
    leftovers::of_pod(&d, &host_pod).assert_clean("after RemovePodSandbox");
    assert_eq!(
        leftovers::still_bound(&before.loops, &d),
        Vec::<String>::new()
    );

    let (restarted, mut rt) = crash_and_restart(daemon, &guest, &d, &isolated).await;
    refused(&mut rt, &logs).await;
    drop(restarted);
    stopped_with_the_daemon(&guest, &d, &image, &logs).await;
}

/// `systemctl stop podvisor` (SIGTERM): the daemon stops its native pods before it exits, so nothing
/// of them runs or stays mounted once it is gone, even before any restart.
async fn stopped_with_the_daemon(guest: &Path, d: &Path, image: &str, logs: &Path) {
    let (mut daemon, mut rt, _) = start(guest, d, &[]).await;
    let config = pod_config("stopped", "uid-stopped", logs);
    let pod = run_pod_with(&mut rt, &config, "native").await;
    let c = create_container(
        &mut rt,
        &pod,
        container_config("c", image, &["sleep", "3600"], 0),
        &config,
    )
    .await;
    rt.start_container(StartContainerRequest { container_id: c })
        .await
        .unwrap();
    let running = leftovers::of_pod(d, &pod);
    assert!(
        !running.processes.is_empty() && !running.loops.is_empty(),
        "{running:?}"
    );
    let term = std::process::Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exit = daemon.wait_exit(Duration::from_secs(60)).await;
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let left = leftovers::of_pod(d, &pod);
    assert!(
        left.processes.is_empty() && left.mounts.is_empty(),
        "{left:?}"
    );
    assert_eq!(
        leftovers::still_bound(&running.loops, d),
        Vec::<String>::new()
    );
    // The next start sweeps the rest (its cgroups, its directory).
    let (_daemon, mut rt, _) = start(guest, d, &[]).await;
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    leftovers::of_pod(d, &pod).assert_clean("after the restart");
}

/// SIGKILLs the daemon: the isolated pod's agent sees its lifeline close and removes its pod; the
/// restarted daemon (refusing native pods now) reports it ended and sweeps the rest. Returns the new
/// daemon and its client.
async fn crash_and_restart(
    mut daemon: Daemon,
    guest: &Path,
    d: &Path,
    isolated: &str,
) -> (Daemon, Rt) {
    let running = leftovers::of_pod(d, isolated);
    assert!(
        !running.processes.is_empty() && !running.loops.is_empty(),
        "{running:?}"
    );
    daemon.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = leftovers::of_pod(d, isolated);
        let bound = leftovers::still_bound(&running.loops, d);
        if left.processes.is_empty() && left.mounts.is_empty() && bound.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after the daemon was killed: {left:?}, loops {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The restarted daemon reports the pod as ended and sweeps the rest (cgroups, its directory), even
    // on a node that now refuses native pods.
    let (restarted, mut rt, _) = start(guest, d, &["--host-pods", "refuse"]).await;
    let (st, _) = pod_status(&mut rt, isolated).await;
    assert_eq!(st.state, PodSandboxState::SandboxNotready as i32);
    let containers = rt
        .list_containers(ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(
        containers
            .iter()
            .all(|c| c.state == ContainerState::ContainerExited as i32),
        "{containers:?}"
    );
    leftovers::of_pod(d, isolated).assert_clean("after the restart");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: isolated.to_string(),
    })
    .await
    .unwrap();
    (restarted, rt)
}

/// With `--host-pods refuse`: no `native` handler, and pods that need the node get a VM's errors.
async fn refused(rt: &mut Rt, logs: &Path) {
    assert_eq!(handlers(rt).await, ["", "podvisor"]);
    let mut config = pod_config("proxy", "uid-refused", logs);
    config.hostname.clear();
    config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(node_namespaces()),
            ..Default::default()
        }),
        ..Default::default()
    });
    for (handler, code) in [
        ("", tonic::Code::InvalidArgument),
        ("native", tonic::Code::NotFound),
    ] {
        let e = rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{handler:?}: {}", e.message());
    }
}

/// The namespace options of a pod that shares the node's network, PID and IPC namespaces.
fn node_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Node as i32,
        ipc: NamespaceMode::Node as i32,
        ..Default::default()
    }
}

/// A kube-proxy-like pod: on the node's network, PID and IPC namespaces, privileged.
async fn host_pod(rt: &mut Rt, image: &str, logs: &Path, d: &Path) -> String {
    let mut config = pod_config("proxy", "uid-proxy", logs);
    // kubelet sends no hostname for hostNetwork pods: theirs is the node's.
    config.hostname.clear();
    config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(node_namespaces()),
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let start = Instant::now();
    let pod = podvisor_testkit::cri::run_pod(rt, &config).await;
    eprintln!("native RunPodSandbox took {:?}", start.elapsed());
    let (st, info) = pod_status(rt, &pod).await;
    assert!(info["info"].contains("\"kind\":\"Native\""), "{info:?}");
    assert_eq!(st.state, PodSandboxState::SandboxReady as i32);
    // No pod IP of its own: kubelet uses the node's.
    assert_eq!(st.network.map(|n| n.ip).unwrap_or_default(), "");
    let ns = st.linux.unwrap().namespaces.unwrap().options.unwrap();
    assert_eq!(ns.network, NamespaceMode::Node as i32);

    let mut server = container_config(
        "server",
        image,
        &[
            "sh",
            "-c",
            &format!("hostname; echo native-hello | nc -l -p {NODE_PORT}; sleep 3600"),
        ],
        0,
    );
    let sc = LinuxContainerSecurityContext {
        namespace_options: Some(node_namespaces()),
        privileged: true,
        ..Default::default()
    };
    server.linux.as_mut().unwrap().security_context = Some(sc);
    let server = create_container(rt, &pod, server, &config).await;
    rt.start_container(StartContainerRequest {
        container_id: server.clone(),
    })
    .await
    .unwrap();

    sees_the_node(rt, &server).await;
    // Logs: the node's hostname was printed.
    let node_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let log = wait_log(&logs.join("server.log"), node_name.trim()).await;
    assert!(log.contains(node_name.trim()), "{log}");
    node_agent::node_agent(rt, &pod, &config, image, d).await;
    node_agent::private_source_refused(rt, &pod, &config, image, d).await;
    pod
}

/// The node's namespaces, processes, SysV and POSIX shared memory and ports, seen from the host pod's
/// container `server` (which serves [`NODE_PORT`]).
async fn sees_the_node(rt: &mut Rt, server: &str) {
    // The node's namespaces, seen from inside.
    let ns = exec(rt, server, "ls -l /proc/self/ns/").await;
    for name in ["net", "pid", "ipc", "uts"] {
        let node = std::fs::read_link(format!("/proc/self/ns/{name}")).unwrap();
        assert!(
            ns.contains(&format!("{name} -> {}", node.display())),
            "{name}: node {node:?}, container:\n{ns}"
        );
    }
    // Node processes (this test's), a node SysV segment, a node port.
    let comm = exec(
        rt,
        server,
        &format!("cat /proc/{}/comm", std::process::id()),
    )
    .await;
    assert!(!comm.trim().is_empty(), "the test process is visible");
    let segment = ipcmk();
    let shm = exec(rt, server, "cat /proc/sysvipc/shm").await;
    let _ = std::process::Command::new("ipcrm")
        .args(["-m", &segment])
        .status();
    assert!(
        shm.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(segment.as_str())),
        "segment {segment} not in\n{shm}"
    );
    assert_eq!(read_node_port().await, "native-hello\n");
}

/// A pod of the `native` handler: its own network (CNI), hostname and IPC; a memory limit kills.
async fn isolated_pod(rt: &mut Rt, image: &str, logs: &Path) -> String {
    let config = pod_config("isolated", "uid-isolated", logs);
    let start = Instant::now();
    let pod = run_pod_with(rt, &config, "native").await;
    eprintln!("native RunPodSandbox (with CNI) took {:?}", start.elapsed());
    let (st, _) = pod_status(rt, &pod).await;
    let ip = st.network.unwrap().ip;
    assert!(ip.starts_with("10."), "CNI address: {ip:?}");

    let sleeper = container_config("sleeper", image, &["sleep", "3600"], 0);
    let sleeper = create_container(rt, &pod, sleeper, &config).await;
    rt.start_container(StartContainerRequest {
        container_id: sleeper.clone(),
    })
    .await
    .unwrap();
    let ns = exec(
        rt,
        &sleeper,
        "ls -l /proc/self/ns/; hostname; cat /proc/net/dev",
    )
    .await;
    for name in ["net", "ipc", "uts"] {
        let node = std::fs::read_link(format!("/proc/self/ns/{name}")).unwrap();
        assert!(
            !ns.contains(&format!("{name} -> {}", node.display())),
            "{name} is the node's:\n{ns}"
        );
    }
    assert!(ns.contains("\nisolated\n") && ns.contains("eth0:"), "{ns}");

    // 16 MiB of memory and a 64 MiB block: the node's OOM killer ends it.
    let hog = container_config(
        "hog",
        image,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        16 << 20,
    );
    let hog = create_container(rt, &pod, hog, &config).await;
    rt.start_container(StartContainerRequest {
        container_id: hog.clone(),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = container_status(rt, &hog).await;
        if s.state == ContainerState::ContainerExited as i32 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (status.exit_code, status.reason.as_str()),
        (137, "OOMKilled"),
        "{status:?}"
    );
    pod
}

/// The names in `Status.runtime_handlers`.
async fn handlers(rt: &mut Rt) -> Vec<String> {
    let status = rt.status(StatusRequest { verbose: false }).await.unwrap();
    let handlers = status.into_inner().runtime_handlers;
    handlers.into_iter().map(|h| h.name).collect()
}

/// ExecSync of `sh -c script` that must succeed; its stdout.
async fn exec(rt: &mut Rt, container: &str, script: &str) -> String {
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: container.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 30,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    assert_eq!(
        out.exit_code,
        0,
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Creates a SysV shared memory segment on the node (`ipcmk`); its id.
fn ipcmk() -> String {
    let out = std::process::Command::new("ipcmk")
        .args(["-M", "4096"])
        .output()
        .expect("ipcmk (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// What the host pod's server sends on the node port (retried while it starts listening).
async fn read_node_port() -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = tokio::task::spawn_blocking(|| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", NODE_PORT))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut text = String::new();
            s.read_to_string(&mut text).map(|_| text)
        })
        .await
        .unwrap();
        match got {
            Ok(text) if !text.is_empty() => return text,
            _ if Instant::now() > deadline => panic!("node port {NODE_PORT}: {got:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn wait_log(path: &Path, marker: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(marker) || Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

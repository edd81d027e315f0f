//! CRI RuntimeService end to end on real VMs: the `podvisor` daemon, a real `docker-registry`, and the
//! Rust k8s-cri client. One pod runs three containers (logs, exec, stats, an OOM kill, stop with and
//! without a handler), the daemon is killed with SIGKILL while booting a second pod, and the restarted
//! daemon must report consistent state with nothing left behind.

mod cri_metrics;
mod invalid;
mod minimal;
mod restart;
mod stats;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::bed::{dump_failure, pull, PodBed};
use podvisor_testkit::cri::{
    container_config, create_container, list_containers, pod_config, run_pod,
};
use podvisor_testkit::daemon::{connect, podvisor_cmd, Daemon};
use tonic::transport::Channel;
use tonic::Code;

type Rt = RuntimeServiceClient<Channel>;

/// What the first half of the scenario leaves to the crash and restart half.
pub struct Left {
    d: PathBuf,
    socket: PathBuf,
    guest: PathBuf,
    daemon_log: PathBuf,
    image: String,
    logs: PathBuf,
    /// Pod A and two of its containers.
    pod: String,
    sleeper: String,
    talker: String,
}

fn podvisor(dir: &Path) -> Command {
    podvisor_cmd(
        env!("CARGO_BIN_EXE_podvisor"),
        dir,
        &["--image-slots", "2", "--default-pod-memory-mib", "384"],
    )
}

async fn status(rt: &mut Rt, id: &str) -> ContainerStatus {
    podvisor_testkit::cri::container_status(rt, id).await
}

/// Polls until the container has exited (bounded).
async fn wait_exited(rt: &mut Rt, id: &str, timeout: Duration) -> ContainerStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(rt, id).await;
        if s.state == ContainerState::ContainerExited as i32 || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls until `path` contains every marker (bounded); returns the content.
async fn wait_log(path: &Path, markers: &[&str], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if markers.iter().all(|m| log.contains(m)) || Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let e = r.expect_err("expected an error");
    (e.code(), e.message().to_string())
}

/// Every file under `dir`, relative.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_lifecycle_crash_and_restart() {
    let Some(bed) = PodBed::new("pod_lifecycle_crash_and_restart", "e2e/busybox") else {
        return;
    };
    let d = bed.dir();
    let socket = d.join("podvisor.sock");
    let daemon_log = d.join("daemon.log");
    let result = tokio::spawn(scenario(
        bed.guest.clone(),
        d.to_path_buf(),
        bed.image.clone(),
        socket,
        daemon_log.clone(),
    ))
    .await;
    if let Err(e) = result {
        dump_failure(d, &daemon_log);
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(guest: PathBuf, d: PathBuf, image: String, socket: PathBuf, daemon_log: PathBuf) {
    let daemon = Daemon::start_with(podvisor(&d), &socket, &guest, Some(&daemon_log)).await;
    let chan = connect(socket.clone()).await;
    let mut rt = RuntimeServiceClient::new(chan.clone());
    let mut events = rt
        .get_container_events(GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    pull(chan.clone(), &image).await;
    let logs = d.join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    invalid::invalid_requests(&mut rt, &image, &logs).await;

    // Pod A.
    // 1.5 CPUs of limits: a VM with 2 vCPUs (on PVM hosts this needs the VMM to hide KVM's
    // hypercall-based PV features); 200 MiB of limits plus the guest overhead.
    let mut config_a = pod_config("web", "uid-a", &logs);
    config_a.linux = Some(LinuxPodSandboxConfig {
        resources: Some(LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 150_000,
            memory_limit_in_bytes: 200 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let start = Instant::now();
    let pod = run_pod(&mut rt, &config_a).await;
    eprintln!("RunPodSandbox took {:?}", start.elapsed());
    let (c, m) = code(
        rt.run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config_a.clone()),
            runtime_handler: String::new(),
        })
        .await,
    );
    assert_eq!(c, Code::AlreadyExists, "{m}");
    let st = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status.as_ref().unwrap().state,
        PodSandboxState::SandboxReady as i32
    );
    let info = &st.info["info"];
    assert!(
        info.contains("\"vcpus\":2") && info.contains("\"memoryMiB\":328"),
        "{info}"
    );

    // Volumes as kubelet lays them out: a config map (files behind a `..data` symlink), mounted
    // read-only, and an emptyDir both containers share.
    let vol = d.join("volumes");
    std::fs::create_dir_all(vol.join("config/..2026_11_25")).unwrap();
    std::fs::write(
        vol.join("config/..2026_11_25/greeting"),
        "hi from a config map\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_11_25", vol.join("config/..data")).unwrap();
    std::os::unix::fs::symlink("..data/greeting", vol.join("config/greeting")).unwrap();
    std::fs::create_dir_all(vol.join("shared")).unwrap();
    // A hostPath that is itself a symlink is followed, as runc does.
    std::os::unix::fs::symlink(vol.join("config"), vol.join("linked")).unwrap();
    let with_volumes = |mut c: ContainerConfig| {
        let mount = |host: &str, path: &str, readonly| Mount {
            host_path: vol.join(host).display().to_string(),
            container_path: path.into(),
            readonly,
            ..Default::default()
        };
        c.mounts = vec![
            mount("config", "/etc/config", true),
            mount("shared", "/shared", false),
            mount("linked", "/etc/linked", true),
        ];
        c
    };
    let talker_cmd = "echo from-talker > /shared/t; echo hello; echo oops >&2; i=0; \
                      while true; do echo tick $i; i=$((i+1)); sleep 1; done";
    let talker = create_container(
        &mut rt,
        &pod,
        with_volumes(container_config(
            "talker",
            &image,
            &["sh", "-c", talker_cmd],
            0,
        )),
        &config_a,
    )
    .await;
    let sleeper_cmd = "trap 'echo bye; exit 0' TERM; sleep 100000 & wait";
    let sleeper = create_container(
        &mut rt,
        &pod,
        with_volumes(with_cpu_quota(as_app_with_runtime_default(
            container_config("sleeper", &image, &["sh", "-c", sleeper_cmd], 64 << 20),
        ))),
        &config_a,
    )
    .await;
    let (c, m) = code(
        rt.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("talker", &image, &["true"], 0)),
            sandbox_config: Some(config_a.clone()),
        })
        .await,
    );
    assert_eq!(c, Code::AlreadyExists, "{m}");
    let mut no_image = container_config("noimage", "example.invalid/none:v1", &["true"], 0);
    no_image.log_path.clear();
    let (c, m) = code(
        rt.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(no_image),
            sandbox_config: Some(config_a.clone()),
        })
        .await,
    );
    assert_eq!(c, Code::NotFound, "{m}");
    assert!(m.contains("config.image.image"), "{m}");
    let (c, m) = code(
        rt.create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("tiny", &image, &["true"], 1)),
            sandbox_config: Some(config_a.clone()),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(
        m.starts_with("config.linux.resources.memory_limit_in_bytes"),
        "{m}"
    );
    for id in [&talker, &sleeper] {
        rt.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("StartContainer");
        assert_eq!(
            status(&mut rt, id).await.state,
            ContainerState::ContainerRunning as i32
        );
    }
    let (c, _) = code(
        rt.start_container(StartContainerRequest {
            container_id: talker.clone(),
        })
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition);
    // The log path is absolute (kubelet and crictl open it to serve logs), the image is named by
    // its tag and its repo digest, as containerd reports them.
    let s = status(&mut rt, &talker).await;
    assert_eq!(
        Path::new(&s.log_path),
        logs.join("talker.log"),
        "{}",
        s.log_path
    );
    assert_eq!(s.image.as_ref().unwrap().image, image);
    assert!(s.image_ref.contains("@sha256:"), "{}", s.image_ref);

    // Exec.
    let start = Instant::now();
    let out = rt
        .exec_sync(ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; hostname; cat /etc/resolv.conf /proc/cpuinfo; \
                 cat /etc/config/greeting /shared/t /etc/linked/greeting; \
                 (echo x > /etc/config/x) 2>/dev/null || echo config-read-only; \
                 echo \"uid=$(id -u) groups=$(id -G)\"; \
                 while read k v; do [ \"$k\" = Seccomp: ] && echo seccomp=$v; done < /proc/self/status; \
                 exit 3"
                    .into(),
            ],
            timeout: 120,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    eprintln!("ExecSync took {:?}", start.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.exit_code, 3);
    assert!(stdout.starts_with("out\nweb\n"), "{stdout}");
    assert!(
        stdout.contains("nameserver 10.96.0.10") && stdout.contains("ndots:5"),
        "{stdout}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // The config map arrived (through its symlinks), read-only; the emptyDir is shared with the talker.
    for want in [
        "hi from a config map\n",
        "from-talker\n",
        "config-read-only\n",
    ] {
        assert!(stdout.contains(want), "{want:?} in {stdout}");
    }
    // The exec runs as the container's user given by name, under its RuntimeDefault filter (mode 2).
    assert!(
        stdout.contains("uid=1000 groups=1000\n") && stdout.contains("seccomp=2\n"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("hi from a config map").count(),
        2,
        "the config map through the symlinked hostPath too: {stdout}"
    );
    let cpus = stdout
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(cpus, 2, "the guest sees the pod's vCPUs");
    let (c, m) = code(
        rt.exec_sync(ExecSyncRequest {
            container_id: sleeper.clone(),
            cmd: vec!["sleep".into(), "600".into()],
            timeout: 3,
        })
        .await,
    );
    assert_eq!(c, Code::DeadlineExceeded, "{m}");

    // Logs, and their rotation.
    let talker_log = logs.join("talker.log");
    let log = wait_log(
        &talker_log,
        &["stdout F hello", "stderr F oops", "stdout F tick 1"],
        Duration::from_secs(120),
    )
    .await;
    for line in log.lines() {
        let mut parts = line.splitn(4, ' ');
        let ts = parts.next().unwrap();
        assert!(ts.ends_with('Z') && ts.len() >= 20, "{line}");
        assert!(matches!(parts.next(), Some("stdout" | "stderr")), "{line}");
        assert!(matches!(parts.next(), Some("F" | "P")), "{line}");
    }
    std::fs::rename(&talker_log, logs.join("talker.log.1")).unwrap();
    rt.reopen_container_log(ReopenContainerLogRequest {
        container_id: talker.clone(),
    })
    .await
    .expect("ReopenContainerLog");
    let rotated = wait_log(&talker_log, &["stdout F tick"], Duration::from_secs(60)).await;
    assert!(rotated.contains("stdout F tick"), "{rotated}");

    // Stats, metrics and resource updates.
    stats::stats_and_resources(&mut rt, &pod, &talker, &sleeper).await;

    // OOM: 64 MiB buffers under a 16 MiB limit.
    let hog = create_container(
        &mut rt,
        &pod,
        container_config(
            "hog",
            &image,
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4"],
            16 << 20,
        ),
        &config_a,
    )
    .await;
    rt.start_container(StartContainerRequest {
        container_id: hog.clone(),
    })
    .await
    .unwrap();
    let s = wait_exited(&mut rt, &hog, Duration::from_secs(180)).await;
    assert_eq!(
        (s.state, s.reason.as_str(), s.exit_code),
        (ContainerState::ContainerExited as i32, "OOMKilled", 137),
        "{s:?}"
    );
    assert!(
        s.finished_at >= s.started_at && s.started_at > s.created_at,
        "{s:?}"
    );

    // Stop without a handler: the shell in its own PID namespace ignores SIGTERM, so it is killed.
    rt.stop_container(StopContainerRequest {
        container_id: talker.clone(),
        timeout: 2,
    })
    .await
    .expect("StopContainer");
    let s = status(&mut rt, &talker).await;
    assert_eq!(
        (s.state, s.exit_code, s.reason.as_str()),
        (ContainerState::ContainerExited as i32, 137, "Error"),
        "{s:?}"
    );
    // Stopping again succeeds.
    rt.stop_container(StopContainerRequest {
        container_id: talker.clone(),
        timeout: 2,
    })
    .await
    .unwrap();
    let exited = ContainerFilter {
        state: Some(ContainerStateValue {
            state: ContainerState::ContainerExited as i32,
        }),
        ..Default::default()
    };
    let exited = list_containers(&mut rt, Some(exited)).await;
    assert_eq!(exited.len(), 2, "{exited:?}");
    let by_label = ContainerFilter {
        label_selector: HashMap::from([("name".into(), "sleeper".into())]),
        ..Default::default()
    };
    let by_label = list_containers(&mut rt, Some(by_label)).await;
    assert_eq!(by_label.len(), 1);
    assert_eq!(by_label[0].id, sleeper);
    rt.remove_container(RemoveContainerRequest {
        container_id: hog.clone(),
    })
    .await
    .expect("RemoveContainer");
    let (c, _) = code(
        rt.container_status(ContainerStatusRequest {
            container_id: hog.clone(),
            verbose: false,
        })
        .await,
    );
    assert_eq!(c, Code::NotFound);
    rt.remove_container(RemoveContainerRequest {
        container_id: hog.clone(),
    })
    .await
    .unwrap();

    // Events seen so far for the talker: created, started, stopped.
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("event")
            .unwrap()
            .unwrap();
        if ev.container_id == talker {
            kinds.push(ev.container_event_type);
        }
    }
    assert_eq!(kinds, [0, 1, 2]);

    let left = Left {
        d,
        socket,
        guest,
        daemon_log,
        image,
        logs,
        pod,
        sleeper,
        talker,
    };
    restart::crash_and_restart(rt, daemon, left).await;
}

/// `c` limited to half a CPU (a CFS quota, so that the cfs metrics have values).
/// Runs as the image's `app` user, given by name, under the RuntimeDefault seccomp profile, without
/// no_new_privs (what a "baseline" pod sends; exec into it must keep both).
fn as_app_with_runtime_default(mut c: ContainerConfig) -> ContainerConfig {
    let sc = c
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default);
    sc.run_as_username = "app".into();
    sc.seccomp = Some(SecurityProfile {
        profile_type: security_profile::ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    c
}

fn with_cpu_quota(mut c: ContainerConfig) -> ContainerConfig {
    let r = c
        .linux
        .get_or_insert_with(Default::default)
        .resources
        .get_or_insert_with(Default::default);
    (r.cpu_period, r.cpu_quota) = (100_000, 50_000);
    c
}

//! End to end on a real KVM VM: the guest agent runs OCI containers (youki's libcontainer) from a busybox
//! block image built offline. One boot, many checks: sandbox setup, create/start, stdout streaming, exec
//! with and without a tty, the container's user, capabilities and seccomp filter applied to exec'd processes,
//! stats and processes, SIGTERM with and without a handler, an OOM kill reported as an event and in the
//! exit status, node networking (bridge, veth, VLAN, iptables) in a NET_ADMIN container, bad requests, and
//! removal. Prints how long each agent RPC took.

mod exec_security;
mod guest_stats;
mod oci;
mod pod_network;
mod steps;

use oci::{busybox_image, spec};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pb::AgentClient;
use podvisor_proto as pb;
use podvisor_testkit::guest::vm_prerequisites;
use podvisor_testkit::vm::{vm_config, wait_for_agent};
use tonic::transport::Channel;
use tonic::Code;
use vmm::{BlockSlotConfig, Vm};

/// Generous: on a shared PVM host under load a boot to agent-ready took over 300 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// RPC timings, printed at the end.
#[derive(Default)]
pub struct Timings(BTreeMap<&'static str, Vec<Duration>>);

impl Timings {
    pub async fn time<T>(
        &mut self,
        name: &'static str,
        f: impl std::future::Future<Output = T>,
    ) -> T {
        let start = Instant::now();
        let out = f.await;
        self.0.entry(name).or_default().push(start.elapsed());
        out
    }

    fn print(&self) {
        eprintln!("agent RPC timings (this host, PVM-emulated guest kernel):");
        for (name, all) in &self.0 {
            let ms: Vec<String> = all.iter().map(|d| d.as_millis().to_string()).collect();
            eprintln!("  {name:<16} {} ms", ms.join(", "));
        }
    }
}

/// Collects a process's output stream until EOF.
fn collect(
    agent: &AgentClient<Channel>,
    container: &str,
    exec: &str,
    stream: pb::OutputStream,
) -> tokio::task::JoinHandle<String> {
    let mut agent = agent.clone();
    let req = pb::ReadOutputRequest {
        container_id: container.into(),
        exec_id: exec.into(),
        stream: stream.into(),
    };
    tokio::spawn(async move {
        let mut s = agent
            .read_output(req)
            .await
            .expect("read_output")
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = s.message().await.expect("output chunk") {
            out.extend(chunk.data);
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

fn create(id: &str, spec: Vec<u8>) -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec,
        image_storage_id: "busybox".into(),
        writable_layer_bytes: 16 << 20,
        user: String::new(),
    }
}

/// Runs `args` in container `c` as exec `e`: the agent derives the rest from the container's process.
fn exec_req(c: &str, e: &str, args: &[&str], terminal: bool) -> pb::ExecProcessRequest {
    pb::ExecProcessRequest {
        container_id: c.into(),
        exec_id: e.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        terminal,
    }
}

/// Waits for process `e` of container `c` (its init when `e` is empty) to exit.
async fn wait(agent: &mut AgentClient<Channel>, c: &str, e: &str) -> pb::WaitProcessResponse {
    agent.wait_process(ids(c, e)).await.unwrap().into_inner()
}

/// Names container `id` in a request.
fn container(id: &str) -> pb::ContainerRequest {
    pb::ContainerRequest {
        container_id: id.into(),
    }
}

fn ids(c: &str, e: &str) -> pb::ProcessRequest {
    pb::ProcessRequest {
        container_id: c.into(),
        exec_id: e.into(),
    }
}

fn signal(c: &str, sig: i32) -> pb::SignalProcessRequest {
    pb::SignalProcessRequest {
        container_id: c.into(),
        exec_id: String::new(),
        signal: sig as u32,
        all: false,
    }
}

/// Prints the guest console when the test panics (the temp dir goes away with it).
struct ConsoleOnPanic(std::path::PathBuf);

impl Drop for ConsoleOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("guest console:\n{log}");
        }
    }
}

#[test]
fn containers_in_a_real_vm() {
    let Some((kernel, initramfs)) = vm_prerequisites("containers_in_a_real_vm") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path());
    let mut config = vm_config(
        dir.path(),
        &kernel,
        &initramfs,
        vec![BlockSlotConfig { read_only: true }],
    );
    config.mem_mib = 384;
    let vsock_uds = config.vsock_uds.clone();
    let _console = ConsoleOnPanic(config.console_log.clone());
    let vm = Vm::boot(config).expect("boot");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let console = vm.console_log().to_path_buf();
    let result = rt.block_on(async {
        let agent = wait_for_agent(&vsock_uds, BOOT_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        vm.attach_block(0, &image, true)
            .map_err(|e| e.to_string())?;
        scenario(agent).await;
        Ok::<_, String>(())
    });
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    if let Err(e) = result {
        panic!("{e}\nconsole:\n{log}");
    }
    vm.stop();
}

async fn scenario(mut agent: AgentClient<Channel>) {
    let mut t = Timings::default();
    let avoid_avx = steps::set_up(&mut agent, &mut t).await;
    let mut events = agent
        .get_events(pb::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    // c1: a shell that handles SIGTERM and shows the GLIBC_TUNABLES the agent gave it.
    let script =
        "trap 'echo got-term; exit 7' TERM; echo started; echo \"tunables=$GLIBC_TUNABLES\"; \
                  sleep 1000 & wait";
    let created = t
        .time(
            "CreateContainer",
            agent.create_container(create("c1", spec(&["sh", "-c", script], None))),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(created.pid > 1);
    let c1_out = collect(&agent, "c1", "", pb::OutputStream::Stdout);
    t.time("StartContainer", agent.start_container(container("c1")))
        .await
        .unwrap();

    // exec without a tty: output, hostname, resolv.conf, seccomp (mkdir denied), exit code.
    let exec = exec_req(
        "c1",
        "e1",
        &[
            "sh",
            "-c",
            "echo hello; hostname; cat /etc/resolv.conf; mkdir /tmp/d || echo mkdir-denied; exit 3",
        ],
        false,
    );
    t.time("ExecProcess", agent.exec_process(exec))
        .await
        .unwrap();
    let e1_out = collect(&agent, "c1", "e1", pb::OutputStream::Stdout);
    let e1_err = collect(&agent, "c1", "e1", pb::OutputStream::Stderr);
    let waited = t
        .time("WaitProcess", agent.wait_process(ids("c1", "e1")))
        .await
        .unwrap()
        .into_inner();
    let out = e1_out.await.unwrap();
    let err = e1_err.await.unwrap();
    assert_eq!(
        (waited.exit_code, waited.signal, waited.oom_killed),
        (3, 0, false),
        "stdout {out:?} stderr {err:?}"
    );
    assert!(
        err.contains("Operation not permitted"),
        "seccomp denial on stderr: {err:?}"
    );
    assert!(
        out.starts_with("hello\npod-a\nnameserver 10.96.0.10\n"),
        "{out:?}"
    );
    assert!(
        out.contains("options ndots:5") && out.ends_with("mkdir-denied\n"),
        "{out:?}"
    );

    // exec with a tty.
    let exec = exec_req(
        "c1",
        "tty",
        &["sh", "-c", "tty; read line; echo got:$line"],
        true,
    );
    agent.exec_process(exec).await.unwrap();
    let tty_out = collect(&agent, "c1", "tty", pb::OutputStream::Stdout);
    t.time(
        "ResizeTty",
        agent.resize_tty(pb::ResizeTtyRequest {
            container_id: "c1".into(),
            exec_id: "tty".into(),
            rows: 40,
            cols: 120,
        }),
    )
    .await
    .unwrap();
    t.time(
        "WriteStdin",
        agent.write_stdin(pb::WriteStdinRequest {
            container_id: "c1".into(),
            exec_id: "tty".into(),
            data: b"abc\n".to_vec(),
        }),
    )
    .await
    .unwrap();
    let waited = wait(&mut agent, "c1", "tty").await;
    assert_eq!(waited.exit_code, 0);
    let out = tty_out.await.unwrap();
    assert!(
        out.contains("/dev/pts/") && out.contains("got:abc"),
        "{out:?}"
    );

    // Resources: update the pids limit; pause and resume (no exec while paused).
    let c1 = || container("c1");
    let resources = serde_json::to_vec(&serde_json::json!({"pids": {"limit": 48}})).unwrap();
    t.time(
        "UpdateContainer",
        agent.update_container(pb::UpdateContainerRequest {
            container_id: "c1".into(),
            resources_json: resources,
        }),
    )
    .await
    .unwrap();
    t.time("PauseContainer", agent.pause_container(c1()))
        .await
        .unwrap();
    let paused = agent
        .exec_process(exec_req("c1", "while-paused", &["true"], false))
        .await
        .unwrap_err();
    assert_eq!(paused.code(), Code::FailedPrecondition, "{paused:?}");
    t.time("ResumeContainer", agent.resume_container(c1()))
        .await
        .unwrap();

    let stats = t
        .time("StatsContainer", agent.stats_container(container("c1")))
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats.memory_usage_bytes > 0 && stats.pids >= 2 && stats.pids_limit == 48,
        "{stats:?}"
    );
    t.time("StatsSandbox", guest_stats::check(&mut agent, "c1"))
        .await;
    let procs = t
        .time("ListProcesses", agent.list_processes(container("c1")))
        .await
        .unwrap()
        .into_inner()
        .processes;
    assert!(procs.iter().any(|p| p.cmdline == "sleep 1000"), "{procs:?}");

    // SIGTERM with a handler: delivered as is, the script exits 7.
    t.time("SignalProcess", agent.signal_process(signal("c1", 15)))
        .await
        .unwrap();
    let waited = wait(&mut agent, "c1", "").await;
    assert_eq!((waited.exit_code, waited.signal), (7, 0), "{waited:?}");
    // The tunable exactly when the pod avoids AVX (the spec's env has no GLIBC_TUNABLES of its own).
    let tunables = avoid_avx.then_some(pb::AVOID_AVX_GLIBC_TUNABLES);
    assert_eq!(
        c1_out.await.unwrap(),
        format!(
            "started\ntunables={}\ngot-term\n",
            tunables.unwrap_or_default()
        )
    );

    // c2: SIGTERM to an init without a handler becomes SIGKILL.
    agent
        .create_container(create("c2", spec(&["sleep", "1000"], None)))
        .await
        .unwrap();
    agent.start_container(container("c2")).await.unwrap();
    agent.signal_process(signal("c2", 15)).await.unwrap();
    let waited = wait(&mut agent, "c2", "").await;
    assert_eq!(
        (waited.exit_code, waited.signal, waited.oom_killed),
        (137, 9, false)
    );

    steps::oom_kill(&mut agent, &mut events).await;

    // A shared pod PID namespace from now on: c4's init is not PID 1 there.
    let shared = pb::CreateSandboxRequest {
        hostname: "pod-a".into(),
        avoid_avx,
        share_pid_namespace: true,
        ..Default::default()
    };
    agent.create_sandbox(shared).await.unwrap();

    // User resolution from the image's /etc/passwd.
    let mut req = create("c4", spec(&["sh", "-c", "echo pid=$$; id"], None));
    req.user = "app".into();
    agent.create_container(req).await.unwrap();
    let c4_out = collect(&agent, "c4", "", pb::OutputStream::Stdout);
    agent.start_container(container("c4")).await.unwrap();
    assert_eq!(wait(&mut agent, "c4", "").await.exit_code, 0);
    let out = c4_out.await.unwrap();
    assert!(!out.starts_with("pid=1\n"), "shared PID namespace: {out:?}");
    assert!(
        out.contains("uid=1000(app) gid=1000(app) groups=44(video)"),
        "{out:?}"
    );

    // Exec'd processes get the container's user (resolved by name), capabilities and seccomp filter.
    t.time("exec security", exec_security::exec_security(&mut agent))
        .await;

    // A NET_ADMIN container: bridge, veth, VLAN and iptables (legacy and nft) in the pod VM's kernel.
    t.time(
        "NetAdminChecks",
        pod_network::node_network_features(&mut agent),
    )
    .await;

    steps::bad_requests(&mut agent).await;

    steps::tear_down(&mut agent, &mut t).await;
    t.print();
}

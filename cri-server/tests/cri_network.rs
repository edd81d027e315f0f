//! Pod networking end to end on real VMs and the real CNI plugins (Debian containernetworking-plugins
//! bridge + host-local + portmap): two pods get addresses on a test bridge; the host reaches a server
//! in a container by pod IP and by host port; the pods reach each other; the DNS config is in the
//! guest. The pods' VM threads are in their host cgroups (vCPUs in `<cgroup_parent>/podvisor-<id>`
//! with the pod's CPU limits, device threads in the overhead cgroup), as /proc/<pid>/task/<tid>/cgroup
//! shows. After RemovePodSandbox, and after a SIGKILL of the daemon and its restart, no netns, veth,
//! tap, IP allocation, port-mapping rule or cgroup of the pods is left.

use std::io::BufRead;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::bed::{dump_failure, pull, PodBed};
use podvisor_testkit::cni::{nat_rules_of, netns_of, TestNetwork};
use podvisor_testkit::cri::{container_config, create_container, pod_config, run_pod};
use podvisor_testkit::daemon::{connect, podvisor_cmd, Daemon};
use podvisor_testkit::http::free_port;
use podvisor_testkit::procfs::{cgroup_of, threads_named};
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

/// The port the server in pod A listens on.
const SERVER_PORT: u16 = 8080;

/// Connects to `addr` and reads the server's greeting; retries (bounded) while it is not up yet.
fn greeting(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut buf = String::new();
                match std::io::BufReader::new(s).read_line(&mut buf) {
                    Ok(_) if buf.contains("hello") => return Ok(buf),
                    Ok(_) => last = format!("empty greeting {buf:?}"),
                    Err(e) => last = format!("read: {e}"),
                }
            }
            Err(e) => last = format!("connect: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!("{addr}: {last}"))
}

async fn exec(rt: &mut Rt, id: &str, cmd: &[&str]) -> ExecSyncResponse {
    rt.exec_sync(ExecSyncRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: 120,
    })
    .await
    .expect("ExecSync")
    .into_inner()
}

async fn pod_ip(rt: &mut Rt, id: &str) -> String {
    rt.pod_sandbox_status(PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    })
    .await
    .expect("PodSandboxStatus")
    .into_inner()
    .status
    .unwrap()
    .network
    .map(|n| n.ip)
    .unwrap_or_default()
}

async fn start(rt: &mut Rt, id: &str) {
    rt.start_container(StartContainerRequest {
        container_id: id.into(),
    })
    .await
    .expect("StartContainer");
}

/// The v1 controllers pod threads are placed in.
const CONTROLLERS: [&str; 3] = ["cpu", "cpuacct", "cpuset"];

/// Thread ids in cgroup `path` of `controller`.
fn tasks(controller: &str, path: &str) -> Vec<u32> {
    let mut t: Vec<u32> =
        std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}{path}/tasks"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
    t.sort();
    t
}

/// Asserts that the daemon's threads named `prefix` sit, `per_pod[i].1` of them, in cgroup
/// `per_pod[i].0` of every controller, and nowhere else.
fn assert_placed(pid: u32, prefix: &str, per_pod: &[(&str, usize)]) {
    let threads = threads_named(pid, prefix);
    for controller in CONTROLLERS {
        for (path, count) in per_pod {
            let mut expected: Vec<u32> = threads
                .iter()
                .filter(|(tid, _)| cgroup_of(pid, *tid, controller) == *path)
                .map(|(tid, _)| *tid)
                .collect();
            expected.sort();
            assert_eq!(
                expected.len(),
                *count,
                "{prefix}* threads in {controller}:{path}: {threads:?}"
            );
            assert_eq!(
                tasks(controller, path),
                expected,
                "{controller}:{path}/tasks"
            );
        }
    }
    assert_eq!(
        threads.len(),
        per_pod.iter().map(|(_, n)| n).sum::<usize>(),
        "{prefix}* threads outside the pods' cgroups: {threads:?}"
    );
}

/// Asserts that the cgroups at `paths` are gone in every controller.
fn assert_no_cgroups(paths: &[&str], what: &str) {
    for controller in CONTROLLERS {
        for path in paths {
            let dir = format!("/sys/fs/cgroup/{controller}{path}");
            assert!(!Path::new(&dir).exists(), "{what}: {dir} left");
        }
    }
}

/// Removes the test's cgroup tree (empty directories, deepest first).
fn remove_cgroup_tree(base: &str) {
    for controller in CONTROLLERS {
        let root = PathBuf::from(format!("/sys/fs/cgroup/{controller}{base}"));
        let mut dirs = vec![root.clone()];
        let mut i = 0;
        while i < dirs.len() {
            for e in std::fs::read_dir(&dirs[i]).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    dirs.push(e.path());
                }
            }
            i += 1;
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Asserts that nothing of pod `id` is left on the host: netns, veth on the bridge, IP allocation,
/// portmap rules.
fn assert_released(net: &TestNetwork, id: &str, ip: &str, what: &str) {
    assert!(
        netns_of(id).is_empty(),
        "{what}: netns left: {:?}",
        netns_of(id)
    );
    assert!(
        !net.allocations().contains(&ip.to_string()),
        "{what}: {ip} still allocated: {:?}",
        net.allocations()
    );
    assert!(
        nat_rules_of(id).is_empty(),
        "{what}: NAT rules left: {:?}",
        nat_rules_of(id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_the_host_and_each_other_and_clean_up() {
    let test = "pods_reach_the_host_and_each_other_and_clean_up";
    let Some(bed) = PodBed::new(test, "e2e/net") else {
        return;
    };
    let bed = Arc::new(bed);
    let cgroups = format!("/podvisor-e2e-{}", std::process::id());
    let result = tokio::spawn(scenario(bed.clone(), cgroups.clone())).await;
    remove_cgroup_tree(&cgroups);
    if let Err(e) = result {
        dump_failure(bed.dir(), &bed.dir().join("daemon.log"));
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(bed: Arc<PodBed>, cg: String) {
    let (guest, d, image, net) = (&bed.guest, bed.dir(), bed.image.clone(), bed.net());
    let socket = d.join("podvisor.sock");
    let log = d.join("daemon.log");
    let (default_parent, overhead) = (format!("{cg}/default"), format!("{cg}/overhead"));
    let podvisor = || {
        podvisor_cmd(
            env!("CARGO_BIN_EXE_podvisor"),
            d,
            &[
                "--image-slots",
                "1",
                "--default-pod-memory-mib",
                "256",
                "--default-cgroup-parent",
                &default_parent,
                "--overhead-cgroup",
                &overhead,
            ],
        )
    };
    let mut daemon = Daemon::start_with(podvisor(), &socket, guest, Some(&log)).await;
    let chan = connect(socket.clone()).await;
    let mut rt = RuntimeServiceClient::new(chan.clone());
    let status = rt
        .status(StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let network = status
        .conditions
        .iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("NetworkReady condition");
    assert!(network.status, "NetworkReady: {network:?}");
    pull(chan.clone(), &image).await;
    let logs = d.join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();

    // Pod A serves a greeting on SERVER_PORT, published on a host port; pod B is a client.
    let host_port = free_port();
    let mut config_a = pod_config("server", "uid-net-a", &logs);
    config_a.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: i32::from(SERVER_PORT),
        host_port: i32::from(host_port),
        host_ip: String::new(),
    }];
    // Pod A has a CPU limit of 1.5 CPUs (2 vCPUs) and kubelet's pod cgroup, with that limit, as
    // parent; pod B has no parent and a limit of 1 CPU, which its sandbox cgroup gets itself.
    let parent_a = format!("{cg}/kubepods/pod-uid-net-a");
    let parent_dir = format!("/sys/fs/cgroup/cpu{parent_a}");
    std::fs::create_dir_all(&parent_dir).unwrap();
    std::fs::write(format!("{parent_dir}/cpu.cfs_quota_us"), "150000").unwrap();
    config_a.linux = Some(LinuxPodSandboxConfig {
        cgroup_parent: parent_a.clone(),
        resources: Some(LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 150_000,
            cpu_shares: 1536,
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut config_b = pod_config("client", "uid-net-b", &logs);
    config_b.linux = Some(LinuxPodSandboxConfig {
        resources: Some(LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 100_000,
            cpu_shares: 1024,
            ..Default::default()
        }),
        ..Default::default()
    });
    let started = Instant::now();
    let (mut rt_a, mut rt_b) = (rt.clone(), rt.clone());
    let (a, b) = tokio::join!(run_pod(&mut rt_a, &config_a), run_pod(&mut rt_b, &config_b));
    eprintln!("two pods ready in {:?}", started.elapsed());
    let (ip_a, ip_b) = (pod_ip(&mut rt, &a).await, pod_ip(&mut rt, &b).await);
    for ip in [&ip_a, &ip_b] {
        assert!(
            ip.starts_with(&format!("{}.", net.prefix)),
            "pod IP {ip} not in {}.0/24",
            net.prefix
        );
        assert!(
            net.allocations().contains(ip),
            "{ip} not in host-local's allocations"
        );
    }
    assert_ne!(ip_a, ip_b);
    assert_eq!(netns_of(&a).len(), 1, "pod A's netns");
    assert_eq!(
        net.bridge_ports().len(),
        2,
        "one veth per pod on {}",
        net.bridge
    );

    // Host cgroups: vCPUs in the sandbox cgroups, the device threads (vsock, blk0, net) in the
    // overhead cgroups; limits on B's sandbox cgroup, none of its own on A's (its parent has them).
    let (sandbox_a, sandbox_b) = (
        format!("{parent_a}/podvisor-{a}"),
        format!("{default_parent}/podvisor-{b}"),
    );
    let (overhead_a, overhead_b) = (format!("{overhead}/{a}"), format!("{overhead}/{b}"));
    let pid = daemon.pid();
    assert_placed(pid, "vcpu", &[(&sandbox_a, 2), (&sandbox_b, 1)]);
    assert_placed(pid, "virtio-", &[(&overhead_a, 3), (&overhead_b, 3)]);
    let cg_file = |controller: &str, cgroup: &str, f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}{cgroup}/{f}"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(cg_file("cpu", &sandbox_a, "cpu.cfs_quota_us"), "-1");
    assert_eq!(cg_file("cpu", &sandbox_b, "cpu.cfs_quota_us"), "100000");
    assert_eq!(cg_file("cpu", &sandbox_b, "cpu.shares"), "1024");
    // The pod's CPU in its stats is what its threads used on the host: at least what its vCPUs'
    // cgroup had counted just before.
    let vcpus_used: u64 = cg_file("cpuacct", &sandbox_a, "cpuacct.usage")
        .parse()
        .unwrap();
    assert!(vcpus_used > 0);
    let stats = rt
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: a.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .unwrap();
    let used = stats
        .linux
        .unwrap()
        .cpu
        .unwrap()
        .usage_core_nano_seconds
        .unwrap()
        .value;
    assert!(
        used >= vcpus_used,
        "pod A used {used} ns, its vCPUs alone {vcpus_used} ns"
    );

    let server = container_config(
        "server",
        &image,
        &[
            "sh",
            "-c",
            &format!("while true; do echo hello-from-$(hostname) | nc -l -p {SERVER_PORT}; done"),
        ],
        0,
    );
    let client = container_config("client", &image, &["sleep", "3600"], 0);
    let (mut rt_a, mut rt_b) = (rt.clone(), rt.clone());
    let (ca, cb) = tokio::join!(
        create_container(&mut rt_a, &a, server, &config_a),
        create_container(&mut rt_b, &b, client, &config_b)
    );
    start(&mut rt, &ca).await;
    start(&mut rt, &cb).await;

    // The host reaches the server by pod IP...
    let by_ip: SocketAddr = format!("{ip_a}:{SERVER_PORT}").parse().unwrap();
    let got = tokio::task::spawn_blocking(move || greeting(by_ip, Duration::from_secs(180)))
        .await
        .unwrap()
        .expect("host -> pod A by pod IP");
    assert!(got.contains("hello-from-server"), "{got:?}");
    // ...and by host port (portmap's DNAT of locally generated traffic to a local address).
    let by_port: SocketAddr = format!("{}:{host_port}", net.gateway()).parse().unwrap();
    let got = tokio::task::spawn_blocking(move || greeting(by_port, Duration::from_secs(60)))
        .await
        .unwrap()
        .expect("host -> pod A by host port");
    assert!(got.contains("hello-from-server"), "{got:?}");

    // Pod B reaches pod A over the bridge.
    let r = exec(&mut rt, &cb, &["nc", &ip_a, &SERVER_PORT.to_string()]).await;
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("hello-from-server"),
        "pod B -> pod A: exit {} stdout {out:?} stderr {:?}",
        r.exit_code,
        String::from_utf8_lossy(&r.stderr)
    );
    // The guest has the pod's address, default route and DNS config.
    let r = exec(
        &mut rt,
        &cb,
        &[
            "cat",
            "/proc/net/fib_trie",
            "/proc/net/route",
            "/etc/resolv.conf",
        ],
    )
    .await;
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains(&ip_b), "guest addresses: {out}");
    let gw_hex = {
        let o: Vec<u8> = net
            .gateway()
            .split('.')
            .map(|p| p.parse().unwrap())
            .collect();
        format!("{:02X}{:02X}{:02X}{:02X}", o[3], o[2], o[1], o[0])
    };
    assert!(
        out.lines()
            .any(|l| l.starts_with("eth0\t00000000\t") && l.contains(&gw_hex)),
        "no default route via {} in the guest: {out}",
        net.gateway()
    );
    assert!(out.contains("nameserver 10.96.0.10"), "{out}");
    assert!(out.contains("search e2e.svc.cluster.local"), "{out}");

    // RemovePodSandbox releases everything of pod B; pod A is untouched.
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: b.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: b.clone(),
    })
    .await
    .unwrap();
    assert_released(net, &b, &ip_b, "after RemovePodSandbox");
    assert_no_cgroups(&[&sandbox_b, &overhead_b], "after RemovePodSandbox");
    assert_eq!(
        net.bridge_ports().len(),
        1,
        "pod B's veth is gone, pod A's stays"
    );

    // SIGKILL with pod A running: the restarted daemon releases its network.
    daemon.kill9();
    drop(rt);
    assert_eq!(
        netns_of(&a).len(),
        1,
        "a crash leaves the netns for the restart to clean"
    );
    let _daemon = Daemon::start_with(podvisor(), &socket, guest, Some(&log)).await;
    let mut rt = RuntimeServiceClient::new(connect(socket.clone()).await);
    let status = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: a.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.state, PodSandboxState::SandboxNotready as i32);
    assert_released(net, &a, &ip_a, "after kill -9 and restart");
    assert_no_cgroups(&[&sandbox_a, &overhead_a], "after kill -9 and restart");
    assert!(
        net.bridge_ports().is_empty(),
        "veths left: {:?}",
        net.bridge_ports()
    );
    // Stop and Remove of the dead pod still succeed, twice each (after removal the pod is unknown:
    // Stop answers NotFound, Remove succeeds).
    for _ in 0..2 {
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: a.clone(),
        })
        .await
        .unwrap();
    }
    for _ in 0..2 {
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: a.clone(),
        })
        .await
        .unwrap();
    }
    assert!(!Path::new(&d.join("state/pods").join(&a)).exists());
}

//! What node agents (kube-proxy, CNI agents, CSI node plugins) do from a privileged host pod: program
//! the node's iptables through the node's root, create a bridge on the node, and share mounts with
//! the node both ways (Bidirectional) or receive the node's (HostToContainer).

use std::path::Path;
use std::process::Command;

use k8s_cri::v1::*;
use podvisor_testkit::cri::{container_config, create_container};

use super::{exec, node_namespaces, Rt};

/// Runs a node agent in host pod `pod` and checks each of its effects on the node.
pub async fn node_agent(rt: &mut Rt, pod: &str, config: &PodSandboxConfig, image: &str, d: &Path) {
    let (both, inbound) = (d.join("bidirectional"), d.join("host-to-container"));
    for dir in [&both, &inbound] {
        shared_mount(dir);
    }
    let mut agent = container_config("node-agent", image, &["sleep", "3600"], 0);
    let mount = |host: &Path, at: &str, propagation: MountPropagation| Mount {
        host_path: host.display().to_string(),
        container_path: at.into(),
        propagation: propagation as i32,
        ..Default::default()
    };
    agent.mounts = vec![
        mount(
            Path::new("/"),
            "/host",
            MountPropagation::PropagationPrivate,
        ),
        mount(&both, "/both", MountPropagation::PropagationBidirectional),
        mount(
            &inbound,
            "/inbound",
            MountPropagation::PropagationHostToContainer,
        ),
    ];
    agent.linux.as_mut().unwrap().security_context = Some(LinuxContainerSecurityContext {
        namespace_options: Some(node_namespaces()),
        privileged: true,
        ..Default::default()
    });
    let agent = create_container(rt, pod, agent, config).await;
    rt.start_container(StartContainerRequest {
        container_id: agent.clone(),
    })
    .await
    .unwrap();

    // Privileged: the node's devices, as containerd gives them (a CNI agent opens /dev/net/tun).
    let tun = exec(
        rt,
        &agent,
        "test -c /dev/net/tun && echo tun; test -c /dev/loop-control && echo loop",
    )
    .await;
    assert_eq!(tun, "tun\nloop\n");
    programs_the_node(rt, &agent).await;
    shares_mounts(rt, &agent, &both, &inbound).await;
    rt.remove_container(RemoveContainerRequest {
        container_id: agent,
    })
    .await
    .unwrap();
}

/// kube-proxy: a chain in the node's iptables; a CNI agent: a bridge on the node.
async fn programs_the_node(rt: &mut Rt, agent: &str) {
    // kube-proxy: a chain in the node's iptables, made with the node's own iptables.
    let chain = format!("PODVISOR-E2E-{}", std::process::id());
    let iptables = format!(
        "chroot /host {}",
        host(&["sh", "-c", "command -v iptables"]).trim()
    );
    exec(
        rt,
        agent,
        &format!("{iptables} -w -N {chain} && {iptables} -w -A {chain} -j RETURN"),
    )
    .await;
    let rules = host(&["iptables", "-w", "-S", &chain]);
    assert!(rules.contains(&format!("-A {chain} -j RETURN")), "{rules}");
    exec(
        rt,
        agent,
        &format!("{iptables} -w -F {chain} && {iptables} -w -X {chain}"),
    )
    .await;
    assert!(Command::new("iptables")
        .args(["-w", "-S", &chain])
        .output()
        .is_ok_and(|o| !o.status.success()));

    // A CNI agent: a bridge on the node.
    let bridge = format!("pvbr{}", std::process::id() % 100_000);
    exec(rt, agent, &format!("ip link add {bridge} type bridge")).await;
    let shown = host(&["ip", "link", "show", &bridge]);
    let _ = Command::new("ip").args(["link", "del", &bridge]).status();
    assert!(shown.contains(&bridge), "{shown}");
}

/// A CSI node plugin: mounts reach the node (`both`: Bidirectional) and come from it (`inbound`:
/// HostToContainer).
async fn shares_mounts(rt: &mut Rt, agent: &str, both: &Path, inbound: &Path) {
    // A CSI node plugin: its mount reaches the node (Bidirectional)...
    exec(
        rt,
        agent,
        "mkdir -p /both/vol && mount -t tmpfs e2e-bidirectional /both/vol",
    )
    .await;
    let seen = mounted(&both.join("vol"));
    // ... and the node's later mounts reach it (HostToContainer).
    std::fs::create_dir_all(inbound.join("late")).unwrap();
    run(&[
        "mount",
        "-t",
        "tmpfs",
        "e2e-inbound",
        &inbound.join("late").display().to_string(),
    ]);
    let inside = exec(rt, agent, "cat /proc/mounts").await;
    for dir in [
        both.join("vol"),
        inbound.join("late"),
        both.to_path_buf(),
        inbound.to_path_buf(),
    ] {
        let _ = Command::new("umount").arg("-l").arg(&dir).status();
    }
    assert!(
        seen,
        "the container's mount under a Bidirectional volume is not on the node"
    );
    assert!(
        inside.contains("e2e-inbound /inbound/late tmpfs"),
        "the node's mount did not reach the container:\n{inside}"
    );
}

/// A Bidirectional mount of a node path that does not propagate is refused, as containerd does.
pub async fn private_source_refused(
    rt: &mut Rt,
    pod: &str,
    config: &PodSandboxConfig,
    image: &str,
    d: &Path,
) {
    let private = d.join("private");
    std::fs::create_dir_all(&private).unwrap();
    run(&[
        "mount",
        "--bind",
        &private.display().to_string(),
        &private.display().to_string(),
    ]);
    run(&["mount", "--make-private", &private.display().to_string()]);
    let mut c = container_config("bad-propagation", image, &["true"], 0);
    c.mounts = vec![Mount {
        host_path: private.display().to_string(),
        container_path: "/p".into(),
        propagation: MountPropagation::PropagationBidirectional as i32,
        ..Default::default()
    }];
    let e = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(c),
            sandbox_config: Some(config.clone()),
        })
        .await
        .unwrap_err();
    let _ = Command::new("umount").arg(&private).status();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().starts_with("config.mounts[0].propagation:") && e.message().contains("shared"),
        "{}",
        e.message()
    );
}

/// Makes `dir` a shared mount point of its own (what kubelet's directory is on a node).
fn shared_mount(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let dir = dir.display().to_string();
    run(&["mount", "--bind", &dir, &dir]);
    run(&["mount", "--make-shared", &dir]);
}

/// Whether something is mounted at `path` on the node.
fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let point = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(point.as_str()))
}

fn run(args: &[&str]) {
    let ok = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(ok.success(), "{args:?}: {ok}");
}

fn host(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

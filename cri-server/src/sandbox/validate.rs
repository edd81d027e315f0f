//! The pod's guest setup request, and the checks of a pod's or container's config that run before
//! anything is created: a bad request costs
//! milliseconds, never a VM boot or a CNI call. Names end up in `CNI_ARGS` (environment variables of the
//! CNI plugins), in name reservations and in messages, so they are bounded and restricted to the
//! characters Kubernetes object names use.

use k8s_cri::v1::{ContainerConfig, LinuxContainerResources, NamespaceMode, PodSandboxConfig};
use podvisor_proto as pb;

use super::SandboxError;
use crate::pod::PodKind;
use crate::text::echo;

/// The longest pod or container name, namespace or uid (a Kubernetes DNS subdomain).
pub const MAX_NAME: usize = 253;

fn invalid(field: &str, msg: impl std::fmt::Display) -> SandboxError {
    SandboxError::InvalidArgument(format!("{field}: {msg}"))
}

/// Checks a metadata name, namespace or uid: 1-[`MAX_NAME`] bytes of `[A-Za-z0-9._-]`.
fn check_name(field: &str, v: &str) -> Result<(), SandboxError> {
    if v.is_empty() {
        return Err(invalid(field, "empty"));
    }
    let ok = v.len() <= MAX_NAME
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(invalid(
            field,
            format!(
                "{} is not a name (1-{MAX_NAME} bytes of [A-Za-z0-9._-])",
                echo(v)
            ),
        ));
    }
    Ok(())
}

/// The name reservation of a pod: `<name>_<namespace>_<uid>_<attempt>` (as containerd does).
pub fn pod_name_key(config: &PodSandboxConfig) -> Result<String, SandboxError> {
    let m = config
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("config.metadata", "missing"))?;
    check_name("config.metadata.name", &m.name)?;
    // containerd requires only the name; namespace and uid, when given, go into CNI_ARGS too.
    for (field, v) in [
        ("config.metadata.namespace", &m.namespace),
        ("config.metadata.uid", &m.uid),
    ] {
        if !v.is_empty() {
            check_name(field, v)?;
        }
    }
    Ok(format!(
        "{}_{}_{}_{}",
        m.name, m.namespace, m.uid, m.attempt
    ))
}

/// The name reservation of a container: `<name>_<pod name>_<pod namespace>_<pod uid>_<attempt>`.
pub fn container_name_key(
    config: &ContainerConfig,
    pod: &PodSandboxConfig,
) -> Result<String, SandboxError> {
    let m = config
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("config.metadata", "missing"))?;
    check_name("config.metadata.name", &m.name)?;
    let p = pod.metadata.clone().unwrap_or_default();
    Ok(format!(
        "{}_{}_{}_{}_{}",
        m.name, p.name, p.namespace, p.uid, m.attempt
    ))
}

/// The runtime handler of native pods.
pub const NATIVE_HANDLER: &str = "native";

/// The node namespaces a pod config asks to share.
pub fn node_namespaces(config: &PodSandboxConfig) -> pb::NodeNamespaces {
    let ns = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let node = NamespaceMode::Node as i32;
    pb::NodeNamespaces {
        network: ns.network == node,
        pid: ns.pid == node,
        ipc: ns.ipc == node,
    }
}

/// What runs the pod: natively on the node for the [`NATIVE_HANDLER`] and, under the default handler,
/// for pods that share a node namespace (a VM cannot); a VM otherwise. With native pods refused
/// (`native` false), or under the VM handler named explicitly, a pod that needs the node is refused
/// with what a VM cannot do.
pub fn pod_kind(
    config: &PodSandboxConfig,
    handler: &str,
    native: bool,
) -> Result<PodKind, SandboxError> {
    let node = node_namespaces(config);
    if handler == NATIVE_HANDLER && native {
        return Ok(PodKind::Native);
    }
    if !(node.network || node.pid || node.ipc) {
        return Ok(PodKind::Vm);
    }
    if native && handler.is_empty() {
        return Ok(PodKind::Native);
    }
    let field = "config.linux.security_context.namespace_options";
    if node.network {
        return Err(invalid(
            &format!("{field}.network"),
            "hostNetwork pods are not supported: a podvisor pod is a VM with its own network \
             (native pods, which share the node's, are refused on this node)",
        ));
    }
    let name = if node.pid { "pid" } else { "ipc" };
    Err(SandboxError::Unimplemented(format!(
        "{field}.{name}: the node's {name} namespace cannot be shared with a pod VM (native pods, \
         which can, are refused on this node)"
    )))
}

/// /etc/hosts of a pod.
fn hosts_file(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    )
}

/// The node's hostname: what containerd gives a pod without one.
pub fn node_hostname() -> Result<String, SandboxError> {
    nix::unistd::gethostname()
        .map_err(|e| SandboxError::Io {
            path: "gethostname(2)".into(),
            source: e.into(),
        })
        .map(|h| h.to_string_lossy().into_owned())
}

/// The guest's `CreateSandbox` request of a pod, checked as the agent checks it (time and entropy are
/// added when it is sent; without a DNS config the CNI result's is added after CNI ADD). An empty
/// `hostname` is the node's, as in containerd.
pub fn sandbox_request(
    config: &PodSandboxConfig,
    node_hostname: &str,
    kind: PodKind,
) -> Result<pb::CreateSandboxRequest, SandboxError> {
    let node = node_namespaces(config);
    let named = !config.hostname.is_empty() && config.hostname != node_hostname;
    if kind == PodKind::Native && node.network && named {
        return Err(invalid(
            "config.hostname",
            format!(
                "{} cannot be set: the pod shares the node's network and UTS namespaces, whose \
                 hostname is {}",
                crate::text::echo(&config.hostname),
                crate::text::echo(node_hostname)
            ),
        ));
    }
    let hostname = if config.hostname.is_empty() {
        node_hostname.to_string()
    } else {
        config.hostname.clone()
    };
    let linux = config.linux.clone().unwrap_or_default();
    let share_pid = linux
        .security_context
        .as_ref()
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|n| n.pid == NamespaceMode::Pod as i32);
    let dns = config.dns_config.clone().unwrap_or_default();
    let hosts = match kind {
        // The node's own hosts file, as containerd copies it for every pod (kubelet mounts its own
        // over it where it manages one).
        PodKind::Native if node.network => {
            std::fs::read_to_string("/etc/hosts").unwrap_or_else(|_| hosts_file(&hostname))
        }
        _ => hosts_file(&hostname),
    };
    let request = pb::CreateSandboxRequest {
        hosts,
        hostname,
        dns_servers: dns.servers,
        dns_searches: dns.searches,
        dns_options: dns.options,
        sysctls: linux.sysctls.into_iter().collect(),
        time_unix_ns: 0,
        entropy: Vec::new(),
        share_pid_namespace: share_pid,
        // The pod layer knows its guest (VmPod::set_up).
        avoid_avx: false,
        node_namespaces: (kind == PodKind::Native).then_some(node),
    };
    check_sandbox(&request, config.hostname.is_empty())?;
    Ok(request)
}

/// The agent's checks of a `CreateSandbox` request, with CRI field names.
pub fn check_sandbox(
    request: &pb::CreateSandboxRequest,
    node_hostname: bool,
) -> Result<(), SandboxError> {
    pb::validate::check_sandbox(request).map_err(|e| {
        let field = match e.field.as_str() {
            "hostname" if node_hostname => "config.hostname (empty: the node's hostname)".into(),
            f if f.starts_with("sysctls") => format!("config.linux.{f}"),
            f => match f.strip_prefix("dns_") {
                Some(rest) => format!("config.dns_config.{rest}"),
                None => format!("config.{f}"),
            },
        };
        invalid(&field, e.message)
    })
}

/// The node's resolver settings, for a pod that has no DNS config and whose CNI result has none
/// (containerd copies the node's resolv.conf): systemd-resolved's upstream file when it exists (the
/// node's own is its 127.0.0.53 stub), without loopback name servers, which a pod VM cannot reach.
pub fn node_dns() -> k8s_cri::v1::DnsConfig {
    let text = ["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    parse_resolv_conf(&text)
}

fn parse_resolv_conf(text: &str) -> k8s_cri::v1::DnsConfig {
    let mut dns = k8s_cri::v1::DnsConfig::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words
                    .next()
                    .and_then(|w| w.parse::<std::net::IpAddr>().ok())
                    .filter(|ip| !ip.is_loopback())
                {
                    dns.servers.push(ip.to_string());
                }
            }
            Some("search" | "domain") => dns.searches = words.map(String::from).collect(),
            Some("options") => dns.options.extend(words.map(String::from)),
            _ => {}
        }
    }
    let max = pb::validate::MAX_ITEMS;
    dns.servers.truncate(max);
    dns.searches.truncate(max);
    dns.options.truncate(max);
    dns
}

/// The CPUs (or memory nodes) of a cpuset list such as `0-3,6`; None if it does not parse.
fn cpuset(list: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in list.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        if a > b || b - a > 65_536 {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

/// Checks that a pod's cpusets name CPUs and memory nodes the host has (they confine the VM's vCPU
/// threads on the host).
pub fn check_host_cpusets(config: &PodSandboxConfig) -> Result<(), SandboxError> {
    let linux = config.linux.clone().unwrap_or_default();
    let parts: [(&str, Option<LinuxContainerResources>); 2] = [
        ("config.linux.resources", linux.resources),
        ("config.linux.overhead", linux.overhead),
    ];
    for (prefix, r) in parts {
        let Some(r) = r else { continue };
        for (name, list, online) in [
            (
                "cpuset_cpus",
                &r.cpuset_cpus,
                "/sys/devices/system/cpu/online",
            ),
            (
                "cpuset_mems",
                &r.cpuset_mems,
                "/sys/devices/system/node/online",
            ),
        ] {
            if list.is_empty() {
                continue;
            }
            let field = format!("{prefix}.{name}");
            let wanted = cpuset(list)
                .ok_or_else(|| invalid(&field, format!("{} is not a list", echo(list))))?;
            // A host without NUMA information has node 0 only.
            let text = std::fs::read_to_string(online).unwrap_or_else(|_| "0".into());
            let host = cpuset(&text).unwrap_or_default();
            if let Some(missing) = wanted.iter().find(|c| !host.contains(c)) {
                return Err(invalid(
                    &field,
                    format!(
                        "{missing} is not online on this node (online: {})",
                        echo(text.trim())
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{LinuxPodSandboxConfig, PodSandboxMetadata};

    fn pod(name: &str) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                namespace: "default".into(),
                uid: "u1".into(),
                attempt: 1,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(pod_name_key(&pod("web")).unwrap(), "web_default_u1_1");
        let e = pod_name_key(&PodSandboxConfig::default()).unwrap_err();
        assert!(e.to_string().starts_with("config.metadata:"), "{e}");
        for bad in ["", "a\0b", "a;b=c", "a b", "a/b"] {
            let e = pod_name_key(&pod(bad)).unwrap_err().to_string();
            assert!(e.starts_with("config.metadata.name:"), "{bad:?}: {e}");
            assert!(!e.contains('\0'));
        }
        let huge = "a".repeat(128 << 10);
        let e = pod_name_key(&pod(&huge)).unwrap_err().to_string();
        assert!(e.len() < 300, "{}", e.len());
        let mut p = pod("web");
        p.metadata.as_mut().unwrap().uid = "a=b".into();
        let e = pod_name_key(&p).unwrap_err().to_string();
        assert!(e.starts_with("config.metadata.uid"), "{e}");
        // Only the name is required (as in containerd).
        p.metadata.as_mut().unwrap().uid.clear();
        p.metadata.as_mut().unwrap().namespace.clear();
        assert_eq!(pod_name_key(&p).unwrap(), "web___1");
    }

    fn with_node(mut c: PodSandboxConfig, network: bool, pid: bool, ipc: bool) -> PodSandboxConfig {
        let mode = |node: bool| {
            if node {
                NamespaceMode::Node as i32
            } else {
                NamespaceMode::Pod as i32
            }
        };
        c.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(k8s_cri::v1::LinuxSandboxSecurityContext {
                namespace_options: Some(k8s_cri::v1::NamespaceOption {
                    network: mode(network),
                    pid: mode(pid),
                    ipc: mode(ipc),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        c
    }

    #[test]
    fn pods_that_need_the_node_run_natively_unless_refused() {
        let vm = pod("web");
        assert_eq!(pod_kind(&vm, "", true).unwrap(), PodKind::Vm);
        assert_eq!(pod_kind(&vm, "podvisor", true).unwrap(), PodKind::Vm);
        assert_eq!(
            pod_kind(&vm, NATIVE_HANDLER, true).unwrap(),
            PodKind::Native
        );
        for (network, pid, ipc) in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            let c = with_node(pod("web"), network, pid, ipc);
            assert_eq!(pod_kind(&c, "", true).unwrap(), PodKind::Native);
            assert_eq!(pod_kind(&c, NATIVE_HANDLER, true).unwrap(), PodKind::Native);
            // Refused on a VM-only node, and under the VM handler by name: today's errors.
            for (handler, native) in [("", false), ("podvisor", true)] {
                let e = pod_kind(&c, handler, native).unwrap_err();
                match e {
                    SandboxError::InvalidArgument(m) => {
                        assert!(network && m.contains("hostNetwork"), "{m}")
                    }
                    SandboxError::Unimplemented(m) => {
                        let field = if pid { ".pid:" } else { ".ipc:" };
                        assert!(!network && m.contains(field), "{m}")
                    }
                    other => panic!("{other}"),
                }
            }
        }
        let c = with_node(pod("web"), true, true, true);
        let node = node_namespaces(&c);
        assert!(node.network && node.pid && node.ipc);
    }

    #[test]
    fn native_pods_on_the_node_network_keep_the_nodes_name() {
        let c = with_node(pod("web"), true, false, false);
        let r = sandbox_request(&c, "node-1", PodKind::Native).unwrap();
        assert_eq!(r.hostname, "node-1");
        assert!(r.node_namespaces.unwrap().network);
        let mut named = c.clone();
        named.hostname = "web-0".into();
        let e = sandbox_request(&named, "node-1", PodKind::Native).unwrap_err();
        assert!(e.to_string().starts_with("config.hostname:"), "{e}");
        named.hostname = "node-1".into();
        sandbox_request(&named, "node-1", PodKind::Native).unwrap();
        // A net.* sysctl would change the node's network: refused before anything starts.
        let mut sysctl = c.clone();
        sysctl.linux.as_mut().unwrap().sysctls =
            [("net.core.somaxconn".to_string(), "1024".to_string())].into();
        let e = sandbox_request(&sysctl, "node-1", PodKind::Native).unwrap_err();
        assert!(e.to_string().starts_with("config.linux.sysctls:"), "{e}");
        // A VM pod's request never names node namespaces.
        let r = sandbox_request(&pod("web"), "node-1", PodKind::Vm).unwrap();
        assert_eq!(r.node_namespaces, None);
    }

    #[test]
    fn an_empty_hostname_is_the_nodes() {
        let r = sandbox_request(&pod("web"), "node-1.example", PodKind::Vm).unwrap();
        assert_eq!(r.hostname, "node-1.example");
        assert!(
            r.hosts.contains("127.0.1.1\tnode-1.example\n"),
            "{}",
            r.hosts
        );
        let mut p = pod("web");
        p.hostname = "web-0".into();
        assert_eq!(
            sandbox_request(&p, "node", PodKind::Vm).unwrap().hostname,
            "web-0"
        );
        p.hostname = "Bad_Host".into();
        let e = sandbox_request(&p, "node", PodKind::Vm)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config.hostname:"), "{e}");
        let e = sandbox_request(&pod("web"), "bad host", PodKind::Vm)
            .unwrap_err()
            .to_string();
        assert!(e.contains("node's hostname"), "{e}");
    }

    #[test]
    fn guest_checks_run_on_the_host_with_cri_field_names() {
        let mut p = pod("web");
        p.dns_config = Some(k8s_cri::v1::DnsConfig {
            servers: vec!["not-an-ip".into()],
            ..Default::default()
        });
        let e = sandbox_request(&p, "node", PodKind::Vm)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config.dns_config.servers[0]:"), "{e}");
        let mut p = pod("web");
        p.linux = Some(LinuxPodSandboxConfig {
            sysctls: [("kernel.panic".to_string(), "1".to_string())].into(),
            ..Default::default()
        });
        let e = sandbox_request(&p, "node", PodKind::Vm)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config.linux.sysctls:"), "{e}");
    }

    #[test]
    fn node_dns_skips_loopback_servers() {
        let dns = parse_resolv_conf(
            "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\n\
             search corp.example lab.example\noptions edns0 trust-ad\n",
        );
        assert_eq!(dns.servers, ["10.0.0.2"]);
        assert_eq!(dns.searches, ["corp.example", "lab.example"]);
        assert_eq!(dns.options, ["edns0", "trust-ad"]);
    }

    #[test]
    fn cpusets_must_exist_on_the_host() {
        assert_eq!(cpuset("0-2,5").unwrap(), [0, 1, 2, 5]);
        assert!(cpuset("3-1").is_none() && cpuset("x").is_none() && cpuset("").is_none());
        let with = |cpus: &str| {
            let mut p = pod("web");
            p.linux = Some(LinuxPodSandboxConfig {
                resources: Some(LinuxContainerResources {
                    cpuset_cpus: cpus.into(),
                    ..Default::default()
                }),
                ..Default::default()
            });
            check_host_cpusets(&p)
        };
        with("0").unwrap();
        let e = with("4095").unwrap_err().to_string();
        assert!(
            e.starts_with("config.linux.resources.cpuset_cpus: 4095 is not online"),
            "{e}"
        );
        let e = with("0-").unwrap_err().to_string();
        assert!(e.contains("not a list"), "{e}");
    }
}

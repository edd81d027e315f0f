//! With the real plugins (bridge, host-local, portmap from `/usr/lib/cni`), as root: namespaces in
//! `/run/netns`, a bridge, IP allocations, iptables rules and tc filters. Each test uses its own bridge,
//! subnet, host-local data directory and pod id, so they run in parallel; each skips (printing
//! `SKIPPED`) when not root or without the plugins.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command as Cmd;

use serde_json::json;

use super::super::netns;
use super::*;

const PLUGINS: &str = "/usr/lib/cni";

fn skipped(test: &str) -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let plugins = Path::new(PLUGINS).join("bridge").exists();
    if !root || !plugins {
        println!(
            "SKIPPED {test}: needs root and {PLUGINS}/bridge (root: {root}, plugins: {plugins})"
        );
    }
    !root || !plugins
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).unwrap();
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a command; its stdout (panics if it fails and `must` is set).
fn sh(args: &[&str], must: bool) -> String {
    let out = Cmd::new(args[0]).args(&args[1..]).output().unwrap();
    if must && !out.status.success() {
        panic!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test network: conf dir, bin dirs, a unique bridge and subnet. When dropped (also by a failed
/// assertion) it tears its pods down and deletes the bridge.
struct TestNet {
    dir: tempfile::TempDir,
    net: Network,
    pods: std::sync::Mutex<Vec<NetworkRecord>>,
    name: String,
    bridge: String,
    subnet: String,
    host_port: u16,
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let (net, pods) = (
            self.net.clone(),
            std::mem::take(&mut *self.pods.lock().unwrap()),
        );
        // On a thread of its own: a runtime cannot be started on the test's runtime thread.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            for record in pods {
                let _ = rt.block_on(net.teardown(&record));
            }
        });
        let _ = cleanup.join();
        sh(&["ip", "link", "del", &self.bridge], false);
    }
}

impl TestNet {
    /// `extra` plugins go after bridge (and portmap, if `portmap`); `bin` is searched first.
    fn new(portmap: bool, extra: &[Value], bin: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let suffix = random_hex(4);
        let (bridge, name) = (format!("pvt{suffix}"), format!("pvt-{suffix}"));
        let r = random_hex(2);
        let (a, b) = (
            u8::from_str_radix(&r[..2], 16).unwrap(),
            u8::from_str_radix(&r[2..], 16).unwrap(),
        );
        let subnet = format!("10.{}.{b}", 100 + a % 100);
        let host_port = 30000 + u16::from(a) * 37 + u16::from(b);
        let mut plugins = vec![json!({
            "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("{subnet}.0/24")}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": dir.path().join("ipam")},
        })];
        if portmap {
            plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
        }
        plugins.extend(extra.iter().cloned());
        let list = json!({"cniVersion": "1.0.0", "name": name, "plugins": plugins});
        let conf_dir = dir.path().join("net.d");
        std::fs::create_dir(&conf_dir).unwrap();
        std::fs::write(conf_dir.join("10-test.conflist"), list.to_string()).unwrap();
        let mut bin_dirs: Vec<PathBuf> = bin.into_iter().map(Path::to_path_buf).collect();
        bin_dirs.extend([dir.path().join("no-such-bin"), PLUGINS.into()]);
        let net = Network::new(NetworkConfig {
            conf_dir,
            bin_dirs,
            netns_dir: "/run/netns".into(),
            plugin_timeout: Duration::from_secs(60),
        });
        let pods = Default::default();
        TestNet {
            dir,
            net,
            pods,
            name,
            bridge,
            subnet,
            host_port,
        }
    }

    /// `prepare`, with the record kept for the cleanup.
    fn prepare(&self, pod: &PodNetwork) -> NetworkRecord {
        let record = self.net.prepare(pod).unwrap();
        self.pods.lock().unwrap().push(record.clone());
        record
    }

    fn pod(&self) -> PodNetwork {
        PodNetwork {
            pod_id: random_hex(32),
            name: "web-0".into(),
            namespace: "default".into(),
            uid: "uid-1".into(),
            port_mappings: vec![
                PortMapping {
                    protocol: "TCP".into(),
                    container_port: 80,
                    host_port: self.host_port.into(),
                    host_ip: "".into(),
                },
                PortMapping {
                    protocol: "udp".into(),
                    container_port: 53,
                    host_port: 0,
                    host_ip: "".into(),
                },
            ],
            dns: None,
        }
    }

    /// host-local's allocation files (one per allocated IP, named by it).
    fn allocations(&self) -> Vec<String> {
        let dir = self.dir.path().join("ipam").join(&self.name);
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let names = entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
        names.filter(|n| n.starts_with(&self.subnet)).collect()
    }

    /// Interfaces enslaved to the bridge.
    fn bridge_ports(&self) -> String {
        sh(&["ip", "-o", "link", "show", "master", &self.bridge], false)
    }
}

fn nat_rules_of(container_id: &str) -> usize {
    let rules = sh(&["iptables", "-t", "nat", "-S"], true);
    rules.lines().filter(|l| l.contains(container_id)).count()
}

fn ns_name(record: &NetworkRecord) -> String {
    record
        .netns
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn setup_connect_tap_and_teardown_with_real_plugins() {
    if skipped("setup_connect_tap_and_teardown_with_real_plugins") {
        return;
    }
    let t = TestNet::new(true, &[], None);
    assert_eq!(t.net.status().unwrap(), t.name);
    let pod = t.pod();
    let record = t.prepare(&pod);
    let ns = ns_name(&record);
    let attachment = t.net.setup(&record).await.unwrap();
    let record = attachment.record().clone();
    assert!(record.result.is_some());

    // The namespace: visible to `ip netns`, lo up, eth0 with the result's address.
    assert!(netns::is_netns(&record.netns));
    assert!(sh(&["ip", "netns", "list"], true)
        .lines()
        .any(|l| l.split(' ').next() == Some(&*ns)));
    assert!(sh(&["ip", "-n", &ns, "link", "show", "lo"], true).contains(",UP,"));
    let (ip, prefix) = attachment.ips[0];
    assert!(
        ip.to_string().starts_with(&format!("{}.", t.subnet)) && prefix == 24,
        "{ip}/{prefix}"
    );
    let addrs = sh(&["ip", "-n", &ns, "addr", "show", "eth0"], true);
    assert!(addrs.contains(&format!("inet {ip}/24")), "{addrs}");
    let mac = attachment
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(addrs.contains(&format!("link/ether {mac}")), "{addrs}");
    assert_eq!(attachment.mtu, 1500);
    let gateway: IpAddr = format!("{}.1", t.subnet).parse().unwrap();
    assert_eq!(attachment.gateway, Some(gateway));
    let default = Route {
        dst: ("0.0.0.0".parse().unwrap(), 0),
        gw: Some(gateway),
    };
    assert_eq!(attachment.routes, [default]);
    // The host: the bridge with the veth, host-local's allocation, portmap's rules.
    assert_eq!(t.bridge_ports().lines().count(), 1, "{}", t.bridge_ports());
    assert_eq!(t.allocations(), [ip.to_string()]);
    let alloc =
        std::fs::read_to_string(t.dir.path().join("ipam").join(&t.name).join(ip.to_string()))
            .unwrap();
    assert!(alloc.starts_with(&pod.pod_id), "{alloc}");
    assert!(nat_rules_of(&pod.pod_id) > 0);
    assert!(
        sh(&["iptables", "-t", "nat", "-S"], true).contains(&format!("--dport {}", t.host_port))
    );
    // CHECK: portmap 1.1.1 checks an IPv6 DNAT chain even for IPv4-only pods (fixed in 1.2).
    match t.net.check(&record).await {
        Ok(()) => {}
        Err(NetworkError::Plugin {
            plugin, message, ..
        }) if plugin == "portmap" && message.contains("ipv6 dnat") => {}
        Err(e) => panic!("{e}"),
    }
    let mut list: Value = serde_json::from_str(&record.config).unwrap();
    list["plugins"].as_array_mut().unwrap().truncate(1);
    let bridge_only = NetworkRecord {
        config: list.to_string(),
        ..record.clone()
    };
    t.net.check(&bridge_only).await.unwrap();

    // tc redirect eth0 <-> tap0, twice (replaced, not doubled).
    sh(
        &[
            "ip", "-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap",
        ],
        true,
    );
    for _ in 0..2 {
        t.net.connect_tap(&attachment, "tap0").await.unwrap();
    }
    // The tap is up (a down tap drops redirected frames) with the veth's MTU.
    let tap = sh(&["ip", "-n", &ns, "-o", "link", "show", "tap0"], true);
    assert!(tap.contains(",UP") || tap.contains("<UP"), "{tap}");
    assert!(tap.contains(&format!("mtu {} ", attachment.mtu)), "{tap}");
    for (dev, peer) in [("eth0", "tap0"), ("tap0", "eth0")] {
        let filters = sh(
            &["tc", "-n", &ns, "filter", "show", "dev", dev, "ingress"],
            true,
        );
        assert_eq!(filters.matches("mirred").count(), 1, "{filters}");
        assert!(
            filters.contains("protocol all") && filters.contains("u32"),
            "{filters}"
        );
        assert!(
            filters.contains(&format!("Egress Redirect to device {peer}")),
            "{filters}"
        );
    }
    sh(&["ip", "-n", &ns, "link", "del", "tap0"], true);
    let missing = t
        .net
        .connect_tap(&attachment, "tap0")
        .await
        .unwrap_err()
        .to_string();
    assert!(missing.contains("no interface tap0"), "{missing}");

    t.net.teardown(&record).await.unwrap();
    assert!(!record.netns.exists());
    assert!(!sh(&["ip", "netns", "list"], true).contains(&ns));
    assert_eq!(t.bridge_ports(), "");
    assert_eq!(t.allocations(), Vec::<String>::new());
    assert_eq!(nat_rules_of(&pod.pod_id), 0);
    t.net.teardown(&record).await.unwrap();
}

#[tokio::test]
async fn teardown_after_a_crash_releases_the_ip_and_rules_without_the_netns() {
    if skipped("teardown_after_a_crash_releases_the_ip_and_rules_without_the_netns") {
        return;
    }
    let t = TestNet::new(true, &[], None);
    let pod = t.pod();
    let intent = t.prepare(&pod);
    let attachment = t.net.setup(&intent).await.unwrap();
    // What the restarted daemon finds: the persisted record, and the namespace deleted behind its back,
    // leaving an unmounted file (as after a crash between unmount and unlink).
    let stored = serde_json::to_string(attachment.record()).unwrap();
    drop(attachment);
    sh(&["ip", "netns", "del", &ns_name(&intent)], true);
    std::fs::write(&intent.netns, "").unwrap();
    assert!(!netns::is_netns(&intent.netns));
    assert_eq!(t.allocations().len(), 1);
    assert!(nat_rules_of(&pod.pod_id) > 0);

    let record: NetworkRecord = serde_json::from_str(&stored).unwrap();
    t.net.teardown(&record).await.unwrap();
    assert!(!record.netns.exists());
    assert_eq!(t.allocations(), Vec::<String>::new());
    assert_eq!(nat_rules_of(&pod.pod_id), 0);
    assert_eq!(t.bridge_ports(), "");
    // Without any namespace file, and with only the intent (ADD's result never persisted).
    t.net.teardown(&record).await.unwrap();
    t.net.teardown(&intent).await.unwrap();
}

#[tokio::test]
async fn a_failing_add_is_rolled_back() {
    if skipped("a_failing_add_is_rolled_back") {
        return;
    }
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("log");
    let body = format!(
        r#"echo "$CNI_COMMAND $CNI_NETNS" >> {log}
case "$CNI_COMMAND" in
VERSION) echo '{{"cniVersion":"1.0.0","supportedVersions":["1.0.0"]}}' ;;
ADD) echo '{{"cniVersion":"1.0.0","code":100,"msg":"refused","details":"test plugin"}}'; exit 1 ;;
esac"#,
        log = log.display()
    );
    script(bin.path(), "pvfail", &body);
    let t = TestNet::new(false, &[json!({"type": "pvfail"})], Some(bin.path()));
    let pod = t.pod();
    let record = t.prepare(&pod);
    match t.net.setup(&record).await {
        Err(NetworkError::Plugin {
            plugin,
            command: "ADD",
            code: Some(100),
            message,
        }) => {
            assert_eq!(
                (plugin.as_str(), message.as_str()),
                ("pvfail", "refused: test plugin")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!record.netns.exists());
    assert_eq!(t.allocations(), Vec::<String>::new());
    assert_eq!(t.bridge_ports(), "");
    let netns = record.netns.display();
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log, format!("VERSION \nADD {netns}\nDEL {netns}\n"));
}

#[tokio::test]
async fn namespaces_are_created_with_lo_up_and_removed_idempotently() {
    if skipped("namespaces_are_created_with_lo_up_and_removed_idempotently") {
        return;
    }
    let name = format!("podvisor-test-{}", random_hex(6));
    let path = Path::new("/run/netns").join(&name);
    netns::create(&path).await.unwrap();
    assert!(netns::is_netns(&path));
    let again = netns::create(&path).await.unwrap_err().to_string();
    assert!(again.contains("File exists"), "{again}");
    assert!(
        netns::is_netns(&path),
        "a failed create leaves an existing namespace alone"
    );
    let links = sh(&["ip", "-n", &name, "-o", "link"], true);
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo:") && links.contains(",UP,"), "{links}");
    let handle = netns::handle_in(&path).await.unwrap();
    let lo = super::super::tc::link(&handle, "lo").await.unwrap();
    assert_eq!((lo.index, lo.mac), (1, [0; 6]));
    drop(handle);
    assert!(netns::handle_in(Path::new("/proc/self/status"))
        .await
        .is_err());
    run_in_enters_the_namespace(&path, &name).await;
    netns::remove(&path).unwrap();
    assert!(!path.exists());
    netns::remove(&path).unwrap();
    assert!(!sh(&["ip", "netns", "list"], true).contains(&name));
}

/// `run_in` runs its closure inside the namespace `path` (named `name`): what it creates there, a tap
/// as the VM uses it, is in the namespace and not on the host; a bad path is a typed error naming it.
async fn run_in_enters_the_namespace(path: &Path, name: &str) {
    let ns_inode = std::fs::metadata(path).unwrap().ino();
    let inside = netns::run_in(path, || std::fs::read_link("/proc/thread-self/ns/net"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(inside.to_string_lossy(), format!("net:[{ns_inode}]"));
    let tap_name = format!("pvt{}", random_hex(4));
    let (tap_in, tap_name_in) = (tap_name.clone(), tap_name.clone());
    let tap = netns::run_in(path, move || vmm::Tap::open(&tap_in))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("tap {tap_name_in}: {e}"));
    assert!(sh(&["ip", "-n", name, "-o", "link"], true).contains(&tap_name));
    assert!(!sh(&["ip", "-o", "link"], true).contains(&tap_name));
    drop(tap);
    assert!(!sh(&["ip", "-n", name, "-o", "link"], true).contains(&tap_name));
    let not_a_netns = Path::new("/proc/self/status");
    let err = netns::run_in(not_a_netns, || ()).await.unwrap_err();
    assert!(
        matches!(&err, NetworkError::Netns(netns::NetnsError::Enter { path, .. }) if path == not_a_netns),
        "{err}"
    );
    let missing = Path::new("/run/netns/podvisor-test-missing");
    let err = netns::run_in(missing, || ()).await.unwrap_err();
    assert!(
        matches!(&err, NetworkError::Netns(netns::NetnsError::Open { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("podvisor-test-missing"), "{err}");
}

//! Unit tests: configuration, CNI invocation (with shell-script plugins), results, validation. The
//! tests with the real plugins are in `tests/integration.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::json;

use super::cni::{self, Command, ConfList};
use super::result::{parse_cidr, parse_mac, view};
use super::*;

mod integration;

/// Writes an executable shell script `dir/name`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn not_configured(result: Result<impl std::fmt::Debug, NetworkError>) -> String {
    match result {
        Err(NetworkError::NotConfigured(msg)) => msg,
        other => panic!("expected NotConfigured, got {other:?}"),
    }
}

fn network(conf_dir: &Path, bin_dir: &Path) -> Network {
    Network::new(NetworkConfig {
        conf_dir: conf_dir.into(),
        bin_dirs: vec![bin_dir.join("missing"), bin_dir.into()],
        netns_dir: "/run/netns".into(),
        plugin_timeout: Duration::from_secs(10),
    })
}

#[test]
fn the_lexically_first_config_is_used_and_a_conf_is_wrapped() {
    let dir = tempfile::tempdir().unwrap();
    let list = json!({"cniVersion": "1.0.0", "name": "list", "plugins": [{"type": "bridge"}]});
    std::fs::write(dir.path().join("20-list.conflist"), list.to_string()).unwrap();
    let conf = json!({"cniVersion": "0.4.0", "name": "single", "type": "ptp", "mtu": 1400});
    std::fs::write(dir.path().join("10-single.conf"), conf.to_string()).unwrap();
    std::fs::write(dir.path().join("00-notes.txt"), "not a config").unwrap();
    std::fs::create_dir(dir.path().join("05-dir.conf")).unwrap();

    let (path, list) = cni::load_dir(dir.path()).unwrap();
    assert_eq!(path, dir.path().join("10-single.conf"));
    assert_eq!(
        (list.name.as_str(), list.cni_version.as_str()),
        ("single", "0.4.0")
    );
    assert_eq!(list.plugins.len(), 1);
    assert_eq!(list.plugin_type(0), "ptp");
    assert_eq!(list.plugins[0]["mtu"], 1400);
    // The record keeps the wrapped list; it parses back to the same thing.
    let again = ConfList::parse(&list.json, "record").unwrap();
    assert_eq!((again.name, again.plugins), (list.name, list.plugins));

    std::fs::remove_file(dir.path().join("10-single.conf")).unwrap();
    let (path, list) = cni::load_dir(dir.path()).unwrap();
    assert_eq!(path, dir.path().join("20-list.conflist"));
    assert_eq!(list.name, "list");
    // A .json file with a plugin list is a list.
    std::fs::write(
        dir.path().join("01.json"),
        json!({"cniVersion": "0.3.1", "name": "j", "plugins": [{"type": "x"}]}).to_string(),
    )
    .unwrap();
    assert_eq!(cni::load_dir(dir.path()).unwrap().1.name, "j");
}

#[test]
fn config_errors_name_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let msg = not_configured(cni::load_dir(&dir.path().join("nope")));
    assert!(msg.contains("nope"), "{msg}");
    let msg = not_configured(cni::load_dir(dir.path()));
    assert!(msg.contains("no CNI config in"), "{msg}");

    let cases = [
        ("{\"cniVersion\": ", "invalid JSON"),
        ("[1]", "not a JSON object"),
        (
            r#"{"cniVersion": "1.0.0", "plugins": [{"type": "a"}]}"#,
            "name: missing",
        ),
        (
            r#"{"cniVersion": "1.0.0", "name": "", "plugins": [{"type": "a"}]}"#,
            "name: empty",
        ),
        (
            r#"{"cniVersion": "1.0.0", "name": "n"}"#,
            "plugins: missing",
        ),
        (
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": []}"#,
            "plugins: empty",
        ),
        (
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": {}}"#,
            "plugins: not an array",
        ),
        (
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a"}, {"mtu": 1}]}"#,
            "plugins[1].type: missing",
        ),
        (
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../sh"}]}"#,
            "plugins[0].type",
        ),
        (
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a", "capabilities": {"portMappings": "yes"}}]}"#,
            "plugins[0].capabilities",
        ),
        (
            r#"{"name": "n", "plugins": [{"type": "a"}]}"#,
            "cniVersion: missing",
        ),
        (
            r#"{"cniVersion": "0.2.0", "name": "n", "plugins": [{"type": "a"}]}"#,
            "cniVersion: \"0.2.0\" is not supported",
        ),
        (
            r#"{"cniVersion": "1.1.0", "name": "n", "plugins": [{"type": "a"}]}"#,
            "cniVersion: \"1.1.0\"",
        ),
    ];
    let file = dir.path().join("10-net.conflist");
    for (text, expected) in cases {
        std::fs::write(&file, text).unwrap();
        let msg = not_configured(cni::load_dir(dir.path()));
        assert!(msg.contains(&*file.to_string_lossy()), "{msg}");
        assert!(msg.contains(expected), "{text}: {msg}");
    }
    // A single-plugin .conf needs a type too.
    std::fs::remove_file(&file).unwrap();
    std::fs::write(
        dir.path().join("10-net.conf"),
        r#"{"cniVersion": "0.3.1", "name": "n"}"#,
    )
    .unwrap();
    let msg = not_configured(cni::load_dir(dir.path()));
    assert!(
        msg.contains("10-net.conf") && msg.contains("plugins[0].type: missing"),
        "{msg}"
    );
}

#[test]
fn status_needs_every_plugin_binary() {
    let (conf, bin) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let list = json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "one"}, {"type": "two"}]});
    std::fs::write(conf.path().join("net.conflist"), list.to_string()).unwrap();
    let net = network(conf.path(), bin.path());
    script(bin.path(), "one", "exit 0");
    let msg = not_configured(net.status());
    assert!(
        msg.contains("\"two\" not found in") && msg.contains(&*bin.path().to_string_lossy()),
        "{msg}"
    );
    // Not executable: not a plugin.
    std::fs::write(bin.path().join("two"), "").unwrap();
    not_configured(net.status());
    script(bin.path(), "two", "exit 0");
    assert_eq!(net.status().unwrap(), "podnet");
    let found = cni::find_plugin(&[bin.path().join("missing"), bin.path().into()], "one").unwrap();
    assert_eq!(found, bin.path().join("one"));
}

fn runtime<'a>(bin_dirs: &'a [PathBuf], caps: &'a Map<String, Value>) -> cni::Runtime<'a> {
    cni::Runtime {
        container_id: "abc123",
        netns: "/run/netns/podvisor-abc123",
        ifname: "eth0",
        args: "IgnoreUnknown=1;K8S_POD_NAME=web",
        bin_dirs,
        capability_args: caps,
        timeout: Duration::from_secs(10),
    }
}

#[test]
fn cni_environment_and_args() {
    let dirs = vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")];
    let caps = Map::new();
    let env = runtime(&dirs, &caps).env(Command::Del);
    let expected = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/podvisor-abc123"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(env, expected);
    assert_eq!(
        cni::k8s_args("default", "web-0", "abc", "u-1"),
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
    );
}

#[test]
fn plugin_config_gets_name_version_prev_result_and_declared_capabilities_only() {
    let list = json!({"cniVersion": "0.4.0", "name": "net", "plugins": [
        {"type": "bridge", "cniVersion": "0.3.0", "name": "other"},
        {"type": "portmap", "capabilities": {"portMappings": true, "dns": false, "bandwidth": true}},
    ]});
    let list = ConfList::parse(&list.to_string(), "test").unwrap();
    let mut caps = Map::new();
    caps.insert("portMappings".into(), json!([{"hostPort": 8080}]));
    caps.insert("dns".into(), json!({"servers": ["10.0.0.10"]}));
    let first = list.plugin_config(0, None, &caps);
    assert_eq!(
        first,
        json!({"type": "bridge", "cniVersion": "0.4.0", "name": "net"})
    );
    let prev = json!({"cniVersion": "0.4.0", "ips": []});
    let second = list.plugin_config(1, Some(&prev), &caps);
    assert_eq!(second["prevResult"], prev);
    // dns is declared false; bandwidth declared but the runtime has no value.
    assert_eq!(
        second["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080}]})
    );
    assert!(list.supports_check());
    let old = json!({"cniVersion": "0.3.1", "name": "n", "plugins": [{"type": "a"}]});
    assert!(!ConfList::parse(&old.to_string(), "t")
        .unwrap()
        .supports_check());
    let off = json!({"cniVersion": "1.0.0", "name": "n", "disableCheck": true, "plugins": [{"type": "a"}]});
    assert!(!ConfList::parse(&off.to_string(), "t")
        .unwrap()
        .supports_check());
}

#[test]
fn port_mappings_are_validated_and_those_without_host_port_skipped() {
    let m = |protocol: &str, container_port, host_port, host_ip: &str| PortMapping {
        protocol: protocol.into(),
        container_port,
        host_port,
        host_ip: host_ip.into(),
    };
    let valid = port_mappings(&[
        m("TCP", 80, 8080, ""),
        m("udp", 0, 0, ""),
        m("Sctp", 9, 9, "::1"),
    ])
    .unwrap();
    assert_eq!(valid, [m("tcp", 80, 8080, ""), m("sctp", 9, 9, "::1")]);
    let cases = [
        (
            m("tcp", 0, 8080, ""),
            "port_mappings[1].container_port: 0 is not a port",
        ),
        (
            m("tcp", 70000, 8080, ""),
            "port_mappings[1].container_port: 70000",
        ),
        (m("tcp", 80, -1, ""), "port_mappings[1].host_port: -1"),
        (m("tcp", 80, 65536, ""), "port_mappings[1].host_port: 65536"),
        (
            m("icmp", 80, 8080, ""),
            "port_mappings[1].protocol: \"icmp\"",
        ),
        (
            m("tcp", 80, 8080, "localhost"),
            "port_mappings[1].host_ip: \"localhost\"",
        ),
    ];
    for (bad, expected) in cases {
        match port_mappings(&[m("tcp", 1, 1, ""), bad]) {
            Err(NetworkError::InvalidArgument(msg)) => assert!(msg.starts_with(expected), "{msg}"),
            other => panic!("{expected}: {other:?}"),
        }
    }
}

#[test]
fn prepare_builds_the_intent_record() {
    let (conf, bin) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let list = json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "one"}]});
    std::fs::write(conf.path().join("net.conflist"), list.to_string()).unwrap();
    let net = network(conf.path(), bin.path());
    let pod = PodNetwork {
        pod_id: "0123456789abcdef0123456789abcdef".into(),
        name: "web".into(),
        namespace: "prod".into(),
        uid: "u-1".into(),
        port_mappings: vec![PortMapping {
            protocol: "TCP".into(),
            container_port: 80,
            host_port: 8080,
            host_ip: "127.0.0.1".into(),
        }],
        dns: Some(PodDns {
            servers: vec!["10.96.0.10".into()],
            ..PodDns::default()
        }),
    };
    let record = net.prepare(&pod).unwrap();
    assert_eq!(
        record.netns,
        Path::new("/run/netns/podvisor-0123456789abcdef")
    );
    assert_eq!(
        (record.container_id.as_str(), record.ifname.as_str()),
        (pod.pod_id.as_str(), "eth0")
    );
    assert!(record
        .cni_args
        .contains("K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web;"));
    assert_eq!(ConfList::parse(&record.config, "r").unwrap().name, "podnet");
    assert_eq!(record.result, None);
    let caps = capability_args(&record);
    assert_eq!(
        caps["portMappings"],
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}])
    );
    assert_eq!(
        caps["dns"],
        json!({"servers": ["10.96.0.10"], "searches": [], "options": []})
    );
    // The record round-trips through JSON (the pod's sled record).
    let back: NetworkRecord =
        serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
    assert_eq!(back, record);

    for (pod, field) in [
        (
            PodNetwork {
                pod_id: "".into(),
                ..pod.clone()
            },
            "pod_sandbox_id",
        ),
        (
            PodNetwork {
                pod_id: "../x".into(),
                ..pod.clone()
            },
            "pod_sandbox_id",
        ),
        (
            PodNetwork {
                name: "a;b".into(),
                ..pod.clone()
            },
            "metadata.name",
        ),
        (
            PodNetwork {
                uid: "a=b".into(),
                ..pod.clone()
            },
            "metadata.uid",
        ),
    ] {
        match net.prepare(&pod) {
            Err(NetworkError::InvalidArgument(msg)) => assert!(msg.starts_with(field), "{msg}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    std::fs::remove_file(conf.path().join("net.conflist")).unwrap();
    not_configured(net.prepare(&pod));
}

const RESULT_031: &str = r#"{"cniVersion": "0.3.1",
  "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:00:00:01"}, {"name": "veth1", "mac": "aa:bb:cc:00:00:02"},
                 {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/run/netns/x"}],
  "ips": [{"version": "4", "interface": 2, "address": "10.244.1.5/24", "gateway": "10.244.1.1"},
          {"version": "4", "interface": 0, "address": "10.244.1.1/24"}],
  "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12", "gw": "10.244.1.254"}],
  "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}}"#;

#[test]
fn results_of_0_3_1_0_4_0_and_1_0_0_parse() {
    let v031 = view(&serde_json::from_str(RESULT_031).unwrap(), "eth0").unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(v031.ips, [(ip("10.244.1.5"), 24)]);
    assert_eq!(v031.gateway, Some(ip("10.244.1.1")));
    assert_eq!(v031.mac, Some([0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05]));
    let routes = [
        Route {
            dst: (ip("0.0.0.0"), 0),
            gw: Some(ip("10.244.1.1")),
        },
        Route {
            dst: (ip("10.96.0.0"), 12),
            gw: Some(ip("10.244.1.254")),
        },
    ];
    assert_eq!(v031.routes, routes);
    assert_eq!(v031.dns.nameservers, ["10.96.0.10"]);
    assert_eq!(v031.dns.search, ["svc.cluster.local"]);

    let v040 = RESULT_031.replace("0.3.1", "0.4.0");
    assert_eq!(
        view(&serde_json::from_str(&v040).unwrap(), "eth0").unwrap(),
        v031
    );

    // 1.0.0: no `version`; dual stack; an IP without an interface index counts as the pod's.
    let v100 = json!({"cniVersion": "1.0.0",
        "interfaces": [{"name": "br0"}, {"name": "eth0", "mac": "02:00:00:00:00:09", "sandbox": "/run/netns/y"}],
        "ips": [{"interface": 1, "address": "fd00::9/64", "gateway": "fd00::1"},
                {"address": "192.168.5.9/16", "gateway": "192.168.0.1"}],
        "routes": [{"dst": "::/0"}, {"dst": "0.0.0.0/0"}, {"dst": "172.16.0.0/12", "gw": ""}]});
    let v = view(&v100, "eth0").unwrap();
    assert_eq!(v.ips, [(ip("fd00::9"), 64), (ip("192.168.5.9"), 16)]);
    assert_eq!(v.gateway, Some(ip("fd00::1")));
    let gws: Vec<_> = v.routes.iter().map(|r| r.gw).collect();
    assert_eq!(
        gws,
        [
            Some(ip("fd00::1")),
            Some(ip("192.168.0.1")),
            Some(ip("192.168.0.1"))
        ]
    );
    assert_eq!(v.dns, Dns::default());
    // An IPAM-only result (no interfaces): every IP is the pod's.
    let ipam = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/8"}]});
    assert_eq!(view(&ipam, "eth0").unwrap().ips, [(ip("10.0.0.2"), 8)]);

    let bad = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2"}]});
    assert!(view(&bad, "eth0")
        .unwrap_err()
        .starts_with("ips[0].address"));
    let bad = json!({"cniVersion": "1.0.0", "routes": [{"dst": "0.0.0.0/0", "gw": "x"}]});
    assert!(view(&bad, "eth0").unwrap_err().starts_with("routes[0].gw"));
    assert_eq!(
        parse_cidr("10.0.0.1/33"),
        Err("\"10.0.0.1/33\" is not an address/prefix".into())
    );
    assert_eq!(parse_mac("0a:58:0a:f4:01"), None);
    assert_eq!(parse_mac("0a:58:0a:f4:01:05:07"), None);
}

#[test]
fn plugin_errors_are_parsed() {
    let out = br#"{"cniVersion": "1.0.0", "code": 11, "msg": "busy", "details": "try later"}"#;
    match cni::plugin_failure("bridge", Command::Add, "exit status: 1", out, b"noise") {
        NetworkError::Plugin {
            plugin,
            command,
            code,
            message,
        } => {
            assert_eq!(
                (plugin.as_str(), command, code),
                ("bridge", "ADD", Some(11))
            );
            assert_eq!(message, "busy: try later");
        }
        other => panic!("{other:?}"),
    }
    let e = cni::plugin_failure("x", Command::Del, "exit status: 2", b"", b"panic: boom\n");
    assert_eq!(
        e.to_string(),
        "CNI plugin x DEL: exit status: 2: panic: boom"
    );
}

fn exec_list(plugins: Value) -> ConfList {
    let list = json!({"cniVersion": "1.0.0", "name": "net", "plugins": plugins});
    ConfList::parse(&list.to_string(), "test").unwrap()
}

#[tokio::test]
async fn chains_run_in_order_with_prev_results_and_del_in_reverse() {
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("log");
    // Each plugin logs its command, name and env, saves its stdin and echoes a result naming itself.
    let body = format!(
        r#"echo "$CNI_COMMAND $(basename $0) $CNI_NETNS $CNI_IFNAME $CNI_PATH" >> {log}
cat > {dir}/$(basename $0).$CNI_COMMAND.in
[ "$CNI_COMMAND" = VERSION ] && echo '{{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}}'
[ "$CNI_COMMAND" = ADD ] && echo '{{"cniVersion":"1.0.0","ips":[{{"address":"10.0.0.'$(basename $0 | tr -d a-z)'/24"}}]}}'
exit 0"#,
        log = log.display(),
        dir = bin.path().display()
    );
    script(bin.path(), "a1", &body);
    script(bin.path(), "b2", &body);
    let list = exec_list(json!([{"type": "a1"}, {"type": "b2"}]));
    let dirs = [bin.path().to_path_buf()];
    let caps = Map::new();
    let rt = runtime(&dirs, &caps);
    cni::check_versions(&list, &rt).await.unwrap();
    let result = cni::add(&list, &rt).await.unwrap();
    assert_eq!(result["ips"][0]["address"], "10.0.0.2/24");
    let input = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(bin.path().join(name)).unwrap()).unwrap()
    };
    assert_eq!(
        input("b2.ADD.in")["prevResult"]["ips"][0]["address"],
        "10.0.0.1/24"
    );
    assert!(input("a1.ADD.in").get("prevResult").is_none());
    cni::check(&list, &result, &rt).await.unwrap();
    assert_eq!(input("a1.CHECK.in")["prevResult"], result);
    let gone = cni::Runtime {
        netns: "",
        ..rt.clone()
    };
    cni::del(&list, Some(&result), &gone).await.unwrap();
    assert_eq!(input("a1.DEL.in")["prevResult"], result);
    let log = std::fs::read_to_string(&log).unwrap();
    let path = bin.path().display();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], "VERSION a1   ");
    let ns = "/run/netns/podvisor-abc123";
    assert_eq!(
        &lines[2..],
        [
            format!("ADD a1 {ns} eth0 {path}"),
            format!("ADD b2 {ns} eth0 {path}"),
            format!("CHECK a1 {ns} eth0 {path}"),
            format!("CHECK b2 {ns} eth0 {path}"),
            format!("DEL b2  eth0 {path}"),
            format!("DEL a1  eth0 {path}"),
        ]
    );

    // A plugin that does not speak the config's version is a configuration problem.
    let old = ConfList::parse(
        &json!({"cniVersion": "0.3.1", "name": "n", "plugins": [{"type": "a1"}]}).to_string(),
        "t",
    )
    .unwrap();
    let msg = not_configured(cni::check_versions(&old, &rt).await);
    assert!(msg.contains("not the config's 0.3.1"), "{msg}");
}

#[tokio::test]
async fn failing_hanging_and_chatty_plugins() {
    let bin = tempfile::tempdir().unwrap();
    script(
        bin.path(),
        "fails",
        r#"echo '{"cniVersion":"1.0.0","code":7,"msg":"bad config","details":"no bridge"}'; exit 1"#,
    );
    script(bin.path(), "garbage", "echo not json; exit 0");
    script(bin.path(), "hangs", "exec sleep 30");
    script(bin.path(), "chatty", "exec yes");
    script(bin.path(), "ok", r#"echo '{"cniVersion":"1.0.0"}'"#);
    let dirs = [bin.path().to_path_buf()];
    let caps = Map::new();
    let rt = cni::Runtime {
        timeout: Duration::from_millis(500),
        ..runtime(&dirs, &caps)
    };
    let run = |kind: &str| exec_list(json!([{"type": "ok"}, {"type": kind}]));

    match cni::add(&run("fails"), &rt).await {
        Err(NetworkError::Plugin {
            plugin,
            code: Some(7),
            message,
            ..
        }) => {
            assert_eq!(
                (plugin.as_str(), message.as_str()),
                ("fails", "bad config: no bridge")
            );
        }
        other => panic!("{other:?}"),
    }
    let e = cni::add(&run("garbage"), &rt)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("CNI plugin garbage ADD: result is not a JSON object"),
        "{e}"
    );
    let started = std::time::Instant::now();
    let e = cni::add(&run("hangs"), &rt).await.unwrap_err().to_string();
    assert!(
        e.contains("timed out") && started.elapsed() < Duration::from_secs(5),
        "{e}"
    );
    let e = cni::add(&run("chatty"), &rt).await.unwrap_err().to_string();
    assert!(e.contains("output exceeds"), "{e}");
    match cni::add(&run("absent"), &rt).await {
        Err(NetworkError::NotConfigured(msg)) => assert!(msg.contains("\"absent\" not found")),
        other => panic!("{other:?}"),
    }
}

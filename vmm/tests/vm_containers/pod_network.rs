//! Node-kernel networking features inside the pod VM, as a NET_ADMIN container (what CNI plugins,
//! kube-proxy or a nested container runtime run) uses them: a bridge (brctl's ioctl and rtnetlink), a
//! veth pair, a VLAN, bridge netfilter, and iptables rules through both iptables-legacy (x_tables) and
//! iptables-nft (nf_tables with x_tables matches through NFT_COMPAT).

use super::oci::{spec, XTABLES_LIBDIR};
use super::{collect, container, create, ids};

use pb::AgentClient;
use podvisor_proto as pb;
use tonic::transport::Channel;

/// Each step prints `ok:<name>` when it worked; stderr says why one did not.
const SCRIPT: &str = r#"
step() { name=$1; shift; if "$@"; then echo "ok:$name"; fi; }
step brctl-addbr brctl addbr br0
step ip-bridge ip link add br1 type bridge
step veth ip link add v0 type veth
step brctl-addif brctl addif br0 v0
step vlan ip link add link v0 name v0.10 type vlan id 10
step bridge-up ip link set br0 up
step br-netfilter cat /proc/sys/net/bridge/bridge-nf-call-iptables
for m in comment conntrack multiport mark addrtype statistic; do
  step xt-match-$m grep -qx $m /proc/net/ip_tables_matches
done
for t in MASQUERADE MARK REJECT SNAT DNAT; do
  step xt-target-$t grep -qx $t /proc/net/ip_tables_targets
done
R='-p tcp -m comment --comment podvisor -m conntrack --ctstate NEW -m multiport --dports 80,443 -m mark --mark 0x4000/0x4000 -m addrtype --dst-type LOCAL -m statistic --mode random --probability 0.5'
step iptables-legacy-filter iptables-legacy -w -A INPUT $R -j ACCEPT
step iptables-legacy-nat iptables-legacy -w -t nat -A POSTROUTING -o br0 -j MASQUERADE
step iptables-legacy-list iptables-legacy -w -S INPUT
step iptables-nft-filter iptables-nft -A FORWARD $R -j REJECT
step iptables-nft-nat iptables-nft -t nat -A POSTROUTING -o br0 -j MASQUERADE
step iptables-nft-mark iptables-nft -t mangle -A PREROUTING -j MARK --set-xmark 0x4000/0x4000
step iptables-nft-list iptables-nft -S FORWARD
"#;

/// The steps [`SCRIPT`] must report as done.
const STEPS: [&str; 25] = [
    "brctl-addbr",
    "ip-bridge",
    "veth",
    "brctl-addif",
    "vlan",
    "bridge-up",
    "br-netfilter",
    "xt-match-comment",
    "xt-match-conntrack",
    "xt-match-multiport",
    "xt-match-mark",
    "xt-match-addrtype",
    "xt-match-statistic",
    "xt-target-MASQUERADE",
    "xt-target-MARK",
    "xt-target-REJECT",
    "xt-target-SNAT",
    "xt-target-DNAT",
    "iptables-legacy-filter",
    "iptables-legacy-nat",
    "iptables-legacy-list",
    "iptables-nft-filter",
    "iptables-nft-nat",
    "iptables-nft-mark",
    "iptables-nft-list",
];

/// A container with CAP_NET_ADMIN and CAP_NET_RAW (a privileged container has these and more) runs
/// [`SCRIPT`] in the pod's network namespace (the VM's); asserts every step of [`STEPS`] worked. The
/// devices and rules stay: nothing later in the test uses the pod network.
pub async fn node_network_features(agent: &mut AgentClient<Channel>) {
    let mut oci: serde_json::Value =
        serde_json::from_slice(&spec(&["sh", "-c", SCRIPT], None)).unwrap();
    for set in ["bounding", "effective", "permitted"] {
        let caps = oci["process"]["capabilities"][set].as_array_mut().unwrap();
        caps.extend(["CAP_NET_ADMIN".into(), "CAP_NET_RAW".into()]);
    }
    let env = oci["process"]["env"].as_array_mut().unwrap();
    env.push(format!("XTABLES_LIBDIR={XTABLES_LIBDIR}").into());
    let req = create("net", serde_json::to_vec(&oci).unwrap());
    agent.create_container(req).await.unwrap();
    let out = collect(agent, "net", "", pb::OutputStream::Stdout);
    let err = collect(agent, "net", "", pb::OutputStream::Stderr);
    agent.start_container(container("net")).await.unwrap();
    agent.wait_process(ids("net", "")).await.unwrap();
    let (out, err) = (out.await.unwrap(), err.await.unwrap());
    eprintln!("node network features:\n{out}{err}");
    let missing: Vec<&str> = STEPS
        .into_iter()
        .filter(|s| !out.lines().any(|l| l == format!("ok:{s}")))
        .collect();
    assert!(
        missing.is_empty(),
        "failed: {missing:?}\nstdout {out}\nstderr {err}"
    );
    assert!(
        out.contains("-m comment --comment podvisor") && out.contains("-j REJECT"),
        "rules listed back: {out}"
    );
    let removed = agent
        .remove_container(container("net"))
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert!(removed);
}

//! The CNI network the network bench's pods join, whichever runtime runs them: one conflist
//! (bridge `pvbench0` with host-local 10.89.0.0/24, then portmap) in a temp conf dir. Cleaning up
//! (or dropping) it removes the bridge and what the plugins leave on the host, and reports leaks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bridge both runtimes' pods are attached to.
pub const BRIDGE: &str = "pvbench0";
/// The bridge's address (host-local's gateway: the first address of the subnet).
pub const GATEWAY: &str = "10.89.0.1";
/// Where the plugins are installed (Debian's containernetworking-plugins).
pub const BIN_DIR: &str = super::CNI_BIN_DIR;
const SUBNET_PREFIX: &str = "10.89.0.";
/// libcni's cache (containerd's go-cni keeps results there).
const CACHE: &str = "/var/lib/cni";
/// The bridge plugin turns forwarding on (isGateway); cleanup restores it.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Top-level nat chains portmap creates once and leaves after the last DEL.
const PORTMAP_CHAINS: [&str; 3] = [
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-SETMARK",
    "CNI-HOSTPORT-MASQ",
];

/// The conflist in `<dir>/cni/net.d`, host-local's leases in `<dir>/cni/ipam`; cleans up on drop.
pub struct CniNet {
    /// The conf dir to hand to both runtimes.
    pub conf_dir: PathBuf,
    netns_before: BTreeSet<String>,
    chains_before: BTreeSet<String>,
    ip_forward_before: String,
    cache_existed: bool,
    done: bool,
}

fn run(args: &[&str]) -> Option<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netns() -> BTreeSet<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn nat_rules() -> Vec<String> {
    run(&["iptables", "-t", "nat", "-S"])
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn nat_chains() -> BTreeSet<String> {
    nat_rules()
        .iter()
        .filter_map(|r| r.strip_prefix("-N "))
        .map(str::to_owned)
        .collect()
}

fn ip_forward() -> String {
    std::fs::read_to_string(IP_FORWARD).unwrap_or_default()
}

/// Deletes every nat rule jumping to `chain`, then flushes and deletes it.
fn delete_chain(chain: &str) {
    for rule in nat_rules() {
        if let Some(spec) = rule.strip_prefix("-A ") {
            if spec.ends_with(&format!("-j {chain}")) {
                // `-S` quotes comments for a shell.
                run(&["sh", "-c", &format!("iptables -t nat -D {spec}")]);
            }
        }
    }
    run(&["iptables", "-t", "nat", "-F", chain]);
    run(&["iptables", "-t", "nat", "-X", chain]);
}

impl CniNet {
    /// Writes the conflist under `dir` (cniVersion 1.0.0: containerd 1.6.20's libcni accepts it)
    /// and removes a `pvbench0` left by an earlier, killed run.
    pub fn create(dir: &Path) -> CniNet {
        let conf_dir = dir.join("cni/net.d");
        std::fs::create_dir_all(&conf_dir).expect("CNI conf dir");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "pvbench",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("{SUBNET_PREFIX}0/24")}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": dir.join("cni/ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        std::fs::write(
            conf_dir.join("10-pvbench.conflist"),
            serde_json::to_vec_pretty(&conflist).expect("json"),
        )
        .expect("conflist");
        run(&["ip", "link", "del", BRIDGE]);
        CniNet {
            conf_dir,
            netns_before: netns(),
            chains_before: nat_chains(),
            ip_forward_before: ip_forward(),
            cache_existed: Path::new(CACHE).exists(),
            done: false,
        }
    }

    /// Removes what pods of this bench left (network namespaces holding a 10.89.0.x address,
    /// portmap chains DNATing to one, portmap's top-level chains when this run created them and
    /// nobody else uses them, libcni cache entries of this network and the cache dir if this run
    /// created it) and the bridge, and restores ip_forward unless other pods appeared meanwhile;
    /// once. Returns what had leaked.
    pub fn cleanup(&mut self) -> Vec<String> {
        let mut leaks = Vec::new();
        if std::mem::replace(&mut self.done, true) {
            return leaks;
        }
        for ns in netns().difference(&self.netns_before) {
            let addrs = run(&["ip", "-n", ns, "-4", "-o", "addr"]).unwrap_or_default();
            if addrs.contains(SUBNET_PREFIX) {
                leaks.push(format!("netns {ns}"));
                run(&["ip", "netns", "del", ns]);
            }
        }
        let rules = nat_rules();
        for chain in nat_chains().difference(&self.chains_before) {
            let ours = rules.iter().any(|r| {
                r.starts_with(&format!("-A {chain} "))
                    && r.contains(&format!("--to-destination {SUBNET_PREFIX}"))
            });
            if chain.starts_with("CNI-DN-") && ours {
                leaks.push(format!("iptables nat chain {chain}"));
                delete_chain(chain);
            }
        }
        // Other users' pods (another test on this host) keep them: any per-pod chain or DNAT rule.
        let in_use = nat_rules().iter().any(|r| {
            r.starts_with("-N CNI-DN-")
                || (r.starts_with("-A CNI-HOSTPORT-DNAT ") && r.contains("-j CNI-DN-"))
        });
        if !in_use {
            for chain in PORTMAP_CHAINS {
                if !self.chains_before.contains(chain) {
                    delete_chain(chain);
                }
            }
        }
        if let Some(ports) = run(&["ip", "-o", "link", "show", "master", BRIDGE]) {
            leaks.extend(
                ports
                    .lines()
                    .filter_map(|l| l.split(':').nth(1))
                    .map(|name| format!("veth {} on {BRIDGE}", name.trim())),
            );
        }
        run(&["ip", "link", "del", BRIDGE]);
        // Cached results are `<network>-<container>-<ifname>`, left only by a missing DEL: those of
        // this network, and of other networks (containerd's loopback) for the same containers.
        let results = Path::new(CACHE).join("results");
        let cached = |dir: &Path| -> Vec<String> {
            let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
            entries
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        };
        let ids: Vec<String> = cached(&results)
            .iter()
            .filter_map(|f| Some(f.strip_prefix("pvbench-")?.rsplit_once('-')?.0.to_owned()))
            .collect();
        for f in cached(&results) {
            if ids.iter().any(|id| f.contains(&format!("-{id}-"))) {
                leaks.push(format!("CNI cache entry {f}"));
                let _ = std::fs::remove_file(results.join(f));
            }
        }
        if !self.cache_existed {
            let _ = std::fs::remove_dir(&results);
            let _ = std::fs::remove_dir(CACHE);
        }
        // Not while another user's pods exist: they may need forwarding.
        if ip_forward() != self.ip_forward_before && netns() == self.netns_before {
            let _ = std::fs::write(IP_FORWARD, &self.ip_forward_before);
        }
        leaks
    }
}

impl Drop for CniNet {
    fn drop(&mut self) {
        for leak in self.cleanup() {
            eprintln!("LEAK (removed): {leak}");
        }
    }
}

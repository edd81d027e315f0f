//! CNI networks from the Debian containernetworking-plugins (bridge + host-local + portmap): one of
//! its own for one test daemon, on a bridge and /24 no other test uses ([`TestNetwork`]); the
//! network bench's, shared by both runtimes it compares ([`bench`]); what pods leave on the host.

pub mod bench;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the Debian package installs the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The network: its conflist lives in `<dir>/cni` (where [`crate::daemon::podvisor_cmd`] points the
/// daemon) and host-local's allocations in `<dir>/cni-ipam`. Deletes its bridge on drop.
pub struct TestNetwork {
    /// The CNI network name.
    pub name: String,
    /// The host bridge (also the network name).
    pub bridge: String,
    /// The first three octets of the /24 ("10.x.y").
    pub prefix: String,
    /// host-local's `dataDir`.
    pub ipam_dir: PathBuf,
}

impl TestNetwork {
    /// Writes the conflist under `dir`; None (with a SKIPPED line) without the plugins or root —
    /// or a panic when PODVISOR_REQUIRE_KVM=1 (pod VMs are required to run, and every pod has a
    /// network).
    pub fn new(dir: &Path, test: &str) -> Option<TestNetwork> {
        let why = if !Path::new(CNI_BIN_DIR).join("bridge").exists() {
            Some(format!(
                "no CNI plugins in {CNI_BIN_DIR} (apt package containernetworking-plugins)"
            ))
        } else if !crate::procfs::is_root() {
            Some("pod networking needs root".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            if std::env::var("PODVISOR_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: PODVISOR_REQUIRE_KVM=1 but {why}");
            }
            println!("SKIPPED {test}: {why}");
            return None;
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let r = nanos ^ (std::process::id() << 12);
        let bridge = format!("pvt{:06x}", r & 0xff_ffff);
        let prefix = format!("10.{}.{}", 64 + (r >> 8) % 64, r % 256);
        let ipam_dir = dir.join("cni-ipam");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": format!("{prefix}.0/24") }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": ipam_dir,
                    }
                },
                { "type": "portmap", "capabilities": { "portMappings": true } }
            ]
        });
        let conf_dir = dir.join("cni");
        std::fs::create_dir_all(&conf_dir).unwrap();
        std::fs::write(
            conf_dir.join("10-test.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
        Some(TestNetwork {
            name: bridge.clone(),
            bridge,
            prefix,
            ipam_dir,
        })
    }

    /// The gateway (the bridge's address on the host).
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// IPs host-local still has allocated.
    pub fn allocations(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir.join(&self.name))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// Interfaces enslaved to the bridge (the pods' host-side veths).
    pub fn bridge_ports(&self) -> Vec<String> {
        std::fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Network namespaces (under /run/netns) whose name mentions `id` or its 16-character prefix.
pub fn netns_of(id: &str) -> Vec<String> {
    let short = &id[..id.len().min(16)];
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(short))
        .collect()
}

/// NAT rules (iptables-save form) that mention `id` (portmap tags its rules with the container id).
pub fn nat_rules_of(id: &str) -> Vec<String> {
    let out = Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .expect("iptables");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(id))
        .map(str::to_string)
        .collect()
}

//! Pod networking: a network namespace per pod, the operator's CNI plugins run in it, and a tc
//! redirect between the CNI interface (`eth0`, a veth) and the VM's tap.
//!
//! Crash safety: [`Network::prepare`] validates the pod and returns the [`NetworkRecord`] (namespace
//! path, the exact configuration list, the CNI arguments) the caller persists before
//! [`Network::setup`]; setup's [`Attachment::record`] adds the CNI result, to persist before use.
//! [`Network::teardown`] needs nothing but a record: it runs CNI DEL with the cached configuration and
//! result, then removes the namespace, and can be repeated. A failed setup rolls itself back.

mod cni;
pub(crate) mod netns;
mod result;
mod tc;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub use result::{Dns, Route};

/// Errors of pod networking, by the class the CRI layer reports them as.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A pod field is invalid; the message names the CRI field (`port_mappings[1].container_port`).
    #[error("{0}")]
    InvalidArgument(String),
    /// No usable network: no or an invalid CNI configuration (the message names the file and field),
    /// or a plugin that is missing or does not speak the configuration's version.
    #[error("{0}")]
    NotConfigured(String),
    /// A CNI plugin failed, timed out or returned an unusable result.
    #[error("CNI plugin {plugin} {command}: {message}")]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// ADD, CHECK, DEL or VERSION.
        command: &'static str,
        /// The CNI error code the plugin reported (11: try again later), if it reported one.
        code: Option<u32>,
        /// Its message and details, or what went wrong running it.
        message: String,
    },
    /// A host system call (mount, umount) failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was done (with its path).
        what: String,
        /// The error.
        source: nix::errno::Errno,
    },
    /// A host file operation failed.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A netlink request (links, qdiscs, filters) failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was asked.
        what: String,
        /// The error.
        source: rtnetlink::Error,
    },
    /// An interface the pod network needs is missing from its namespace.
    #[error("no interface {0} in the pod netns")]
    NoInterface(String),
    /// A network namespace could not be created or entered.
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
}

/// Where the CNI configuration, plugins and namespaces are.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    /// CNI configuration directory (the lexically first `*.conflist`/`*.conf`/`*.json` is used).
    pub conf_dir: PathBuf,
    /// Plugin directories, searched in order (also `CNI_PATH`).
    pub bin_dirs: Vec<PathBuf>,
    /// Directory of the pods' namespace files.
    pub netns_dir: PathBuf,
    /// Time limit of one plugin execution.
    pub plugin_timeout: Duration,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            netns_dir: "/run/netns".into(),
            plugin_timeout: Duration::from_secs(60),
        }
    }
}

/// The pod, as CNI needs it.
#[derive(Clone, Debug, Default)]
pub struct PodNetwork {
    /// Sandbox id (`CNI_CONTAINERID`).
    pub pod_id: String,
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    /// CRI port mappings (the `portMappings` capability).
    pub port_mappings: Vec<PortMapping>,
    /// CRI DNS config (the `dns` capability), if the pod has one.
    pub dns: Option<PodDns>,
}

/// A CRI port mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// `tcp`, `udp` or `sctp` (any case).
    pub protocol: String,
    /// Port in the pod, 1-65535.
    pub container_port: i32,
    /// Port on the host, 1-65535; 0 means none (the mapping is skipped).
    pub host_port: i32,
    /// Host address to bind, empty for all.
    pub host_ip: String,
}

/// A CRI DNS config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDns {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub searches: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
}

/// What CNI DEL needs, to persist with the pod: written before ADD (intent), and with the result after.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The pod's namespace file.
    pub netns: PathBuf,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub cni_args: String,
    /// The configuration list used, JSON.
    pub config: String,
    /// Validated port mappings (host port set, protocol lowercase) given to `portMappings`.
    pub port_mappings: Vec<PortMapping>,
    /// DNS settings given to `dns`.
    pub dns: Option<PodDns>,
    /// The final CNI result, JSON; None until ADD completed.
    pub result: Option<String>,
}

impl NetworkRecord {
    /// The pod's addresses from the recorded CNI result (none before ADD completed), IPv4 first.
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        let Some(result) = self.result.as_deref() else {
            return Vec::new();
        };
        let Ok(value) = serde_json::from_str::<Value>(result) else {
            return Vec::new();
        };
        let mut ips: Vec<IpAddr> = result::view(&value, &self.ifname)
            .map(|v| v.ips.into_iter().map(|(ip, _)| ip).collect())
            .unwrap_or_default();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips
    }
}

/// A pod attached to the network.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// The pod's namespace file.
    pub netns: PathBuf,
    /// The CNI interface in it.
    pub ifname: String,
    /// Its addresses and prefix lengths (empty if the plugins assigned none).
    pub ips: Vec<(IpAddr, u8)>,
    /// Its gateway.
    pub gateway: Option<IpAddr>,
    /// Its routes.
    pub routes: Vec<Route>,
    /// Its MAC address (the guest interface takes it).
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// DNS settings from the result.
    pub dns: Dns,
    record: NetworkRecord,
}

impl Attachment {
    /// The record with the CNI result; persist it before using the attachment.
    pub fn record(&self) -> &NetworkRecord {
        &self.record
    }
}

/// The CNI interface name in pods.
const IFNAME: &str = "eth0";

/// The pod network service.
#[derive(Clone, Debug)]
pub struct Network {
    config: NetworkConfig,
}

fn invalid(field: impl std::fmt::Display, msg: impl std::fmt::Display) -> NetworkError {
    NetworkError::InvalidArgument(format!("{field}: {msg}"))
}

/// Validates the CRI port mappings; those without a host port are dropped.
fn port_mappings(mappings: &[PortMapping]) -> Result<Vec<PortMapping>, NetworkError> {
    let mut valid = Vec::new();
    for (i, m) in mappings.iter().enumerate() {
        if m.host_port == 0 {
            continue;
        }
        let field = |f: &str| format!("port_mappings[{i}].{f}");
        let port = |f: &str, p: i32| match p {
            1..=65535 => Ok(()),
            _ => Err(invalid(
                field(f),
                format_args!("{p} is not a port (1-65535)"),
            )),
        };
        port("container_port", m.container_port)?;
        port("host_port", m.host_port)?;
        let protocol = m.protocol.to_ascii_lowercase();
        if !["tcp", "udp", "sctp"].contains(&protocol.as_str()) {
            let msg = format_args!("{:?} is not tcp, udp or sctp", m.protocol);
            return Err(invalid(field("protocol"), msg));
        }
        if !m.host_ip.is_empty() && m.host_ip.parse::<IpAddr>().is_err() {
            let msg = format_args!("{:?} is not an IP address", m.host_ip);
            return Err(invalid(field("host_ip"), msg));
        }
        valid.push(PortMapping {
            protocol,
            ..m.clone()
        });
    }
    Ok(valid)
}

/// The `runtimeConfig` values of a record, by capability.
fn capability_args(record: &NetworkRecord) -> Map<String, Value> {
    let ports: Vec<Value> = record
        .port_mappings
        .iter()
        .map(|m| {
            let mut port = json!({
                "hostPort": m.host_port,
                "containerPort": m.container_port,
                "protocol": m.protocol,
            });
            if !m.host_ip.is_empty() {
                port["hostIP"] = m.host_ip.clone().into();
            }
            port
        })
        .collect();
    let mut args = Map::new();
    args.insert("portMappings".into(), Value::Array(ports));
    if let Some(dns) = &record.dns {
        let dns = json!({"servers": dns.servers, "searches": dns.searches, "options": dns.options});
        args.insert("dns".into(), dns);
    }
    args
}

impl Network {
    /// A network service with `config`.
    pub fn new(config: NetworkConfig) -> Self {
        Self { config }
    }

    /// For CRI Status (NetworkReady): the network's name when a valid configuration and all its
    /// plugins exist; read afresh on every call.
    pub fn status(&self) -> Result<String, NetworkError> {
        let (_, list) = cni::load_dir(&self.config.conf_dir)?;
        for i in 0..list.plugins.len() {
            cni::find_plugin(&self.config.bin_dirs, list.plugin_type(i))?;
        }
        Ok(list.name)
    }

    /// Validates the pod and loads the configuration: the intent record to persist before
    /// [`Network::setup`]. Nothing is created.
    pub fn prepare(&self, pod: &PodNetwork) -> Result<NetworkRecord, NetworkError> {
        let id_ok =
            pod.pod_id.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_alphanumeric() || (i > 0 && matches!(b, b'_' | b'.' | b'-'))
            });
        if pod.pod_id.is_empty() || !id_ok {
            return Err(invalid(
                "pod_sandbox_id",
                format_args!("{:?} is not a valid id", pod.pod_id),
            ));
        }
        for (field, value) in [
            ("metadata.name", &pod.name),
            ("metadata.namespace", &pod.namespace),
            ("metadata.uid", &pod.uid),
        ] {
            if value.contains([';', '=']) {
                return Err(invalid(
                    field,
                    format_args!("{value:?} contains ';' or '='"),
                ));
            }
        }
        let port_mappings = port_mappings(&pod.port_mappings)?;
        let (_, list) = cni::load_dir(&self.config.conf_dir)?;
        let short_id = &pod.pod_id[..pod.pod_id.len().min(16)];
        Ok(NetworkRecord {
            netns: self.config.netns_dir.join(format!("podvisor-{short_id}")),
            container_id: pod.pod_id.clone(),
            ifname: IFNAME.into(),
            cni_args: cni::k8s_args(&pod.namespace, &pod.name, &pod.pod_id, &pod.uid),
            config: list.json,
            port_mappings,
            dns: pod.dns.clone(),
            result: None,
        })
    }

    fn runtime<'a>(
        &'a self,
        record: &'a NetworkRecord,
        netns: &'a str,
        caps: &'a Map<String, Value>,
    ) -> cni::Runtime<'a> {
        cni::Runtime {
            container_id: &record.container_id,
            netns,
            ifname: &record.ifname,
            args: &record.cni_args,
            bin_dirs: &self.config.bin_dirs,
            capability_args: caps,
            timeout: self.config.plugin_timeout,
        }
    }

    /// Creates the pod's namespace and runs CNI ADD in it, as `record` (from [`Network::prepare`])
    /// says. On failure everything is rolled back (DEL, namespace removed) before the error returns;
    /// should the rollback fail too, it is logged and [`Network::teardown`] remains to be done.
    pub async fn setup(&self, record: &NetworkRecord) -> Result<Attachment, NetworkError> {
        let list = cni::ConfList::parse(&record.config, "of the pod record")?;
        let caps = capability_args(record);
        let netns = record.netns.to_string_lossy();
        let rt = self.runtime(record, &netns, &caps);
        cni::check_versions(&list, &rt).await?;
        netns::create(&record.netns).await?;
        let attach = async {
            let result = cni::add(&list, &rt).await?;
            let view = result::view(&result, &record.ifname).map_err(|message| {
                let plugin = list.plugin_type(list.plugins.len() - 1).to_string();
                NetworkError::Plugin {
                    plugin,
                    command: "ADD",
                    code: None,
                    message,
                }
            })?;
            let handle = netns::handle_in(&record.netns).await?;
            let link = tc::link(&handle, &record.ifname).await?;
            Ok::<_, NetworkError>((result, view, link))
        };
        match attach.await {
            Ok((result, view, link)) => Ok(Attachment {
                netns: record.netns.clone(),
                ifname: record.ifname.clone(),
                ips: view.ips,
                gateway: view.gateway,
                routes: view.routes,
                mac: link.mac,
                mtu: link.mtu,
                dns: view.dns,
                record: NetworkRecord {
                    result: Some(result.to_string()),
                    ..record.clone()
                },
            }),
            Err(e) => {
                let intent = NetworkRecord {
                    result: None,
                    ..record.clone()
                };
                if let Err(rollback) = self.teardown(&intent).await {
                    tracing::warn!(pod = %record.container_id, error = %rollback, "rolling back a failed CNI ADD");
                }
                Err(e)
            }
        }
    }

    /// Redirects all traffic between the pod's CNI interface and `tap` (which must exist in the pod's
    /// namespace) with tc; replaces an earlier redirect.
    pub async fn connect_tap(
        &self,
        attachment: &Attachment,
        tap: &str,
    ) -> Result<(), NetworkError> {
        let handle = netns::handle_in(&attachment.netns).await?;
        tc::connect(&handle, &attachment.ifname, tap)
            .await
            .map(drop)
    }

    /// CNI CHECK of an attachment (a no-op for configurations before 0.4.0 or with `disableCheck`).
    pub async fn check(&self, record: &NetworkRecord) -> Result<(), NetworkError> {
        let list = cni::ConfList::parse(&record.config, "of the pod record")?;
        let Some(result) = record.result.as_deref() else {
            return Err(NetworkError::InvalidArgument(
                "the pod network was not set up".into(),
            ));
        };
        let result: Value = serde_json::from_str(result).map_err(|e| {
            NetworkError::InvalidArgument(format!("the pod record's CNI result: {e}"))
        })?;
        let caps = capability_args(record);
        let netns = record.netns.to_string_lossy();
        cni::check(&list, &result, &self.runtime(record, &netns, &caps)).await
    }

    /// CNI DEL with the record's configuration and result (always, even if ADD never ran or the
    /// namespace is gone, so IPs and port mappings are released), then removes the namespace.
    /// Idempotent. If DEL fails the namespace is kept, for a retry.
    pub async fn teardown(&self, record: &NetworkRecord) -> Result<(), NetworkError> {
        let list = cni::ConfList::parse(&record.config, "of the pod record")?;
        let result = record
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok());
        let caps = capability_args(record);
        // A namespace that is gone (or a file left unmounted by a crash) is passed as none: the
        // plugins then release what is outside it (bridge: IPAM; portmap: iptables rules).
        let netns = if netns::is_netns(&record.netns) {
            record.netns.to_string_lossy()
        } else {
            "".into()
        };
        cni::del(&list, result.as_ref(), &self.runtime(record, &netns, &caps)).await?;
        netns::remove(&record.netns)
    }
}

//! A pod's network, between the network service and the pod: the CNI attachment, the tap a VM's
//! virtio-net device uses (created in the pod's namespace and redirected to the CNI interface with
//! tc), and the guest interface the agent configures from the CNI result.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_cri::v1::{PodSandboxConfig, Protocol};
use podvisor_proto as pb;

use pb::AgentClient;
use tonic::transport::Channel;

use super::{agent_err, PodError};
pub use crate::network::Attachment;
use crate::network::{netns, Network, NetworkRecord, PodDns, PodNetwork, PortMapping, Route};

/// The tap's name in the pod's namespace (one VM per namespace).
const TAP_NAME: &str = "tap0";
/// The guest interface's name.
const GUEST_IFNAME: &str = "eth0";

/// What CNI needs to know of a pod.
pub fn pod_network(id: &str, config: &PodSandboxConfig) -> PodNetwork {
    let meta = config.metadata.clone().unwrap_or_default();
    let port_mappings = config
        .port_mappings
        .iter()
        .map(|m| PortMapping {
            protocol: match Protocol::try_from(m.protocol) {
                Ok(Protocol::Udp) => "udp",
                Ok(Protocol::Sctp) => "sctp",
                // An unknown enum value is reported by the validation with its field.
                Ok(Protocol::Tcp) => "tcp",
                Err(_) => "",
            }
            .into(),
            container_port: m.container_port,
            host_port: m.host_port,
            host_ip: m.host_ip.clone(),
        })
        .collect();
    PodNetwork {
        pod_id: id.into(),
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        port_mappings,
        dns: config.dns_config.as_ref().map(|d| PodDns {
            servers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        }),
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The agent's routes for an attachment: CNI routes without a gateway use the interface's gateway
/// of the same family (the CNI spec's default); the default route is named `default`.
fn guest_routes(routes: &[Route], gateway: Option<IpAddr>) -> Vec<pb::Route> {
    routes
        .iter()
        .map(|r| {
            let (dst, prefix) = r.dst;
            let gateway =
                r.gw.or(gateway.filter(|g| g.is_ipv4() == dst.is_ipv4()))
                    .map(|g| g.to_string())
                    .unwrap_or_default();
            let dest = match (dst, prefix) {
                (IpAddr::V4(a), 0) if a.is_unspecified() => "default".to_string(),
                _ => format!("{dst}/{prefix}"),
            };
            pb::Route {
                dest,
                gateway,
                device: GUEST_IFNAME.into(),
                source: String::new(),
            }
        })
        .collect()
}

/// A pod VM's network device: a tap in the pod's namespace, redirected to the CNI interface.
pub struct PodNic {
    /// The VMM's net device configuration.
    pub device: vmm::NetConfig,
}

/// CNI ADD for the pod network `intent`. The caller persists the attachment's record before using it.
pub async fn attach(network: &Network, intent: &NetworkRecord) -> Result<Attachment, PodError> {
    Ok(network.setup(intent).await?)
}

/// The tap a VM uses in the attachment's namespace, redirected to the CNI interface with tc.
pub async fn vm_nic(network: &Network, att: &Attachment) -> Result<PodNic, PodError> {
    let tap = netns::run_in(&att.netns, || vmm::Tap::open(TAP_NAME))
        .await?
        .map_err(PodError::Tap)?;
    network.connect_tap(att, TAP_NAME).await?;
    let mtu = u16::try_from(att.mtu).unwrap_or(u16::MAX);
    Ok(PodNic {
        device: vmm::NetConfig {
            tap: Arc::new(tap),
            mac: att.mac,
            mtu,
        },
    })
}

/// Has the agent give the guest interface the attachment's addresses and routes.
pub async fn configure_guest(
    agent: &mut AgentClient<Channel>,
    att: &Attachment,
) -> Result<(), PodError> {
    let interface = pb::Interface {
        hw_addr: mac_string(&att.mac),
        name: GUEST_IFNAME.into(),
        ip_addresses: att.ips.iter().map(|(ip, p)| format!("{ip}/{p}")).collect(),
        mtu: att.mtu,
    };
    agent
        .update_interface(pb::UpdateInterfaceRequest {
            interface: Some(interface),
        })
        .await
        .map_err(agent_err("UpdateInterface"))?;
    let routes = guest_routes(&att.routes, att.gateway);
    if !routes.is_empty() {
        agent
            .update_routes(pb::UpdateRoutesRequest { routes })
            .await
            .map_err(agent_err("UpdateRoutes"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_take_the_gateway_of_their_family() {
        let route = |dst: &str, prefix, gw: Option<&str>| Route {
            dst: (dst.parse().unwrap(), prefix),
            gw: gw.map(|g| g.parse().unwrap()),
        };
        let routes = [
            route("0.0.0.0", 0, None),
            route("10.1.0.0", 16, Some("10.0.0.9")),
            route("::", 0, None),
        ];
        let got = guest_routes(&routes, Some("10.0.0.1".parse().unwrap()));
        let got: Vec<_> = got
            .iter()
            .map(|r| (r.dest.as_str(), r.gateway.as_str(), r.device.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("default", "10.0.0.1", "eth0"),
                ("10.1.0.0/16", "10.0.0.9", "eth0"),
                ("::/0", "", "eth0"),
            ]
        );
    }

    #[test]
    fn pod_network_follows_the_cri_config() {
        let config = PodSandboxConfig {
            metadata: Some(k8s_cri::v1::PodSandboxMetadata {
                name: "web".into(),
                namespace: "ns".into(),
                uid: "u1".into(),
                attempt: 0,
            }),
            port_mappings: vec![k8s_cri::v1::PortMapping {
                protocol: Protocol::Udp as i32,
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            }],
            ..Default::default()
        };
        let net = pod_network("abc", &config);
        assert_eq!(
            (net.name.as_str(), net.namespace.as_str(), net.uid.as_str()),
            ("web", "ns", "u1")
        );
        assert_eq!(net.port_mappings[0].protocol, "udp");
        assert_eq!(net.port_mappings[0].host_port, 5353);
        assert!(net.dns.is_none());
        assert_eq!(mac_string(&[2, 0, 0xab, 1, 2, 3]), "02:00:ab:01:02:03");
    }
}

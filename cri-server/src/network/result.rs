//! CNI results (0.3.x, 0.4.0, 1.0.0) and their typed view for one interface of the pod.
//!
//! The formats differ only in details this view ignores: 0.3.x/0.4.0 IPs carry a `version` ("4"/"6"),
//! 1.0.0 ones do not. An IP belongs to the interface its `interface` index points at; IPs without an
//! index are taken as the pod interface's.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// DNS settings of a result (or a runtime's `dns` capability values).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dns {
    /// Name servers.
    pub nameservers: Vec<String>,
    /// Local domain.
    pub domain: String,
    /// Search domains.
    pub search: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
}

/// A route of the pod interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination network and prefix length.
    pub dst: (IpAddr, u8),
    /// Gateway: the result's, else the pod interface's gateway of the same family (what the plugins
    /// install), else none (a link route).
    pub gw: Option<IpAddr>,
}

/// What a result says about the interface `ifname` in the pod's namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Addresses and prefix lengths.
    pub ips: Vec<(IpAddr, u8)>,
    /// The first gateway of those addresses.
    pub gateway: Option<IpAddr>,
    /// Routes.
    pub routes: Vec<Route>,
    /// MAC address, if the result reports the interface.
    pub mac: Option<[u8; 6]>,
    /// DNS settings.
    pub dns: Dns,
}

#[derive(Deserialize)]
struct RawResult {
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    #[serde(default)]
    ips: Vec<RawIp>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    dns: Dns,
}

#[derive(Deserialize)]
struct RawInterface {
    name: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Deserialize)]
struct RawIp {
    #[serde(default)]
    interface: Option<usize>,
    address: String,
    #[serde(default)]
    gateway: Option<String>,
}

#[derive(Deserialize)]
struct RawRoute {
    dst: String,
    #[serde(default)]
    gw: Option<String>,
}

/// Parses `a.b.c.d/n` or `x::y/n`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("{s:?} is not an address/prefix");
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((addr, prefix))
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("{field}: {s:?} is not an IP address"))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The view of `result` for interface `ifname`; errors name the result field.
pub fn view(result: &Value, ifname: &str) -> Result<View, String> {
    let raw = RawResult::deserialize(result).map_err(|e| format!("result: {e}"))?;
    let pod_if = raw
        .interfaces
        .iter()
        .position(|i| i.name == ifname && !i.sandbox.is_empty());
    let mut view = View {
        mac: pod_if.and_then(|i| parse_mac(&raw.interfaces[i].mac)),
        dns: raw.dns,
        ..View::default()
    };
    let mut gateways = Vec::new();
    for (i, ip) in raw.ips.iter().enumerate() {
        if let (Some(index), Some(pod_if)) = (ip.interface, pod_if) {
            if index != pod_if {
                continue;
            }
        }
        let cidr = parse_cidr(&ip.address).map_err(|e| format!("ips[{i}].address: {e}"))?;
        view.ips.push(cidr);
        if let Some(gw) = ip.gateway.as_deref().filter(|g| !g.is_empty()) {
            gateways.push(parse_ip(&format!("ips[{i}].gateway"), gw)?);
        }
    }
    view.gateway = gateways.first().copied();
    for (i, route) in raw.routes.iter().enumerate() {
        let dst = parse_cidr(&route.dst).map_err(|e| format!("routes[{i}].dst: {e}"))?;
        let gw = match route.gw.as_deref().filter(|g| !g.is_empty()) {
            Some(gw) => Some(parse_ip(&format!("routes[{i}].gw"), gw)?),
            None => gateways
                .iter()
                .copied()
                .find(|g| g.is_ipv4() == dst.0.is_ipv4()),
        };
        view.routes.push(Route { dst, gw });
    }
    Ok(view)
}

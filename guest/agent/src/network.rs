//! Guest network configuration over rtnetlink: the agent side of `UpdateInterface`, `UpdateRoutes` and
//! `AddArpNeighbors`.
//!
//! Every request is validated completely (syntax, then the interfaces it names) before the first change, so
//! an invalid request changes nothing. Error messages start with the request field, e.g.
//! `routes[1].gateway: "x" is not an IP address`.

use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::{TryStream, TryStreamExt};
use nix::errno::Errno;
use podvisor_proto::{ArpNeighbor, Interface, Route};
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Errors of network operations.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A request field is invalid; the message starts with the field name.
    #[error("{0}")]
    InvalidArgument(String),
    /// An interface the request names (by MAC address or name) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A netlink request failed; the message says which.
    #[error("{0}")]
    Netlink(String),
}

/// The guest's netlink connection, used by the network RPCs.
pub struct Network {
    handle: Handle,
}

impl Network {
    /// Opens a netlink socket and spawns its connection task on the current tokio runtime (panics outside
    /// of one, like `tokio::spawn`).
    pub fn new() -> Result<Self, NetworkError> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetworkError::Netlink(format!("opening a netlink socket: {e}")))?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Finds the link whose MAC address is `i.hw_addr`, sets it down, renames it if `i.name` is set, sets
    /// its MTU if `i.mtu` is non-zero, replaces its IPv4/IPv6 addresses with `i.ip_addresses` (IPv6
    /// link-local ones are kept) and sets it up. Returns its name and index.
    pub async fn update_interface(&self, i: &Interface) -> Result<(String, u32), NetworkError> {
        let plan = validate_interface(i)?;
        let links = self.links().await?;
        let Some(link) = links.iter().find(|l| l.mac == plan.mac) else {
            let msg = format!("no interface has the MAC address {}", i.hw_addr);
            return Err(NetworkError::NotFound(format!("interface.hw_addr: {msg}")));
        };
        let (index, old_name) = (link.index, link.name.as_str());
        if let Some(name) = &plan.name {
            if let Some(other) = links.iter().find(|l| &l.name == name && l.index != index) {
                let msg = format!("{name:?} is the name of interface {}", other.index);
                return Err(invalid("interface.name", msg));
            }
        }
        let what = |step: &str| format!("interface {old_name:?} (index {index}): {step}");
        let down = LinkUnspec::new_with_index(index).down().build();
        ack(
            self.handle.link().set(down).execute().await,
            what("setting it down"),
        )?;
        let rename = plan.name.as_ref().filter(|n| *n != old_name);
        if rename.is_some() || plan.mtu.is_some() {
            let mut change = LinkUnspec::new_with_index(index);
            if let Some(name) = rename {
                change = change.name(name.clone());
            }
            if let Some(mtu) = plan.mtu {
                change = change.mtu(mtu);
            }
            let result = self.handle.link().set(change.build()).execute().await;
            ack(result, what("renaming it / setting its MTU"))?;
        }
        let name = plan.name.unwrap_or_else(|| old_name.to_string());
        self.replace_addresses(index, &name, &plan.addresses)
            .await?;
        let up = LinkUnspec::new_with_index(index).up().build();
        let what = format!("interface {name:?} (index {index}): setting it up");
        ack(self.handle.link().set(up).execute().await, what)?;
        Ok((name, index))
    }

    /// For every device named in `routes`, deletes its routes of the main table that the kernel did not add
    /// itself (protocol other than `kernel`), then adds `routes`: a route with a gateway in universe scope,
    /// one without in link scope (added first, so that gateways they make reachable can be used).
    pub async fn update_routes(&self, routes: &[Route]) -> Result<(), NetworkError> {
        let plans = validate_all(routes, validate_route)?;
        let names = plans.iter().map(|p| p.device.as_str());
        let indexes = self.link_indexes("routes", names).await?;
        let mut devices = indexes.clone();
        devices.sort_unstable();
        devices.dedup();
        self.flush_routes(&devices).await?;

        let direct = (0..plans.len()).filter(|&i| plans[i].gateway.is_none());
        let via = (0..plans.len()).filter(|&i| plans[i].gateway.is_some());
        for i in direct.chain(via) {
            let (plan, index) = (&plans[i], indexes[i]);
            let message =
                route_message(plan, index).map_err(|e| invalid(format!("routes[{i}]"), e))?;
            let result = self.handle.route().add(message).replace().execute().await;
            let what = format!(
                "routes[{i}]: adding {:?} dev {}",
                routes[i].dest, plan.device
            );
            ack(result, what)?;
        }
        Ok(())
    }

    /// Adds (or replaces) a permanent (`NUD_PERMANENT`) neighbour entry for each of `neighbors`.
    pub async fn add_arp_neighbors(&self, neighbors: &[ArpNeighbor]) -> Result<(), NetworkError> {
        let plans = validate_all(neighbors, validate_neighbor)?;
        let names = plans.iter().map(|p| p.device.as_str());
        let indexes = self.link_indexes("neighbors", names).await?;
        for (i, (plan, index)) in plans.iter().zip(indexes).enumerate() {
            let request = self.handle.neighbours().add(index, IpAddr::V4(plan.ip));
            let request = request.state(NeighbourState::Permanent);
            let request = request.link_layer_address(&plan.mac).replace();
            let what = format!("neighbors[{i}]: adding {} dev {}", plan.ip, plan.device);
            ack(request.execute().await, what)?;
        }
        Ok(())
    }

    /// Lists the links (name, index, MAC address).
    /// Sets the loopback interface up (the kernel creates it down); the pod's containers share it.
    pub async fn loopback_up(&self) -> Result<(), NetworkError> {
        let links = self.links().await?;
        let lo = links.iter().find(|l| l.name == "lo");
        let lo = lo.ok_or_else(|| NetworkError::NotFound("no loopback interface".into()))?;
        let up = LinkUnspec::new_with_index(lo.index).up().build();
        ack(self.handle.link().set(up).execute().await, "setting lo up")
    }

    async fn links(&self) -> Result<Vec<Link>, NetworkError> {
        let messages = collect(self.handle.link().get().execute(), "listing interfaces").await?;
        Ok(messages.iter().map(Link::from_message).collect())
    }

    /// The indexes of the links named `names`, or NotFound naming the field `{list}[i].device`.
    async fn link_indexes<'a, I>(&self, list: &str, names: I) -> Result<Vec<u32>, NetworkError>
    where
        I: Iterator<Item = &'a str>,
    {
        let links = self.links().await?;
        let find = |(i, name): (usize, &str)| match links.iter().find(|l| l.name == name) {
            Some(link) => Ok(link.index),
            None => {
                let msg = format!("{list}[{i}].device: no interface named {name:?}");
                Err(NetworkError::NotFound(msg))
            }
        };
        names.enumerate().map(find).collect()
    }

    /// Deletes the routes of the main table through links `devices`, except those the kernel added.
    async fn flush_routes(&self, devices: &[u32]) -> Result<(), NetworkError> {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let current = collect(self.handle.route().get(query).execute(), "listing routes");
            for route in current.await? {
                let Some(oif) = route_oif(&route).filter(|oif| devices.contains(oif)) else {
                    continue;
                };
                let main = route_table(&route) == u32::from(RouteHeader::RT_TABLE_MAIN);
                if !main || route.header.protocol == RouteProtocol::Kernel {
                    continue;
                }
                let result = self
                    .handle
                    .route()
                    .del(deletion_message(&route))
                    .execute()
                    .await;
                // ESRCH: gone already, e.g. with a route it depended on.
                if errno(&result) != Some(Errno::ESRCH) {
                    let dest = describe_route(&route);
                    ack(
                        result,
                        format!("deleting route {dest} (device index {oif})"),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Deletes the addresses of link `index` that are not in `want` (except IPv6 link-local ones), then
    /// adds (or updates) those of `want`. IPv6 addresses skip duplicate address detection: the host
    /// allocated them, and a tentative address could not be used by the pod before DAD ends.
    async fn replace_addresses(
        &self,
        index: u32,
        name: &str,
        want: &[Cidr],
    ) -> Result<(), NetworkError> {
        let current = self.handle.address().get().set_link_index_filter(index);
        let current = collect(
            current.execute(),
            format!("listing the addresses of {name:?}"),
        );
        for message in current.await? {
            let Some(cidr) = address_of(&message) else {
                continue;
            };
            if want.contains(&cidr) || is_ipv6_link_local(cidr.addr) {
                continue;
            }
            let result = self.handle.address().del(message).execute().await;
            // EADDRNOTAVAIL: a secondary address removed along with its primary.
            if errno(&result) != Some(Errno::EADDRNOTAVAIL) {
                ack(result, format!("deleting {cidr} from {name:?}"))?;
            }
        }
        for cidr in want {
            let mut request = self.handle.address().add(index, cidr.addr, cidr.prefix);
            if cidr.addr.is_ipv6() {
                request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            }
            let result = request.replace().execute().await;
            ack(result, format!("adding {cidr} to {name:?}"))?;
        }
        Ok(())
    }
}

/// A link as listed by the kernel.
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let (index, name, mac) = (m.header.index, String::new(), Vec::new());
        let mut link = Link { index, name, mac };
        for attribute in &m.attributes {
            match attribute {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Address(mac) => link.mac = mac.clone(),
                _ => {}
            }
        }
        link
    }
}

/// Collects a dump, mapping its error with [`netlink`].
async fn collect<S>(stream: S, what: impl Display) -> Result<Vec<S::Ok>, NetworkError>
where
    S: TryStream<Error = rtnetlink::Error>,
{
    stream.try_collect().await.map_err(netlink(what))
}

/// Validates every item of a request list (with its index) before any change.
fn validate_all<T, P>(
    items: &[T],
    validate: fn(usize, &T) -> Result<P, NetworkError>,
) -> Result<Vec<P>, NetworkError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| validate(i, item))
        .collect()
}

/// Maps an rtnetlink error to [`NetworkError::Netlink`], prefixed with `what`. (Not through its `Display`:
/// that formats unexpected messages with `Debug`, which would link ~100 KB of `Debug` code into the agent.)
fn netlink(what: impl Display) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    use rtnetlink::Error as E;
    move |e| {
        let reason = match e {
            E::NetlinkError(m) => m.to_io().to_string(),
            E::RequestFailed => "the netlink connection is closed".to_string(),
            E::UnexpectedMessage(_) => "unexpected netlink message".to_string(),
            E::NamespaceError(s) | E::InvalidNla(s) => s,
            E::InvalidHardwareAddress(_) | E::InvalidIp(_) | E::InvalidAddress(..) => {
                "malformed netlink message".to_string()
            }
        };
        NetworkError::Netlink(format!("{what}: {reason}"))
    }
}

/// The result of a request that returns only an acknowledgement, its error mapped with [`netlink`].
fn ack(result: Result<(), rtnetlink::Error>, what: impl Display) -> Result<(), NetworkError> {
    result.map_err(netlink(what))
}

/// The errno of a failed request, if the kernel refused it.
fn errno(result: &Result<(), rtnetlink::Error>) -> Option<Errno> {
    match result {
        Err(rtnetlink::Error::NetlinkError(m)) => m.code.map(|c| Errno::from_raw(-c.get())),
        _ => None,
    }
}

/// The local address and prefix of an address message (IFA_LOCAL, else IFA_ADDRESS).
fn address_of(m: &AddressMessage) -> Option<Cidr> {
    let (mut local, mut address) = (None, None);
    for attribute in &m.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let prefix = m.header.prefix_len;
    local.or(address).map(|addr| Cidr { addr, prefix })
}

fn is_ipv6_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The output interface of a (single-path) route.
fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

/// The table of a route (RTA_TABLE when present: it holds ids above 255).
fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// An RTM_DELROUTE message for a dumped route: its header and the attributes that identify it.
fn deletion_message(r: &RouteMessage) -> RouteMessage {
    use RouteAttribute::{Destination, Gateway, Oif, Priority, Table, Via};
    let mut message = RouteMessage::default();
    message.header = r.header.clone();
    let keep = |a: &&RouteAttribute| {
        matches!(
            a,
            Destination(_) | Gateway(_) | Via(_) | Oif(_) | Priority(_) | Table(_)
        )
    };
    message.attributes = r.attributes.iter().filter(keep).cloned().collect();
    message
}

/// "10.0.0.0/8" or "default" for a dumped route, for error messages.
fn describe_route(r: &RouteMessage) -> String {
    let dest = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    });
    match dest {
        Some(ip) => format!("{ip}/{}", r.header.destination_prefix_length),
        None => "default".to_string(),
    }
}

/// The RTM_NEWROUTE message of a validated route through link `index`.
fn route_message(plan: &RoutePlan, index: u32) -> Result<RouteMessage, String> {
    let text = |e: &dyn Display| e.to_string();
    let builder = RouteMessageBuilder::<IpAddr>::new();
    let builder = builder.destination_prefix(plan.dest.addr, plan.dest.prefix);
    let mut builder = builder.map_err(|e| text(&e))?;
    builder = match plan.gateway {
        Some(gateway) => builder
            .gateway(gateway)
            .map_err(|e| text(&e))?
            .scope(RouteScope::Universe),
        None => builder.scope(RouteScope::Link),
    };
    if let Some(source) = plan.source {
        builder = builder.pref_source(source).map_err(|e| text(&e))?;
    }
    Ok(builder.output_interface(index).build())
}

/// An IP address with a prefix length, e.g. `10.88.0.5/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether bits beyond the prefix are set (not a network address).
    fn has_host_bits(&self) -> bool {
        let bits = match self.addr {
            IpAddr::V4(ip) => u128::from(u32::from(ip)) << 96,
            IpAddr::V6(ip) => u128::from(ip),
        };
        bits.checked_shl(u32::from(self.prefix)).unwrap_or(0) != 0
    }
}

/// Parses `ip/prefix` (IPv4 or IPv6; the prefix is required).
fn parse_cidr(s: &str) -> Option<Cidr> {
    let (ip, prefix) = s.split_once('/')?;
    let addr: IpAddr = ip.parse().ok()?;
    if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(Cidr { addr, prefix })
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (hex digits of either case).
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Checks an interface name: 1-15 characters of `[A-Za-z0-9_.-]`, not `.` or `..`.
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must have 1 to 15 characters"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_.-".contains(&b);
    if !name.bytes().all(allowed) {
        return Err(format!("{name:?} may only contain A-Z a-z 0-9 _ . -"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

fn invalid(field: impl Display, reason: impl Display) -> NetworkError {
    NetworkError::InvalidArgument(format!("{field}: {reason}"))
}

/// A MAC address field, parsed.
fn mac_field(field: &str, value: &str) -> Result<[u8; 6], NetworkError> {
    let reason = || format!("{value:?} is not a MAC address (aa:bb:cc:dd:ee:ff)");
    parse_mac(value).ok_or_else(|| invalid(field, reason()))
}

/// An optional IP address field (empty: none), parsed.
fn ip_field(field: &str, value: &str) -> Result<Option<IpAddr>, NetworkError> {
    if value.is_empty() {
        return Ok(None);
    }
    let reason = || format!("{value:?} is not an IP address");
    value
        .parse()
        .map(Some)
        .map_err(|_| invalid(field, reason()))
}

/// A device name field (must be set and well-formed; whether it exists is checked later).
fn device_field(field: &str, value: &str) -> Result<String, NetworkError> {
    if value.is_empty() {
        return Err(invalid(field, "must be set"));
    }
    check_ifname(value).map_err(|reason| invalid(field, reason))?;
    Ok(value.to_string())
}

/// A validated `Interface`.
#[derive(Debug, PartialEq)]
struct InterfacePlan {
    mac: [u8; 6],
    name: Option<String>,
    mtu: Option<u32>,
    addresses: Vec<Cidr>,
}

fn validate_interface(i: &Interface) -> Result<InterfacePlan, NetworkError> {
    let mac = mac_field("interface.hw_addr", &i.hw_addr)?;
    if mac == [0; 6] {
        let reason = "the all-zero MAC address identifies no device";
        return Err(invalid("interface.hw_addr", reason));
    }
    let name = if i.name.is_empty() {
        None
    } else {
        check_ifname(&i.name).map_err(|reason| invalid("interface.name", reason))?;
        Some(i.name.clone())
    };
    let mtu = match i.mtu {
        0 => None,
        68..=65535 => Some(i.mtu),
        mtu => {
            return Err(invalid(
                "interface.mtu",
                format!("{mtu} is not in 68..=65535 (or 0)"),
            ))
        }
    };
    let addresses = i
        .ip_addresses
        .iter()
        .enumerate()
        .map(|(n, a)| {
            let field = format!("interface.ip_addresses[{n}]");
            parse_cidr(a)
                .ok_or_else(|| invalid(field, format!("{a:?} is not an address in CIDR form")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(InterfacePlan {
        mac,
        name,
        mtu,
        addresses,
    })
}

/// A validated `Route`.
#[derive(Debug, PartialEq)]
struct RoutePlan {
    dest: Cidr,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    device: String,
}

fn validate_route(i: usize, r: &Route) -> Result<RoutePlan, NetworkError> {
    let field = |name: &str| format!("routes[{i}].{name}");
    let gateway = ip_field(&field("gateway"), &r.gateway)?;
    let source = ip_field(&field("source"), &r.source)?;
    let dest = if r.dest == "default" {
        // 0.0.0.0/0, or ::/0 when the gateway (or else the source) is IPv6.
        let addr = match gateway.or(source) {
            Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        Cidr { addr, prefix: 0 }
    } else {
        let d = &r.dest;
        let reason = || format!("{d:?} is neither \"default\" nor a network in CIDR form");
        let dest = parse_cidr(d).ok_or_else(|| invalid(field("dest"), reason()))?;
        if dest.has_host_bits() {
            let reason = format!("{d:?} has bits set beyond its prefix length");
            return Err(invalid(field("dest"), reason));
        }
        dest
    };
    let family = |ip: IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    for (name, ip) in [("gateway", gateway), ("source", source)] {
        if let Some(ip) = ip.filter(|ip| ip.is_ipv4() != dest.addr.is_ipv4()) {
            let (d, ip_family, dest_family) = (&r.dest, family(ip), family(dest.addr));
            let reason = format!("{ip} is {ip_family} but dest {d:?} is {dest_family}");
            return Err(invalid(field(name), reason));
        }
    }
    let device = device_field(&field("device"), &r.device)?;
    Ok(RoutePlan {
        dest,
        gateway,
        source,
        device,
    })
}

/// A validated `ArpNeighbor`.
#[derive(Debug, PartialEq)]
struct NeighborPlan {
    ip: Ipv4Addr,
    mac: [u8; 6],
    device: String,
}

fn validate_neighbor(i: usize, n: &ArpNeighbor) -> Result<NeighborPlan, NetworkError> {
    let field = |name: &str| format!("neighbors[{i}].{name}");
    let reason = || format!("{:?} is not an IPv4 address", n.ip);
    let ip = n.ip.parse().map_err(|_| invalid(field("ip"), reason()))?;
    let mac = mac_field(&field("hw_addr"), &n.hw_addr)?;
    let device = device_field(&field("device"), &n.device)?;
    Ok(NeighborPlan { ip, mac, device })
}

#[cfg(test)]
mod tests;

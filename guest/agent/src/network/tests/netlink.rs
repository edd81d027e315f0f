//! The netlink half: interfaces, addresses, routes and neighbours changed in a namespace of the test's own.

use std::future::Future;
use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use nix::errno::Errno;
use nix::sched::{unshare, CloneFlags};
use podvisor_proto::{ArpNeighbor, Interface, Route};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::LinkVeth;

use super::*;

/// The RPC futures must be `Send`: tonic requires it of service methods.
#[allow(dead_code)]
fn futures_are_send(net: &Network, i: &Interface, r: &[Route], n: &[ArpNeighbor]) {
    fn send<T: Send>(_: T) {}
    send(net.update_interface(i));
    send(net.update_routes(r));
    send(net.add_arp_neighbors(n));
}

/// Runs `test` on a new thread, in a new network namespace, on a current-thread runtime, with a [`Network`]
/// and a veth pair `veth0` (MAC [`MAC`]) / `veth1`. Skips (and says so) without the privilege.
fn in_netns<F, Fut>(name: &'static str, test: F)
where
    F: FnOnce(Network) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        match unshare(CloneFlags::CLONE_NEWNET) {
            Ok(()) => {}
            Err(Errno::EPERM) => {
                println!(
                    "{name}: skipped: needs root/CAP_NET_ADMIN (unshare(CLONE_NEWNET): EPERM)"
                );
                return;
            }
            Err(e) => panic!("{name}: unshare(CLONE_NEWNET): {e}"),
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        runtime.unwrap().block_on(async move {
            let net = Network::new().unwrap();
            let veth = LinkVeth::new("veth0", "veth1").address(MAC_BYTES.to_vec());
            net.handle.link().add(veth.build()).execute().await.unwrap();
            test(net).await;
        });
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// (name, MTU, up) of link `index`.
async fn link_state(net: &Network, index: u32) -> (String, u32, bool) {
    let request = net.handle.link().get().match_index(index).execute();
    let links: Vec<_> = request.try_collect().await.unwrap();
    let mut state = (
        String::new(),
        0,
        links[0].header.flags.contains(LinkFlags::Up),
    );
    for a in &links[0].attributes {
        match a {
            LinkAttribute::IfName(n) => state.0 = n.clone(),
            LinkAttribute::Mtu(m) => state.1 = *m,
            _ => {}
        }
    }
    state
}

/// The addresses of link `index`, sorted, without IPv6 link-local ones.
async fn addresses(net: &Network, index: u32) -> Vec<String> {
    let request = net
        .handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let messages: Vec<_> = request.try_collect().await.unwrap();
    let cidrs = messages.iter().filter_map(address_of);
    let mut all: Vec<String> = cidrs
        .filter(|c| !is_ipv6_link_local(c.addr))
        .map(|c| c.to_string())
        .collect();
    all.sort();
    all
}

/// The main-table routes of link `index` as "dest via gateway scope proto", sorted, without the IPv6
/// routes of the kernel (fe80::/64, multicast...).
async fn routes(net: &Network, index: u32) -> Vec<String> {
    let mut all = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        let messages: Vec<_> = net
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .unwrap();
        for r in messages
            .iter()
            .filter(|r| route_oif(r) == Some(index) && route_table(r) == 254)
        {
            let gateway = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(ip.to_string()),
                RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => Some(ip.to_string()),
                _ => None,
            });
            let kernel = r.header.protocol == RouteProtocol::Kernel;
            if family == AddressFamily::Inet6 && kernel {
                continue;
            }
            let proto = if kernel { "kernel" } else { "static" };
            let scope = if r.header.scope == RouteScope::Link {
                "link"
            } else {
                "universe"
            };
            let (dest, gateway) = (describe_route(r), gateway.unwrap_or_default());
            all.push(format!("{dest} via {gateway} {scope} {proto}"));
        }
    }
    all.sort();
    all
}

/// The IPv4 neighbours of link `index`: (ip, MAC, permanent), sorted.
async fn neighbours(net: &Network, index: u32) -> Vec<(Ipv4Addr, Vec<u8>, bool)> {
    let request = net
        .handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet);
    let messages: Vec<_> = request.execute().try_collect().await.unwrap();
    let mut all = Vec::new();
    for m in messages.iter().filter(|m| m.header.ifindex == index) {
        let (mut ip, mut mac) = (None, None);
        for a in &m.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(*v4),
                NeighbourAttribute::LinkLayerAddress(lla) => mac = Some(lla.clone()),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            all.push((ip, mac, m.header.state == NeighbourState::Permanent));
        }
    }
    all.sort();
    all
}

#[test]
fn update_interface_renames_sets_mtu_and_replaces_addresses() {
    in_netns(
        "update_interface_renames_sets_mtu_and_replaces_addresses",
        |net| async move {
            let first = interface("eth0", &["10.0.0.2/24", "fd00::2/64"], 1400);
            let (name, index) = net.update_interface(&first).await.unwrap();
            assert_eq!(name, "eth0");
            assert_eq!(link_state(&net, index).await, ("eth0".into(), 1400, true));
            assert_eq!(addresses(&net, index).await, ["10.0.0.2/24", "fd00::2/64"]);

            // Again with another single address, no name and no MTU: the others go, name and MTU stay.
            let second = interface("", &["10.0.0.3/16"], 0);
            assert_eq!(
                net.update_interface(&second).await.unwrap(),
                ("eth0".into(), index)
            );
            assert_eq!(link_state(&net, index).await, ("eth0".into(), 1400, true));
            assert_eq!(addresses(&net, index).await, ["10.0.0.3/16"]);

            // Idempotent.
            let third = interface("eth0", &["10.0.0.3/16"], 1400);
            assert_eq!(
                net.update_interface(&third).await.unwrap(),
                ("eth0".into(), index)
            );
            assert_eq!(addresses(&net, index).await, ["10.0.0.3/16"]);
        },
    );
}

#[test]
fn update_interface_errors_change_nothing() {
    in_netns("update_interface_errors_change_nothing", |net| async move {
        let first = interface("", &["10.0.0.2/24"], 1500);
        let (_, index) = net.update_interface(&first).await.unwrap();
        assert_eq!(link_state(&net, index).await, ("veth0".into(), 1500, true));

        let unknown = Interface {
            hw_addr: "02:00:00:00:bb:01".into(),
            ..interface("eth0", &[], 0)
        };
        let result = net.update_interface(&unknown).await;
        assert_err(
            result,
            "NotFound",
            "interface.hw_addr: no interface has the MAC address",
        );
        let bad = interface("eth0", &["10.0.0.9/24", "10.0.0.300/24"], 1400);
        let result = net.update_interface(&bad).await;
        assert_err(result, "InvalidArgument", "interface.ip_addresses[1]: ");
        let result = net.update_interface(&interface("veth1", &[], 0)).await;
        assert_err(
            result,
            "InvalidArgument",
            "interface.name: \"veth1\" is the name of interface",
        );

        assert_eq!(link_state(&net, index).await, ("veth0".into(), 1500, true));
        assert_eq!(addresses(&net, index).await, ["10.0.0.2/24"]);
    });
}

#[test]
fn update_routes_replaces_non_kernel_routes() {
    in_netns(
        "update_routes_replaces_non_kernel_routes",
        |net| async move {
            let eth0 = interface("eth0", &["10.0.0.2/24", "fd00::2/64"], 0);
            let (_, index) = net.update_interface(&eth0).await.unwrap();
            let kernel = "10.0.0.0/24 via  link kernel";
            // The first route needs the second (169.254.1.1 is outside 10.0.0.0/24): link-scope ones go first.
            let first = [
                route("default", "169.254.1.1", "eth0"),
                route("169.254.1.1/32", "", "eth0"),
                with_source(route("192.168.0.0/16", "10.0.0.1", "eth0"), "10.0.0.2"),
                route("default", "fd00::1", "eth0"),
            ];
            net.update_routes(&first).await.unwrap();
            let want = [
                kernel,
                "169.254.1.1/32 via  link static",
                "192.168.0.0/16 via 10.0.0.1 universe static",
                "default via 169.254.1.1 universe static",
                "default via fd00::1 universe static",
            ];
            assert_eq!(routes(&net, index).await, want);

            // Replacing: the old routes of eth0 go, the kernel's stay.
            let second = [
                route("default", "10.0.0.1", "eth0"),
                route("172.16.0.0/12", "", "eth0"),
            ];
            net.update_routes(&second).await.unwrap();
            let want = [
                kernel,
                "172.16.0.0/12 via  link static",
                "default via 10.0.0.1 universe static",
            ];
            assert_eq!(routes(&net, index).await, want);

            // Errors change nothing: an unknown device, an invalid route after a valid one.
            let valid = route("10.1.0.0/16", "", "eth0");
            let result = net
                .update_routes(&[valid.clone(), route("10.2.0.0/16", "", "eth9")])
                .await;
            assert_err(
                result,
                "NotFound",
                "routes[1].device: no interface named \"eth9\"",
            );
            let result = net
                .update_routes(&[valid, route("10.2.0.0/16", "x", "eth0")])
                .await;
            assert_err(
                result,
                "InvalidArgument",
                "routes[1].gateway: \"x\" is not an IP address",
            );
            assert_eq!(routes(&net, index).await, want);

            // A kernel refusal (unreachable gateway) is a Netlink error naming the route.
            let result = net
                .update_routes(&[route("default", "192.0.2.1", "eth0")])
                .await;
            assert_err(
                result,
                "Netlink",
                "routes[0]: adding \"default\" dev eth0: ",
            );
            net.update_routes(&[]).await.unwrap();
        },
    );
}

#[test]
fn add_arp_neighbors_adds_permanent_entries() {
    in_netns(
        "add_arp_neighbors_adds_permanent_entries",
        |net| async move {
            let eth0 = interface("eth0", &["10.0.0.2/24"], 0);
            let (_, index) = net.update_interface(&eth0).await.unwrap();
            let first = [
                neighbor("10.0.0.1", "02:00:00:00:cc:01", "eth0"),
                neighbor("10.0.0.3", "02:00:00:00:cc:03", "eth0"),
            ];
            net.add_arp_neighbors(&first).await.unwrap();
            let ip = |last| Ipv4Addr::new(10, 0, 0, last);
            let entry = |last, mac: u8| (ip(last), vec![2, 0, 0, 0, mac, last], true);
            assert_eq!(
                neighbours(&net, index).await,
                [entry(1, 0xcc), entry(3, 0xcc)]
            );

            // Replacing an entry.
            let second = [neighbor("10.0.0.1", "02:00:00:00:dd:01", "eth0")];
            net.add_arp_neighbors(&second).await.unwrap();
            assert_eq!(
                neighbours(&net, index).await,
                [entry(1, 0xdd), entry(3, 0xcc)]
            );

            // Errors change nothing.
            let unknown = [
                neighbor("10.0.0.4", MAC, "eth0"),
                neighbor("10.0.0.5", MAC, "eth9"),
            ];
            let result = net.add_arp_neighbors(&unknown).await;
            assert_err(
                result,
                "NotFound",
                "neighbors[1].device: no interface named \"eth9\"",
            );
            let result = net
                .add_arp_neighbors(&[neighbor("fd00::1", MAC, "eth0")])
                .await;
            assert_err(result, "InvalidArgument", "neighbors[0].ip: ");
            assert_eq!(
                neighbours(&net, index).await,
                [entry(1, 0xdd), entry(3, 0xcc)]
            );
        },
    );
}

#[test]
fn loopback_comes_up_for_port_forwarding() {
    in_netns("loopback_comes_up_for_port_forwarding", |net| async move {
        let lo = net
            .links()
            .await
            .unwrap()
            .into_iter()
            .find(|l| l.name == "lo")
            .unwrap();
        assert!(
            !link_state(&net, lo.index).await.2,
            "a new namespace starts with lo down"
        );
        net.loopback_up().await.unwrap();
        assert!(link_state(&net, lo.index).await.2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
    });
}

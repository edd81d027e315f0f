//! Tests of network.rs: pure validation, then netlink tests, each in a fresh network namespace of its own
//! thread (never the host's network).

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use podvisor_proto::{ArpNeighbor, Interface, Route};

use super::*;

const MAC: &str = "02:00:00:00:aa:01";
const MAC_BYTES: [u8; 6] = [2, 0, 0, 0, 0xaa, 1];

fn route(dest: &str, gateway: &str, device: &str) -> Route {
    let (dest, gateway, device) = (dest.into(), gateway.into(), device.into());
    Route {
        dest,
        gateway,
        device,
        source: String::new(),
    }
}

fn with_source(route: Route, source: &str) -> Route {
    Route {
        source: source.into(),
        ..route
    }
}

fn neighbor(ip: &str, hw_addr: &str, device: &str) -> ArpNeighbor {
    let (ip, hw_addr, device) = (ip.into(), hw_addr.into(), device.into());
    ArpNeighbor {
        ip,
        hw_addr,
        device,
    }
}

fn interface(name: &str, addresses: &[&str], mtu: u32) -> Interface {
    let ip_addresses = addresses.iter().map(|a| a.to_string()).collect();
    Interface {
        hw_addr: MAC.into(),
        name: name.into(),
        ip_addresses,
        mtu,
    }
}

/// Asserts that `result` is the error `kind` ("InvalidArgument", "NotFound" or "Netlink") with a message
/// starting with `prefix`.
#[track_caller]
fn assert_err<T: Debug>(result: Result<T, NetworkError>, kind: &str, prefix: &str) {
    let e = match result {
        Ok(v) => panic!("expected {kind} {prefix:?}, got Ok({v:?})"),
        Err(e) => e,
    };
    let got = match &e {
        NetworkError::InvalidArgument(_) => "InvalidArgument",
        NetworkError::NotFound(_) => "NotFound",
        NetworkError::Netlink(_) => "Netlink",
    };
    assert_eq!(got, kind, "{e}");
    let message = e.to_string();
    assert!(
        message.starts_with(prefix),
        "{message:?} does not start with {prefix:?}"
    );
}

#[test]
fn parse_mac_accepts_colon_hex_only() {
    assert_eq!(parse_mac("02:00:00:00:AA:01"), Some(MAC_BYTES));
    assert_eq!(parse_mac(MAC), Some(MAC_BYTES));
    let bad = [
        "",
        "02:00:00:00:aa",
        "02:00:00:00:aa:01:02",
        "02-00-00-00-aa-01",
        "2:00:00:00:aa:01",
        "02:00:00:00:aa:0g",
        "+2:00:00:00:aa:01",
        "02:00:00:00:aa:01:",
    ];
    for bad in bad {
        assert_eq!(parse_mac(bad), None, "{bad:?}");
    }
}

#[test]
fn parse_cidr_requires_a_valid_prefix() {
    let v4 = Cidr {
        addr: Ipv4Addr::new(10, 88, 0, 5).into(),
        prefix: 16,
    };
    assert_eq!(parse_cidr("10.88.0.5/16"), Some(v4));
    assert_eq!(parse_cidr("fd00::5/64").map(|c| c.prefix), Some(64));
    let any6 = IpAddr::from(Ipv6Addr::UNSPECIFIED);
    assert_eq!(
        parse_cidr("::/0"),
        Some(Cidr {
            addr: any6,
            prefix: 0
        })
    );
    let bad = [
        "10.88.0.5",
        "10.88.0.5/",
        "10.88.0.5/33",
        "10.88.0.5/+16",
        "10.88.0.5/ 16",
        "10.88.0.5/0016",
        "fd00::/129",
        "10.88.0/16",
        "x/8",
    ];
    for bad in bad {
        assert_eq!(parse_cidr(bad), None, "{bad:?}");
    }
    let host_bits = |s: &str| parse_cidr(s).map(|c| c.has_host_bits());
    assert_eq!(host_bits("10.0.0.1/8"), Some(true));
    assert_eq!(host_bits("10.0.0.0/8"), Some(false));
    assert_eq!(host_bits("0.0.0.0/0"), Some(false));
    assert_eq!(host_bits("10.0.0.1/32"), Some(false));
    assert_eq!(host_bits("fd00::1/64"), Some(true));
    assert_eq!(host_bits("fd00::1/128"), Some(false));
}

#[test]
fn interface_names() {
    for good in ["eth0", "a", "veth.1-x_y", "abcdefghijklmno"] {
        assert_eq!(check_ifname(good), Ok(()), "{good:?}");
    }
    for bad in [
        "",
        "abcdefghijklmnop",
        "eth 0",
        "eth/0",
        "eth:0",
        ".",
        "..",
        "é",
    ] {
        assert!(check_ifname(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn validate_interface_names_the_field() {
    let plan = validate_interface(&interface("eth0", &["10.0.0.2/24", "fd00::2/64"], 1400));
    let plan = plan.map(|p| (p.mac, p.name, p.mtu, p.addresses.len()));
    assert_eq!(
        plan.ok(),
        Some((MAC_BYTES, Some("eth0".into()), Some(1400), 2))
    );
    let plan = validate_interface(&interface("", &[], 0)).map(|p| (p.name, p.mtu));
    assert_eq!(plan.ok(), Some((None, None)));

    let hw_addr = |hw_addr: &str| Interface {
        hw_addr: hw_addr.into(),
        ..interface("", &[], 0)
    };
    let cases = [
        (
            hw_addr("zz"),
            "interface.hw_addr: \"zz\" is not a MAC address",
        ),
        (
            hw_addr("00:00:00:00:00:00"),
            "interface.hw_addr: the all-zero",
        ),
        (
            interface("this-name-is-too-long", &[], 0),
            "interface.name: ",
        ),
        (
            interface("eth0", &[], 67),
            "interface.mtu: 67 is not in 68..=65535",
        ),
        (interface("eth0", &[], 65536), "interface.mtu: 65536"),
        (
            interface("eth0", &["10.0.0.2/24", "10.0.0.3"], 0),
            "interface.ip_addresses[1]: \"10.0.0.3\" is not an address in CIDR form",
        ),
    ];
    for (i, want) in cases {
        assert_err(validate_interface(&i), "InvalidArgument", want);
    }
}

#[test]
fn validate_route_cases() {
    let summary =
        |r: Route| validate_route(0, &r).map(|p| (p.dest.to_string(), p.gateway, p.source));
    let gateway: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
    let plan = summary(route("default", "10.0.0.1", "eth0"));
    assert_eq!(plan.ok(), Some(("0.0.0.0/0".into(), Some(gateway), None)));
    let plan = summary(route("default", "fd00::1", "eth0")).map(|p| p.0);
    assert_eq!(plan.ok().as_deref(), Some("::/0"));
    let plan = summary(route("default", "", "eth0"));
    assert_eq!(plan.ok(), Some(("0.0.0.0/0".into(), None, None)));
    let plan = summary(with_source(route("192.168.0.0/16", "", "eth0"), "10.0.0.2"));
    let source = Some(Ipv4Addr::new(10, 0, 0, 2).into());
    assert_eq!(plan.ok(), Some(("192.168.0.0/16".into(), None, source)));

    let cases = [
        (
            route("10.0.0.0/8", "x", "eth0"),
            "routes[1].gateway: \"x\" is not an IP address",
        ),
        (
            route("10.0.0.1/8", "", "eth0"),
            "routes[1].dest: \"10.0.0.1/8\" has bits set beyond its prefix length",
        ),
        (
            route("10.0.0.0", "", "eth0"),
            "routes[1].dest: \"10.0.0.0\" is neither \"default\" nor",
        ),
        (route("", "", "eth0"), "routes[1].dest: "),
        (
            route("10.0.0.0/8", "fd00::1", "eth0"),
            "routes[1].gateway: fd00::1 is IPv6 but dest \"10.0.0.0/8\" is IPv4",
        ),
        (
            with_source(route("10.0.0.0/8", "", "eth0"), "fd00::2"),
            "routes[1].source: fd00::2 is IPv6",
        ),
        (
            with_source(route("10.0.0.0/8", "", "eth0"), "no"),
            "routes[1].source: \"no\" is not an IP",
        ),
        (route("10.0.0.0/8", "", ""), "routes[1].device: must be set"),
        (route("10.0.0.0/8", "", "a/b"), "routes[1].device: "),
    ];
    for (r, want) in cases {
        assert_err(validate_route(1, &r), "InvalidArgument", want);
    }
}

#[test]
fn validate_neighbor_cases() {
    let plan = validate_neighbor(0, &neighbor("10.0.0.9", MAC, "eth0")).map(|p| (p.ip, p.mac));
    assert_eq!(plan.ok(), Some((Ipv4Addr::new(10, 0, 0, 9), MAC_BYTES)));
    let cases = [
        (
            neighbor("fd00::9", MAC, "eth0"),
            "neighbors[2].ip: \"fd00::9\" is not an IPv4 address",
        ),
        (
            neighbor("10.0.0.9", "02:00", "eth0"),
            "neighbors[2].hw_addr: \"02:00\" is not a MAC",
        ),
        (
            neighbor("10.0.0.9", MAC, ""),
            "neighbors[2].device: must be set",
        ),
    ];
    for (n, want) in cases {
        assert_err(validate_neighbor(2, &n), "InvalidArgument", want);
    }
}

mod netlink;

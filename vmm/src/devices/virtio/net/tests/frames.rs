//! Hand-built Ethernet frames of the fake guest and parsers for what the host kernel answers.

use super::VNET_HDR_LEN;

pub const GUEST_MAC: [u8; 6] = [0x02, 0x50, 0x56, 0x00, 0x00, 0x02];
pub const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
pub const HOST_IP: [u8; 4] = [10, 77, 0, 1];
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

/// A parsed virtio-net header (`virtio_net_hdr_v1`, little-endian).
#[derive(Debug)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

/// Splits what the device wrote into its virtio-net header and the Ethernet frame.
pub fn split_frame(bytes: &[u8]) -> (VnetHdr, &[u8]) {
    assert!(bytes.len() >= VNET_HDR_LEN, "{} bytes", bytes.len());
    let le = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let hdr = VnetHdr {
        flags: bytes[0],
        gso_type: bytes[1],
        csum_start: le(6),
        csum_offset: le(8),
        num_buffers: le(10),
    };
    (hdr, &bytes[VNET_HDR_LEN..])
}

pub fn ether_type(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

pub fn ip_str(ip: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(ip).to_string()
}

pub fn mac_str(mac: [u8; 6]) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

fn ethernet(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// "Who has HOST_IP? Tell GUEST_IP", broadcast.
pub fn arp_request() -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&HOST_IP);
    ethernet([0xff; 6], ETH_P_ARP, &arp)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request from GUEST_IP to HOST_IP, sent to `dst` (the tap's MAC).
pub fn icmp_echo(dst: [u8; 6], id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]); // id 1, DF, TTL 64, ICMP
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ethernet(dst, ETH_P_IP, &ip)
}

/// Checks an ICMP echo reply from HOST_IP to GUEST_IP with valid checksums.
pub fn assert_echo_reply(frame: &[u8], id: u16, seq: u16, payload: &[u8]) {
    assert_eq!(&frame[0..6], &GUEST_MAC, "Ethernet destination");
    assert_eq!(ether_type(frame), ETH_P_IP);
    let ip = &frame[14..];
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(&ip[12..16], &HOST_IP, "source");
    assert_eq!(&ip[16..20], &GUEST_IP, "destination");
    assert_eq!(checksum(&ip[..20]), 0, "IP header checksum");
    let icmp = &ip[20..usize::from(u16::from_be_bytes([ip[2], ip[3]]))];
    assert_eq!((icmp[0], icmp[1]), (0, 0), "echo reply");
    assert_eq!(checksum(icmp), 0, "ICMP checksum");
    assert_eq!(&icmp[4..6], &id.to_be_bytes());
    assert_eq!(&icmp[6..8], &seq.to_be_bytes());
    assert_eq!(&icmp[8..], payload);
}

/// Whether the UDP checksum of an IPv4/UDP frame is complete and correct.
pub fn udp_checksum_ok(frame: &[u8]) -> bool {
    let ip = &frame[14..];
    let udp = &ip[20..usize::from(u16::from_be_bytes([ip[2], ip[3]]))];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(udp);
    udp[6..8] != [0, 0] && checksum(&pseudo) == 0
}

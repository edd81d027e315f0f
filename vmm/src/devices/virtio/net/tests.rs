//! The device against guest memory and a real tap in a throwaway network namespace, where the host
//! kernel answers the frames the "guest" sends (ARP, ICMP echo) and sends UDP to it.

mod frames;
mod harness;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
};
use vmm_sys_util::eventfd::EventFd;

use self::frames::*;
use self::harness::*;
use super::*;
use crate::devices::virtio::{
    Interrupt, VirtioDevice, INT_USED_RING, TYPE_NET, VIRTIO_F_VERSION_1,
};

#[test]
fn tap_names_are_validated_before_anything_is_opened() {
    for name in [
        "",
        "0123456789abcdef",
        "a/b",
        "a b",
        "a\tb",
        "a:b",
        "a\0b",
        ".",
        "..",
        "t%d",
    ] {
        let err = Tap::open(name).unwrap_err();
        assert!(
            matches!(err, TapError::InvalidName { .. }),
            "{name:?}: {err}"
        );
        assert!(err.to_string().contains("`name`"), "{err}");
    }
}

#[test]
fn tap_lives_in_its_namespace_and_disappears_when_closed() {
    let Some(ns) = netns("tap_lives_in_its_namespace_and_disappears_when_closed") else {
        return;
    };
    let tap = ns.run(|| Tap::open(TAP_NAME)).unwrap();
    assert_eq!(tap.name(), TAP_NAME);
    assert!(format!("{tap:?}").contains(TAP_NAME));
    ns.ip(&format!("link show {TAP_NAME}"));
    let in_host = Command::new("ip").args(["link", "show", TAP_NAME]).output();
    assert!(
        !in_host.unwrap().status.success(),
        "tap leaked into the host namespace"
    );
    // IFF_TUN_EXCL: no second open of a live interface.
    let again = ns.run(|| Tap::open(TAP_NAME)).unwrap_err();
    assert!(
        matches!(
            again,
            TapError::Ioctl {
                what: "TUNSETIFF",
                ..
            }
        ),
        "{again}"
    );
    // The descriptor keeps working from this thread (outside the namespace).
    tap.set_offload(libc::TUN_F_CSUM).unwrap();
    drop(tap);
    let gone = Command::new("ip")
        .args(["-n", ns.name(), "link", "show", TAP_NAME])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "non-persistent tap outlived its fd");
}

#[test]
fn config_space_and_offered_features() {
    let Some(ns) = netns("config_space_and_offered_features") else {
        return;
    };
    let tap = Arc::new(ns.run(|| Tap::open(TAP_NAME)).unwrap());
    let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    let dev = NetDevice::new(tap, GUEST_MAC, 9000, irq).unwrap();
    assert_eq!(dev.device_type(), TYPE_NET);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let features = dev.avail_features();
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature {bit}");
    }
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    for bit in [VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ] {
        assert_eq!(features & (1 << bit), 0, "feature {bit}");
    }
    let mut config = [0xffu8; 16];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..6], &GUEST_MAC);
    assert_eq!(
        u16::from_le_bytes([config[6], config[7]]),
        1,
        "status: link up"
    );
    assert_eq!(
        u16::from_le_bytes([config[8], config[9]]),
        1,
        "max_virtqueue_pairs"
    );
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 9000, "mtu");
    let mut mtu = [0u8; 2];
    dev.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    let mut past_end = [0xffu8; 4];
    dev.read_config(64, &mut past_end);
    assert_eq!(past_end, [0; 4]);
}

#[test]
fn arp_and_ping_round_trip_through_the_host_kernel() {
    let Some(ns) = netns("arp_and_ping_round_trip_through_the_host_kernel") else {
        return;
    };
    let (tap, tap_mac) = host_tap(&ns);
    let mem = mem();
    let mut h = Harness::new(&mem, tap, BASIC);
    h.add_rx_buffers(8, 2048);
    h.dev.process_queue(0);

    h.send(&arp_request());
    assert_eq!(h.tx_used(), [(0, 0)], "tx chains come back with length 0");
    let (hdr, reply) = h.recv(ETH_P_ARP);
    assert_eq!((hdr.flags, hdr.gso_type, hdr.num_buffers), (0, 0, 1));
    assert_eq!(&reply[0..6], &GUEST_MAC, "Ethernet destination");
    assert_eq!(&reply[6..12], &tap_mac, "Ethernet source");
    assert_eq!(&reply[20..22], &[0, 2], "ARP reply");
    assert_eq!(&reply[22..28], &tap_mac, "sender MAC");
    assert_eq!(&reply[28..32], &HOST_IP, "sender IP");
    assert_eq!(&reply[32..38], &GUEST_MAC, "target MAC");
    assert_eq!(&reply[38..42], &GUEST_IP, "target IP");
    assert_ne!(h.irq.status() & INT_USED_RING, 0);

    let payload: Vec<u8> = (0..56).collect();
    h.send(&icmp_echo(tap_mac, 0x4242, 7, &payload));
    let (hdr, reply) = h.recv(ETH_P_IP);
    assert_eq!(hdr.num_buffers, 1);
    assert_echo_reply(&reply, 0x4242, 7, &payload);

    let stats = h.dev.stats();
    assert_eq!(
        (stats.tx_packets, stats.tx_dropped, stats.bad_chains),
        (2, 0, 0)
    );
    assert_eq!(stats.tx_bytes, 42 + 14 + 20 + 8 + 56);
    assert!(stats.rx_packets >= 2, "{stats:?}");
    assert!(stats.rx_bytes >= 42 + 98, "{stats:?}");
}

#[test]
fn mergeable_buffers_carry_one_frame_across_several_chains() {
    let Some(ns) = netns("mergeable_buffers_carry_one_frame_across_several_chains") else {
        return;
    };
    let (tap, tap_mac) = host_tap(&ns);
    let mem = mem();
    let mut h = Harness::new(&mem, tap, BASIC | (1 << VIRTIO_NET_F_MRG_RXBUF));
    h.add_rx_buffers(8, 64);
    let payload = [0x5a; 100];
    h.send(&icmp_echo(tap_mac, 1, 1, &payload));
    // 12 + 14 + 20 + 8 + 100 = 154 bytes: 64 + 64 + 26.
    let used = h.wait_rx(3);
    assert_eq!(used, [(0, 64), (1, 64), (2, 26)]);
    let bytes: Vec<u8> = used.iter().flat_map(|e| h.rx_bytes(*e)).collect();
    let (hdr, frame) = split_frame(&bytes);
    assert_eq!(hdr.num_buffers, 3);
    assert_echo_reply(frame, 1, 1, &payload);
    assert_eq!(h.dev.stats().rx_packets, 1);
    assert_eq!(h.dev.stats().rx_bytes, 154 - VNET_HDR_LEN as u64);
}

#[test]
fn without_rx_buffers_the_frame_waits_and_nothing_spins() {
    let Some(ns) = netns("without_rx_buffers_the_frame_waits_and_nothing_spins") else {
        return;
    };
    let (tap, _) = host_tap(&ns);
    let mem = mem();
    let mut h = Harness::new(&mem, tap, BASIC);
    // Two replies: one waits in the device, the other stays queued in the (readable) tap.
    h.send(&arp_request());
    h.send(&arp_request());
    assert!(
        h.extra_readable(5000),
        "the ARP replies never reached the tap"
    );
    h.dev.process_extra();
    assert!(Harness::used(&h.rxq, 0).is_empty());
    // The tap is out of the epoll set although it has a frame: the worker sleeps instead of spinning.
    assert!(
        !h.extra_readable(300),
        "extra fd still readable: the worker would spin"
    );
    h.dev.process_extra();
    assert!(Harness::used(&h.rxq, 0).is_empty());

    // New buffers (and the rx notification) deliver both, in order.
    h.add_rx_buffers(4, 2048);
    h.dev.process_queue(0);
    let used = h.wait_rx(2);
    assert_eq!(used.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1]);
    for entry in used {
        let bytes = h.rx_bytes(entry);
        let (_, reply) = split_frame(&bytes);
        assert_eq!(&reply[20..22], &[0, 2], "ARP reply");
    }
    // The tap is watched again: the next reply wakes the worker.
    h.send(&arp_request());
    let (_, reply) = h.recv(ETH_P_ARP);
    assert_eq!(&reply[38..42], &GUEST_IP);
    assert_eq!(h.dev.stats().rx_dropped, 0);
    assert_eq!(h.dev.stats().rx_packets, 3);
}

#[test]
fn malformed_chains_come_back_empty_and_are_counted() {
    let Some(ns) = netns("malformed_chains_come_back_empty_and_are_counted") else {
        return;
    };
    let (tap, _) = host_tap(&ns);
    let mem = mem();
    let mut h = Harness::new(&mem, tap, BASIC);
    let frame_len = (VNET_HDR_LEN + 42) as u32;
    h.add_chain(false, &[(TX_BUF, frame_len, WRITE)]); // device-writable
    h.add_chain(false, &[(1 << 40, frame_len, 0)]); // outside guest memory
    h.add_chain(false, &[(u64::MAX - 8, frame_len, 0)]); // address overflow
    h.add_chain(false, &[(TX_BUF, 20, 0)]); // shorter than the headers
    h.add_chain(false, &[(TX_BUF, 40_000, 0), (TX_BUF, 40_000, 0)]); // over 65562 bytes
    h.add_chain(false, &[(TX_BUF, 12, 0), (TX_BUF, 42, WRITE)]); // readable then writable
    h.dev.process_queue(1);
    let used = h.tx_used();
    assert_eq!(used.len(), 6);
    assert!(used.iter().all(|(_, len)| *len == 0), "{used:?}");
    let stats = h.dev.stats();
    assert_eq!((stats.bad_chains, stats.tx_packets), (6, 0));

    // rx: a readable buffer, one outside memory, one too short for the header, then a good one.
    h.add_chain(true, &[(RX_BUFS, 2048, 0)]);
    h.add_chain(true, &[(1 << 40, 2048, WRITE)]);
    h.add_chain(true, &[(RX_BUFS + 0x2_0000, 8, WRITE)]);
    h.add_rx_buffers(1, 2048);
    h.send(&arp_request());
    let used = h.wait_rx(4);
    assert_eq!(&used[..3], [(0, 0), (1, 0), (2, 0)]);
    assert_eq!(used[3].0, 3);
    assert!(used[3].1 >= frame_len, "{used:?}");
    assert_eq!(h.dev.stats().bad_chains, 9);

    // A lone buffer too small for the frame (no mergeable buffers): the frame is dropped, the buffer
    // kept for the next one.
    h.add_rx_buffers(1, 20);
    h.send(&arp_request());
    let deadline = Instant::now() + WAIT;
    while h.dev.stats().rx_dropped == 0 && Instant::now() < deadline {
        if h.extra_readable(100) {
            h.dev.process_extra();
        }
    }
    assert_eq!(h.dev.stats().rx_dropped, 1);
    assert!(Harness::used(&h.rxq, h.rx_seen).is_empty());
}

#[test]
fn acked_offloads_reach_the_tap_and_reset_clears_them() {
    let Some(ns) = netns("acked_offloads_reach_the_tap_and_reset_clears_them") else {
        return;
    };
    let (tap, _) = host_tap(&ns);
    let mem = mem();
    let csum = BASIC | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4);
    let mut h = Harness::new(&mem, tap, csum);
    assert_eq!(h.dev.tap_offloads(), libc::TUN_F_CSUM | libc::TUN_F_TSO4);
    h.add_rx_buffers(4, 2048);
    let send_udp = |ns: &TestNetns| {
        ns.run(|| {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let to = (std::net::Ipv4Addr::from(GUEST_IP), 9999);
            socket.send_to(b"offload", to).unwrap();
        })
    };
    // With GUEST_CSUM the host leaves the UDP checksum to the "guest".
    send_udp(&ns);
    let (hdr, frame) = h.recv(ETH_P_IP);
    assert_ne!(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, "{hdr:?}");
    assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 6));
    assert_eq!(frame[23], 17, "UDP");

    // Reset: back to the pre-activation state (no queues, tap unwatched, no offloads).
    h.dev.reset();
    assert_eq!(h.dev.acked_features(), 0);
    send_udp(&ns);
    assert!(!h.extra_readable(300), "a reset device watches the tap");
    h.dev.process_extra();

    // Reactivated without offloads: queued frames are delivered, new ones carry a full checksum.
    h.activate(BASIC);
    assert_eq!(h.dev.tap_offloads(), 0);
    h.add_rx_buffers(4, 2048);
    h.dev.process_queue(0);
    let _queued = h.recv(ETH_P_IP);
    send_udp(&ns);
    let (hdr, frame) = h.recv(ETH_P_IP);
    assert_eq!(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, "{hdr:?}");
    assert!(udp_checksum_ok(&frame), "software checksum expected");
}

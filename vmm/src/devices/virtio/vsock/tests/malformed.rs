//! Malformed descriptor chains: consumed, dropped, and no harm done.

use std::io::Write;

use super::*;

const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
/// Far outside the 64 MiB of guest memory.
const OUTSIDE: u64 = 0x1_0000_0000;

/// Writes a plausible packet header (RW to an unknown connection, which would be answered with
/// RST if the device accepted it) with `len` at `addr`.
fn plant_header(g: &Guest, addr: u64, len: u32) {
    let hdr = Header {
        len,
        ..guest_pkt(OP_RW, 5000, 99)
    };
    g.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(addr))
        .unwrap();
}

#[test]
fn malformed_tx_chains_are_consumed_and_dropped() {
    let mut g = Guest::new();
    g.give_rx(8);
    let hdr_len = HEADER_SIZE as u32;
    let (a, b) = (g.tx_slot(200), g.tx_slot(201));
    type Chain = Vec<RawDesc>;
    let cases: Vec<(&str, u32, Chain)> = vec![
        ("header descriptor too short", 0, vec![(200, a, 20, 0, 0)]),
        (
            "header outside guest memory",
            0,
            vec![(200, OUTSIDE, hdr_len, 0, 0)],
        ),
        (
            "header across the end of memory",
            0,
            vec![(200, MEM_SIZE as u64 - 10, hdr_len, 0, 0)],
        ),
        ("descriptor loop", 100, vec![(200, a, hdr_len, N, 200)]),
        (
            "two-descriptor loop",
            100,
            vec![(200, a, hdr_len, N, 201), (201, b, 10, N, 200)],
        ),
        (
            "len larger than the data buffer",
            1000,
            vec![(200, a, hdr_len, N, 201), (201, b, 100, 0, 0)],
        ),
        (
            "len above the packet limit",
            70_000,
            vec![(200, a, hdr_len, N, 201), (201, b, 70_000, 0, 0)],
        ),
        (
            "data outside guest memory",
            100,
            vec![(200, a, hdr_len, N, 201), (201, OUTSIDE, 100, 0, 0)],
        ),
        ("data missing", 100, vec![(200, a, hdr_len, 0, 0)]),
        (
            "next index past the queue",
            100,
            vec![(200, a, hdr_len, N, 300)],
        ),
        ("write-only header", 0, vec![(200, a, hdr_len, W, 0)]),
        (
            "write-only data",
            100,
            vec![(200, a, hdr_len, N, 201), (201, b, 100, W, 0)],
        ),
    ];
    for (i, (name, len, chain)) in cases.iter().enumerate() {
        plant_header(&g, a, *len);
        g.send_raw(chain);
        assert_eq!(g.tx_used(), vec![(200, 0)], "{name}");
        assert_eq!(g.dev.dropped_chains(), i as u64 + 1, "{name}");
        assert!(g.recv().is_empty(), "{name}: nothing may reach the muxer");
    }
    // A head index past the queue size: consumed without a used entry (there is no such buffer).
    g.send_raw(&[(300, a, hdr_len, 0, 0)]);
    assert!(g.tx_used().is_empty());
    assert!(g.recv().is_empty());
    // The device still works.
    g.send(guest_pkt(OP_RW, 5000, 99), b"x");
    assert_eq!(g.recv_one().hdr.op, OP_RST);
}

#[test]
fn malformed_rx_chains_are_consumed_and_dropped() {
    let mut g = Guest::new();
    let (mut c, _) = g.host_connect(1024);
    c.write_all(b"abc").unwrap();
    g.poll();
    let hdr_len = HEADER_SIZE as u32;
    let slot = |i: u64| RX_BUFS + i * SLOT;
    let chains: Vec<Vec<RawDesc>> = vec![
        vec![(100, slot(100), hdr_len, 0, 0)], // read-only
        vec![(100, slot(100), 20, W, 0)],      // header too short
        vec![
            (100, OUTSIDE, hdr_len, W | N, 101),
            (101, slot(101), 4096, W, 0),
        ], // header outside memory
        vec![
            (100, slot(100), hdr_len, W | N, 101),
            (101, OUTSIDE, 4096, W, 0),
        ], // data outside memory
        vec![
            (100, slot(100), hdr_len, W | N, 101),
            (101, slot(101), 4096, 0, 0),
        ], // read-only data
        vec![(100, slot(100), hdr_len, W, 0)], // header only
    ];
    for (i, chain) in chains.iter().enumerate() {
        g.give_rx_raw(chain);
        assert!(g.recv().is_empty(), "chain {i}");
        assert_eq!(g.empty_rx, i + 1, "chain {i} is returned empty");
        assert_eq!(g.dev.dropped_chains(), i as u64 + 1);
    }
    g.give_rx(1);
    let p = g.recv_one();
    assert_eq!((p.hdr.op, p.data.as_slice()), (OP_RW, &b"abc"[..]));
}

#[test]
fn rx_buffer_without_data_room_carries_control_packets_only() {
    let mut g = Guest::new();
    let mut c = client(&g.uds);
    c.write_all(b"CONNECT 1024\n").unwrap();
    g.poll();
    // A zero-length data descriptor: fine for a header-only packet.
    let hdr_only = [
        (100, RX_BUFS + 100 * SLOT, HEADER_SIZE as u32, W | N, 101),
        (101, RX_BUFS + 101 * SLOT, 0, W, 0),
    ];
    g.give_rx_raw(&hdr_only);
    let req = g.recv_one();
    assert_eq!(req.hdr.op, OP_REQUEST);
    g.send(guest_pkt(OP_RESPONSE, 1024, req.hdr.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}", req.hdr.src_port));
    assert_eq!(g.dev.dropped_chains(), 0);
    // Data cannot go there: the buffer is returned empty and the data waits for the next one.
    c.write_all(b"abc").unwrap();
    g.give_rx_raw(&hdr_only);
    assert!(g.recv().is_empty());
    assert_eq!((g.empty_rx, g.dev.dropped_chains()), (1, 1));
    g.give_rx(1);
    assert_eq!(g.recv_one().data, b"abc");
}

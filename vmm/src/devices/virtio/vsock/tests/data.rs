//! Data in both directions, credit accounting, flow control, and closing.

use std::io::Write;
use std::os::unix::net::UnixListener;

use super::*;
use crate::devices::virtio::vsock::connection::BUF_ALLOC;

fn rw(guest_port: u32, local: u32) -> Header {
    guest_pkt(OP_RW, guest_port, local)
}

fn ops(pkts: &[Packet]) -> Vec<u16> {
    pkts.iter().map(|p| p.hdr.op).collect()
}

#[test]
fn data_flows_both_ways() {
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    c.write_all(b"ping").unwrap();
    g.give_rx(1);
    let p = g.recv_one();
    assert_eq!(
        (p.hdr.op, p.hdr.src_port, p.hdr.dst_port),
        (OP_RW, local, 1024)
    );
    assert_eq!((p.hdr.buf_alloc, p.hdr.type_), (BUF_ALLOC, TYPE_STREAM));
    assert_eq!(p.data, b"ping");

    g.send(rw(1024, local), b"pong");
    assert_eq!(read_n(&mut c, 4), b"pong");
    // fwd_cnt counts guest data delivered to the client (not the OK line).
    c.write_all(b"x").unwrap();
    g.give_rx(1);
    assert_eq!(g.recv_one().hdr.fwd_cnt, 4);
}

#[test]
fn single_descriptor_rx_buffers() {
    let mut g = Guest::new();
    let (mut c, _) = g.host_connect(1024);
    let data: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
    c.write_all(&data).unwrap();
    g.give_rx_single(2);
    let pkts = g.recv();
    assert_eq!(
        pkts.iter().map(|p| p.data.len()).collect::<Vec<_>>(),
        [RX_DATA as usize, 6000 - RX_DATA as usize]
    );
    assert_eq!(pkts.concat_data(), data);
}

trait ConcatData {
    fn concat_data(&self) -> Vec<u8>;
}

impl ConcatData for Vec<Packet> {
    fn concat_data(&self) -> Vec<u8> {
        self.iter()
            .filter(|p| p.hdr.op == OP_RW)
            .flat_map(|p| p.data.clone())
            .collect()
    }
}

#[test]
fn host_to_guest_stops_without_credit_and_resumes_on_update() {
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    // The guest shrinks its receive buffer to 8 bytes.
    let update = |fwd_cnt| Header {
        buf_alloc: 8,
        fwd_cnt,
        ..guest_pkt(OP_CREDIT_UPDATE, 1024, local)
    };
    g.send(update(0), &[]);
    let data: Vec<u8> = (0..20u8).collect();
    c.write_all(&data).unwrap();
    g.give_rx(8);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [OP_RW, OP_CREDIT_REQUEST]);
    assert_eq!(pkts[0].data, &data[..8]);
    g.poll();
    assert!(g.recv().is_empty(), "no credit, no data");
    assert!(
        !extra_ready(&g.dev, 0),
        "the stream is not watched while the guest has no credit"
    );

    g.send(update(8), &[]);
    let pkts = g.recv();
    assert_eq!(pkts.concat_data(), &data[8..16]);
    g.send(update(16), &[]);
    let pkts = g.recv();
    assert_eq!(pkts.concat_data(), &data[16..]);
    assert_eq!(pkts[0].hdr.len, 4);
}

#[test]
fn no_rx_buffers_pauses_reading() {
    let mut g = Guest::new();
    let (mut c, _) = g.host_connect(1024);
    c.write_all(&[7u8; 10_000]).unwrap();
    g.poll();
    assert!(g.recv().is_empty());
    assert!(
        !extra_ready(&g.dev, 0),
        "epoll goes quiet while the guest has no rx buffers"
    );
    g.give_rx(1);
    assert_eq!(g.recv_one().data.len(), RX_DATA as usize);
    g.give_rx(8);
    let pkts = g.recv();
    assert_eq!(pkts.concat_data().len(), 10_000 - RX_DATA as usize);
    assert!(pkts.concat_data().iter().all(|b| *b == 7));
}

#[test]
fn guest_data_is_buffered_for_a_slow_client_and_credit_is_returned() {
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
    // All of our credit, while the client reads nothing: more than a unix socket buffers.
    for _ in 0..4 {
        g.send(rw(1024, local), &chunk);
    }
    assert_eq!(g.dev.connection_count(), 1);
    let got = read_polling(&mut g, &mut c, 4 * chunk.len());
    assert_eq!(got, chunk.repeat(4));
    g.give_rx(4);
    let pkts = g.recv();
    let last = pkts
        .iter()
        .rev()
        .find(|p| p.hdr.op == OP_CREDIT_UPDATE)
        .expect("a credit update");
    assert_eq!(last.hdr.fwd_cnt, 4 * chunk.len() as u32);
    assert!(
        pkts.iter().all(|p| p.hdr.op == OP_CREDIT_UPDATE),
        "{:?}",
        ops(&pkts)
    );
    // The guest has its full credit again.
    g.send(rw(1024, local), &chunk);
    assert_eq!(read_polling(&mut g, &mut c, chunk.len()), chunk);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    let chunk = vec![1u8; 64 * 1024];
    for _ in 0..4 {
        g.send(rw(1024, local), &chunk);
    }
    g.send(rw(1024, local), b"!");
    assert_eq!(g.dev.connection_count(), 0);
    g.give_rx(2);
    assert_eq!(ops(&g.recv()), [OP_RST]);
    let got = drain_until_closed(&mut g, &mut c);
    assert!(got.len() <= 4 * chunk.len());
}

#[test]
fn credit_request_is_answered() {
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    g.send(rw(1024, local), b"0123456789");
    assert_eq!(read_n(&mut c, 10), b"0123456789");
    g.give_rx(1);
    g.send(guest_pkt(OP_CREDIT_REQUEST, 1024, local), &[]);
    let p = g.recv_one();
    assert_eq!(
        (p.hdr.op, p.hdr.buf_alloc, p.hdr.fwd_cnt),
        (OP_CREDIT_UPDATE, BUF_ALLOC, 10)
    );
}

#[test]
fn many_small_frames_both_ways() {
    // The shape of HTTP/2 on a long-lived connection: small frames in both directions, with
    // the guest returning credit as it consumes.
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    g.give_rx(32);
    let (mut to_guest, mut at_guest) = (Vec::new(), Vec::new());
    let (mut to_host, mut at_host) = (Vec::new(), Vec::new());
    for i in 0..400usize {
        let frame = format!("h2c-frame-{i:04}-{}", "x".repeat(i % 37)).into_bytes();
        c.write_all(&frame).unwrap();
        to_guest.extend_from_slice(&frame);
        g.poll();
        let pkts = g.recv();
        for p in &pkts {
            assert_eq!(p.hdr.op, OP_RW, "{p:?}");
            assert_eq!(
                p.hdr.fwd_cnt,
                to_host.len() as u32,
                "fwd_cnt counts what the client got"
            );
            at_guest.extend_from_slice(&p.data);
        }
        g.give_rx(pkts.len());

        let reply = format!("guest-frame-{i:04}-{}", "y".repeat(i % 23)).into_bytes();
        let hdr = Header {
            fwd_cnt: at_guest.len() as u32,
            ..rw(1024, local)
        };
        g.send(hdr, &reply);
        to_host.extend_from_slice(&reply);
        at_host.extend_from_slice(&read_n(&mut c, reply.len()));
    }
    assert_eq!(at_guest, to_guest);
    assert_eq!(at_host, to_host);
    assert_eq!(g.dev.connection_count(), 1);
}

#[test]
fn unix_eof_sends_shutdown_then_waits_for_the_guest_rst() {
    let mut g = Guest::new();
    let (c, local) = g.host_connect(1024);
    drop(c);
    g.give_rx(2);
    let p = g.recv_one();
    assert_eq!(
        (p.hdr.op, p.hdr.flags, p.hdr.dst_port),
        (OP_SHUTDOWN, SHUTDOWN_BOTH, 1024)
    );
    assert_eq!(g.dev.connection_count(), 1, "waiting for the guest's RST");
    g.send(guest_pkt(OP_RST, 1024, local), &[]);
    assert_eq!(g.dev.connection_count(), 0);
    assert!(g.recv().is_empty());
}

#[test]
fn unix_eof_after_data_keeps_the_order() {
    let mut g = Guest::new();
    let (mut c, _) = g.host_connect(1024);
    c.write_all(b"last words").unwrap();
    drop(c);
    g.give_rx(4);
    let pkts = g.recv();
    assert_eq!(ops(&pkts), [OP_RW, OP_SHUTDOWN]);
    assert_eq!(pkts[0].data, b"last words");
}

#[test]
fn unix_eof_without_a_guest_rst_times_out() {
    let mut g = Guest::new();
    let (c, local) = g.host_connect(1024);
    g.dev.set_timeout(Duration::from_millis(30));
    drop(c);
    g.give_rx(2);
    assert_eq!(g.recv_one().hdr.op, OP_SHUTDOWN);
    run_until(&mut g, |g| g.dev.connection_count() == 0);
    let rst = g.recv_one();
    assert_eq!((rst.hdr.op, rst.hdr.src_port), (OP_RST, local));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn guest_rst_closes_the_stream() {
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    g.send(guest_pkt(OP_RST, 1024, local), &[]);
    assert!(is_closed(&mut c));
    assert_eq!(g.dev.connection_count(), 0);
    g.give_rx(1);
    assert!(g.recv().is_empty());
}

#[test]
fn guest_shutdown_closes_the_stream_and_resets() {
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    g.give_rx(1);
    g.send(rw(1024, local), b"bye");
    g.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..guest_pkt(OP_SHUTDOWN, 1024, local)
        },
        &[],
    );
    assert_eq!(read_n(&mut c, 3), b"bye");
    assert!(is_closed(&mut c));
    assert_eq!(ops(&g.recv()), [OP_RST]);
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn guest_shutdown_waits_for_buffered_data_to_be_written() {
    let mut g = Guest::new();
    let (mut c, local) = g.host_connect(1024);
    let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 241) as u8).collect();
    for _ in 0..4 {
        g.send(rw(1024, local), &chunk);
    }
    g.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..guest_pkt(OP_SHUTDOWN, 1024, local)
        },
        &[],
    );
    assert_eq!(g.dev.connection_count(), 1, "still flushing");
    let got = drain_until_closed(&mut g, &mut c);
    assert_eq!(got, chunk.repeat(4));
    assert_eq!(g.dev.connection_count(), 0);
    g.give_rx(4);
    assert_eq!(g.recv().last().map(|p| p.hdr.op), Some(OP_RST));
}

#[test]
fn guest_half_close_shuts_the_unix_write_side() {
    let mut g = Guest::new();
    let (_l, mut s) = g.guest_connect(5000, 52);
    g.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..guest_pkt(OP_SHUTDOWN, 5000, 52)
        },
        &[],
    );
    assert!(is_closed(&mut s), "the unix side reads EOF");
    s.write_all(b"late reply").unwrap();
    g.give_rx(1);
    let p = g.recv_one();
    assert_eq!((p.hdr.op, p.data.as_slice()), (OP_RW, &b"late reply"[..]));
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut g = Guest::new();
    g.give_rx(8);
    for op in [
        OP_RW,
        OP_RESPONSE,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
        OP_SHUTDOWN,
        42,
    ] {
        g.send(guest_pkt(op, 5000, 99), b"");
        let rst = g.recv_one();
        assert_eq!(
            (rst.hdr.op, rst.hdr.src_port, rst.hdr.dst_port),
            (OP_RST, 99, 5000),
            "op {op}"
        );
    }
    g.send(guest_pkt(OP_RST, 5000, 99), &[]);
    assert!(g.recv().is_empty(), "RST is not answered");
}

#[test]
fn wrong_cids_and_socket_types() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(peer_socket_path(&g.uds, 52)).unwrap();
    listener.set_nonblocking(true).unwrap();
    g.give_rx(8);

    g.send(
        Header {
            src_cid: 7,
            ..guest_pkt(OP_REQUEST, 5000, 52)
        },
        &[],
    );
    assert!(g.recv().is_empty(), "spoofed source CID: dropped");

    g.send(
        Header {
            dst_cid: 9,
            ..guest_pkt(OP_REQUEST, 5000, 52)
        },
        &[],
    );
    let rst = g.recv_one();
    assert_eq!(
        (rst.hdr.op, rst.hdr.src_cid, rst.hdr.dst_cid),
        (OP_RST, 9, GUEST_CID)
    );

    g.send(
        Header {
            type_: 2,
            ..guest_pkt(OP_REQUEST, 5000, 52)
        },
        &[],
    );
    let rst = g.recv_one();
    assert_eq!((rst.hdr.op, rst.hdr.type_), (OP_RST, 2));

    g.send(
        Header {
            type_: 2,
            ..guest_pkt(OP_RST, 5000, 52)
        },
        &[],
    );
    assert!(g.recv().is_empty());
    assert!(listener.accept().is_err(), "no connection was attempted");
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn tx_stalls_while_answers_cannot_be_delivered() {
    let mut g = Guest::new();
    // Each packet to an unknown connection needs an RST, but there are no rx buffers.
    for port in 0..300 {
        g.send(guest_pkt(OP_RW, 10_000 + port, 99), b"?");
    }
    let consumed = g.tx_used().len();
    assert_eq!(
        consumed, 256,
        "tx stops once the control queue is half full"
    );
    let mut rsts = Vec::new();
    for _ in 0..10 {
        g.give_rx(100);
        rsts.extend(g.recv().into_iter().map(|p| (p.hdr.op, p.hdr.dst_port)));
        if rsts.len() == 300 {
            break;
        }
    }
    let expected: Vec<_> = (0..300).map(|port| (OP_RST, 10_000 + port)).collect();
    assert_eq!(rsts, expected);
    assert_eq!(consumed + g.tx_used().len(), 300);
}

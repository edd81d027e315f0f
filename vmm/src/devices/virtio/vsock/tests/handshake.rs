//! Device creation, configuration, and connection set-up in both directions.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixListener;

use super::*;
use crate::devices::virtio::vsock::connection::BUF_ALLOC;
use crate::devices::virtio::vsock::{MuxerError, VsockError};
use crate::devices::virtio::{INT_USED_RING, TYPE_VSOCK, VIRTIO_F_VERSION_1};

#[test]
fn config_space_features_and_queues() {
    let g = Guest::new();
    assert_eq!(g.dev.device_type(), TYPE_VSOCK);
    assert_eq!(g.dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(g.dev.avail_features(), VIRTIO_F_VERSION_1);
    let mut cid = [0xffu8; 8];
    g.dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut high = [0xffu8; 4];
    g.dev.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    let mut past = [0xffu8; 4];
    g.dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn activation_needs_three_queues() {
    let mut g = Guest::inactive();
    let activation = Activation {
        mem: g.mem.clone(),
        queues: vec![Queue::new(256).unwrap()],
    };
    assert!(g.dev.activate(activation).is_err());
}

#[test]
fn new_rejects_existing_paths_and_reserved_cids() {
    let dir = tempfile::tempdir().unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let taken = dir.path().join("taken");
    std::fs::write(&taken, b"").unwrap();
    let err = VsockDevice::new(GUEST_CID, &taken, irq.clone())
        .err()
        .unwrap();
    assert!(
        matches!(err, VsockError::Muxer(MuxerError::SocketExists(_))),
        "{err}"
    );
    assert!(taken.exists(), "an existing file is left alone");
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let err = VsockDevice::new(cid, &dir.path().join("s"), irq.clone())
            .err()
            .unwrap();
        assert!(
            matches!(err, VsockError::InvalidCid(c) if c == cid),
            "{err}"
        );
    }
    let err = VsockDevice::new(GUEST_CID, &dir.path().join("no/such/dir/s"), irq)
        .err()
        .unwrap();
    assert!(
        matches!(err, VsockError::Muxer(MuxerError::Bind { .. })),
        "{err}"
    );
}

#[test]
fn socket_file_is_removed_on_drop() {
    let g = Guest::new();
    let uds = g.uds.clone();
    assert!(uds.exists());
    assert_eq!(g.dev.uds_path(), uds.as_path());
    let Guest { dir, dev, .. } = g;
    drop(dev);
    assert!(!uds.exists());
    drop(dir);
}

#[test]
fn host_initiated_handshake() {
    let mut g = Guest::new();
    let mut c = client(&g.uds);
    c.write_all(b"CONNECT 1024\n").unwrap();
    g.give_rx(1);
    g.poll();
    let req = g.recv_one();
    let local = req.hdr.src_port;
    assert!(local >= 1 << 30, "local port {local}");
    let expected = Header {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port: local,
        dst_port: 1024,
        len: 0,
        type_: TYPE_STREAM,
        op: OP_REQUEST,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: 0,
    };
    assert_eq!(req.hdr, expected);
    assert_ne!(g.irq.status() & INT_USED_RING, 0, "used-buffer interrupt");

    g.send(guest_pkt(OP_RESPONSE, 1024, local), &[]);
    assert_eq!(g.tx_used(), vec![(0, 0)]);
    assert_eq!(read_line(&mut c), format!("OK {local}"));
    assert_eq!(g.dev.connection_count(), 1);

    // A second client gets another local port.
    let (_c2, local2) = g.host_connect(1024);
    assert_ne!(local2, local);
    assert_eq!(g.dev.connection_count(), 2);
}

#[test]
fn connect_before_the_driver_is_up_is_delivered_later() {
    let mut g = Guest::inactive();
    let mut c = client(&g.uds);
    c.write_all(b"CONNECT 1024\n").unwrap();
    g.poll();
    assert_eq!(g.dev.connection_count(), 1);
    g.activate();
    g.poll();
    assert!(g.recv().is_empty(), "no rx buffers yet");
    g.give_rx(1);
    let req = g.recv_one();
    assert_eq!(req.hdr.op, OP_REQUEST);
    g.send(guest_pkt(OP_RESPONSE, 1024, req.hdr.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}", req.hdr.src_port));
}

#[test]
fn guest_rst_refuses_a_host_connection() {
    let mut g = Guest::new();
    let mut c = client(&g.uds);
    c.write_all(b"CONNECT 7\n").unwrap();
    g.give_rx(1);
    let req = g.recv_one();
    g.send(guest_pkt(OP_RST, 7, req.hdr.src_port), &[]);
    assert!(is_closed(&mut c));
    assert_eq!(g.dev.connection_count(), 0);
    g.give_rx(1);
    assert!(g.recv().is_empty(), "an RST is not answered");
}

#[test]
fn unanswered_request_times_out() {
    let mut g = Guest::new();
    g.dev.set_timeout(Duration::from_millis(30));
    let mut c = client(&g.uds);
    c.write_all(b"CONNECT 7\n").unwrap();
    g.give_rx(2);
    let req = g.recv_one();
    run_until(&mut g, |g| g.dev.connection_count() == 0);
    assert!(is_closed(&mut c));
    let rst = g.recv_one();
    assert_eq!(
        (rst.hdr.op, rst.hdr.src_port, rst.hdr.dst_port),
        (OP_RST, req.hdr.src_port, 7)
    );
    assert_eq!(g.dev.connection_count(), 0);
    assert!(!extra_ready(&g.dev, 0), "nothing left to wake up for");
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mut g = Guest::new();
    g.give_rx(4);
    let long = [b'C'; 40];
    for line in [
        &b"HELLO 1024\n"[..],
        b"CONNECT\n",
        b"CONNECT x\n",
        b"CONNECT 1 2\n",
        &long,
    ] {
        let mut c = client(&g.uds);
        c.write_all(line).unwrap();
        g.poll();
        assert!(is_closed(&mut c), "{}", String::from_utf8_lossy(line));
    }
    let mut c = client(&g.uds);
    c.write_all(b"CONN").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    g.poll();
    assert!(is_closed(&mut c), "EOF before the newline");
    assert!(g.recv().is_empty(), "nothing reached the guest");
    assert_eq!(g.dev.connection_count(), 0);
    // The device is still fine.
    g.host_connect(5);
}

#[test]
fn connect_line_split_across_writes_and_followed_by_data() {
    let mut g = Guest::new();
    let mut c = client(&g.uds);
    c.write_all(b"CONN").unwrap();
    g.poll();
    c.write_all(b"ECT 9\nearly").unwrap();
    g.give_rx(1);
    let req = g.recv_one();
    assert_eq!((req.hdr.op, req.hdr.dst_port), (OP_REQUEST, 9));
    g.send(guest_pkt(OP_RESPONSE, 9, req.hdr.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}", req.hdr.src_port));
    g.give_rx(1);
    let data = g.recv_one();
    assert_eq!((data.hdr.op, data.data.as_slice()), (OP_RW, &b"early"[..]));
}

#[test]
fn silent_client_times_out() {
    let mut g = Guest::new();
    g.dev.set_timeout(Duration::from_millis(20));
    let mut c = client(&g.uds);
    g.poll();
    // The pending client is the only thing with a deadline: one timer expiry closes it.
    assert!(extra_ready(&g.dev, 5000), "the timer wakes the worker");
    g.poll();
    assert!(is_closed(&mut c));
}

#[test]
fn guest_initiated_connection() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(peer_socket_path(&g.uds, 52)).unwrap();
    g.give_rx(1);
    g.send(
        Header {
            buf_alloc: 1000,
            ..guest_pkt(OP_REQUEST, 5000, 52)
        },
        &[],
    );
    let resp = g.recv_one();
    let expected = Header {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port: 52,
        dst_port: 5000,
        len: 0,
        type_: TYPE_STREAM,
        op: OP_RESPONSE,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: 0,
    };
    assert_eq!(resp.hdr, expected);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();

    g.send(guest_pkt(OP_RW, 5000, 52), b"hello host");
    assert_eq!(read_n(&mut s, 10), b"hello host");
    s.write_all(b"hello guest").unwrap();
    g.give_rx(1);
    let p = g.recv_one();
    assert_eq!(
        (p.hdr.op, p.hdr.src_port, p.hdr.dst_port),
        (OP_RW, 52, 5000)
    );
    assert_eq!(p.data, b"hello guest");
    assert_eq!(p.hdr.fwd_cnt, 10);
}

#[test]
fn guest_connect_to_a_missing_socket_is_reset() {
    let mut g = Guest::new();
    g.give_rx(1);
    g.send(guest_pkt(OP_REQUEST, 5000, 53), &[]);
    let rst = g.recv_one();
    assert_eq!(
        (rst.hdr.op, rst.hdr.src_port, rst.hdr.dst_port),
        (OP_RST, 53, 5000)
    );
    assert_eq!((rst.hdr.src_cid, rst.hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(g.dev.connection_count(), 0);
}

#[test]
fn device_reset_closes_connections() {
    let mut g = Guest::new();
    let (mut c, _) = g.host_connect(1024);
    let (_l, mut s) = g.guest_connect(5000, 52);
    g.dev.reset();
    assert!(is_closed(&mut c));
    assert!(is_closed(&mut s));
    assert_eq!(g.dev.connection_count(), 0);
    g.activate();
    g.host_connect(1024);
}

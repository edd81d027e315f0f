//! Device tests without a guest: [`Guest`] plays the driver (queues laid out by
//! `virtio_queue::mock::MockSplitQueue` in real guest memory) and the host side uses real unix
//! sockets in a temporary directory.

mod data;
mod handshake;
mod malformed;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::hybrid::peer_socket_path;
use super::packet::*;
use super::VsockDevice;
use crate::devices::virtio::{Activation, Interrupt, VirtioDevice};

/// The CID of the simulated guest.
pub const GUEST_CID: u64 = 3;
/// `buf_alloc` the simulated guest advertises unless a test says otherwise.
pub const GUEST_BUF: u32 = 64 * 1024;
/// Data part of each rx buffer the simulated guest posts (like Linux).
pub const RX_DATA: u32 = 4096;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 0x400_0000;
/// Each descriptor index owns a buffer slot of this size.
const SLOT: u64 = 0x1_0000;
/// Where each queue's used ring goes, from the start of its descriptor table.
const USED_RING_OFFSET: u64 = 0x2000;
const RX_BUFS: u64 = 0x100_0000;
const TX_BUFS: u64 = 0x200_0000;
/// Upper bound for blocking reads of unix clients (only reached when a test fails).
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A raw descriptor for hand-made chains: `(index, addr, len, flags, next)`.
pub type RawDesc = (u16, u64, u32, u16, u16);

/// A packet the device put in an rx buffer.
#[derive(Debug)]
pub struct Packet {
    pub hdr: Header,
    pub data: Vec<u8>,
}

/// The driver side of one split queue.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(mem: &GuestMemoryMmap, start: u64, bufs: u64) -> (Ring, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(start), QSIZE);
        let mut queue = mock.create_queue::<Queue>().unwrap();
        // virtio-queue 0.18's mock places the used ring `len` bytes (not `2 * len`) past the avail
        // ring, so the two overlap from avail entry ~len/2 on: move the used ring out of the way.
        let used = start + USED_RING_OFFSET;
        mem.write_slice(&[0u8; 4 + 8 * QSIZE as usize + 2], GuestAddress(used))
            .unwrap();
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        let ring = Ring {
            desc: mock.desc_table_addr().0,
            avail: mock.avail_addr().0,
            used,
            bufs,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (ring, queue)
    }

    /// Buffer slot of descriptor `idx`.
    fn slot(&self, idx: u16) -> u64 {
        self.bufs + u64::from(idx) * SLOT
    }

    /// Writes descriptor `idx` as given (no fix-ups: malformed chains are made this way).
    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        mem.write_obj(desc, GuestAddress(self.desc + 16 * u64::from(idx)))
            .unwrap();
    }

    /// Makes the chain starting at `head` available.
    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let entry = self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(entry)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Posts a chain of `(len, flags)` descriptors, each at its own slot; returns the head index.
    fn push(&mut self, mem: &GuestMemoryMmap, descs: &[(u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, (len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if last {
                *flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            self.write_desc(mem, idx, self.slot(idx), *len, flags, (idx + 1) % QSIZE);
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        self.publish(mem, head);
        head
    }

    /// Takes the used entries added since the last call: `(id, len)`.
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let elem = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A simulated guest driver attached to a [`VsockDevice`].
pub struct Guest {
    pub dir: tempfile::TempDir,
    pub uds: PathBuf,
    pub mem: GuestMemoryMmap,
    pub dev: VsockDevice,
    pub irq: Arc<Interrupt>,
    rx: Ring,
    tx: Ring,
    /// Head index of each posted rx chain → (header address, data address).
    rx_chains: HashMap<u16, (u64, u64)>,
    /// Dropped (len 0) rx buffers seen by [`Guest::recv`].
    pub empty_rx: usize,
}

impl Guest {
    /// An activated device with no rx buffers yet.
    pub fn new() -> Guest {
        let mut g = Guest::inactive();
        g.activate();
        g
    }

    /// A device the driver has not activated yet.
    pub fn inactive() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let dev = VsockDevice::new(GUEST_CID, &uds, irq.clone()).unwrap();
        let (rx, _) = Ring::new(&mem, 0, RX_BUFS);
        let (tx, _) = Ring::new(&mem, 0x1_0000, TX_BUFS);
        Guest {
            dir,
            uds,
            mem,
            dev,
            irq,
            rx,
            tx,
            rx_chains: HashMap::new(),
            empty_rx: 0,
        }
    }

    /// Activates the device with fresh queues.
    pub fn activate(&mut self) {
        let (rx, rxq) = Ring::new(&self.mem, 0, RX_BUFS);
        let (tx, txq) = Ring::new(&self.mem, 0x1_0000, TX_BUFS);
        let (_, evq) = Ring::new(&self.mem, 0x2_0000, 0);
        (self.rx, self.tx) = (rx, tx);
        self.rx_chains.clear();
        let activation = Activation {
            mem: self.mem.clone(),
            queues: vec![rxq, txq, evq],
        };
        self.dev.activate(activation).unwrap();
    }

    /// Posts `n` rx buffers (header descriptor + 4 KiB data descriptor) and notifies.
    pub fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let w = VRING_DESC_F_WRITE as u16;
            let head = self
                .rx
                .push(&self.mem, &[(HEADER_SIZE as u32, w), (RX_DATA, w)]);
            let data = self.rx.slot((head + 1) % QSIZE);
            self.rx_chains.insert(head, (self.rx.slot(head), data));
        }
        self.dev.process_queue(0);
    }

    /// Posts `n` single-descriptor rx buffers (header and data together, Linux >= 6.2) and notifies.
    pub fn give_rx_single(&mut self, n: usize) {
        for _ in 0..n {
            let head = self.rx.push(
                &self.mem,
                &[(HEADER_SIZE as u32 + RX_DATA, VRING_DESC_F_WRITE as u16)],
            );
            let hdr = self.rx.slot(head);
            self.rx_chains.insert(head, (hdr, hdr + HEADER_SIZE as u64));
        }
        self.dev.process_queue(0);
    }

    /// Posts a raw rx chain with head `entries[0].0`; notifies.
    pub fn give_rx_raw(&mut self, entries: &[RawDesc]) {
        for &(idx, addr, len, flags, next) in entries {
            self.rx.write_desc(&self.mem, idx, addr, len, flags, next);
        }
        let hdr = entries[0].1;
        let data = entries.get(1).map_or(hdr + HEADER_SIZE as u64, |e| e.1);
        self.rx_chains.insert(entries[0].0, (hdr, data));
        self.rx.publish(&self.mem, entries[0].0);
        self.dev.process_queue(0);
    }

    /// Sends a packet from the guest (header and data in two descriptors) and notifies.
    pub fn send(&mut self, hdr: Header, data: &[u8]) {
        let hdr = Header {
            len: data.len() as u32,
            ..hdr
        };
        let head = self.tx.next_desc;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(self.tx.slot(head)))
            .unwrap();
        if data.is_empty() {
            self.tx.push(&self.mem, &[(HEADER_SIZE as u32, 0)]);
        } else {
            let data_slot = self.tx.slot((head + 1) % QSIZE);
            self.mem.write_slice(data, GuestAddress(data_slot)).unwrap();
            self.tx.push(
                &self.mem,
                &[(HEADER_SIZE as u32, 0), (data.len() as u32, 0)],
            );
        }
        self.dev.process_queue(1);
    }

    /// Posts a raw tx chain with head `entries[0].0`; notifies.
    pub fn send_raw(&mut self, entries: &[RawDesc]) {
        for &(idx, addr, len, flags, next) in entries {
            self.tx.write_desc(&self.mem, idx, addr, len, flags, next);
        }
        self.tx.publish(&self.mem, entries[0].0);
        self.dev.process_queue(1);
    }

    /// Address of the buffer slot of tx descriptor `idx` (for raw chains).
    pub fn tx_slot(&self, idx: u16) -> u64 {
        self.tx.slot(idx)
    }

    /// Used tx entries since the last call.
    pub fn tx_used(&mut self) -> Vec<(u16, u32)> {
        self.tx.take_used(&self.mem)
    }

    /// Lets the device handle its unix-side events (what the worker does when the epoll fd fires).
    pub fn poll(&mut self) {
        self.dev.process_extra();
    }

    /// Packets the device has written to rx buffers since the last call.
    pub fn recv(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        for (id, len) in self.rx.take_used(&self.mem) {
            let (hdr_addr, data_addr) = self.rx_chains.remove(&id).unwrap_or((0, 0));
            if len == 0 {
                self.empty_rx += 1;
                continue;
            }
            let mut raw = [0u8; HEADER_SIZE];
            self.mem
                .read_slice(&mut raw, GuestAddress(hdr_addr))
                .unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(len, HEADER_SIZE as u32 + hdr.len, "used length of {hdr:?}");
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(data_addr))
                .unwrap();
            out.push(Packet { hdr, data });
        }
        out
    }

    /// Exactly one packet must be waiting; returns it.
    pub fn recv_one(&mut self) -> Packet {
        let mut pkts = self.recv();
        assert_eq!(pkts.len(), 1, "expected one packet, got {pkts:?}");
        pkts.pop().unwrap()
    }

    /// Host-initiated connection to guest port `port`, through the full handshake.
    /// Returns the client stream and the local (host) port.
    pub fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = client(&self.uds);
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.give_rx(1);
        self.poll();
        let req = self.recv_one();
        assert_eq!(req.hdr.op, OP_REQUEST);
        let local = req.hdr.src_port;
        self.send(guest_pkt(OP_RESPONSE, port, local), &[]);
        assert_eq!(read_line(&mut client), format!("OK {local}"));
        (client, local)
    }

    /// Guest-initiated connection from guest port `guest_port` to host port `host_port`.
    /// Returns the accepted unix stream (blocking, with a read timeout).
    pub fn guest_connect(&mut self, guest_port: u32, host_port: u32) -> (UnixListener, UnixStream) {
        let listener = UnixListener::bind(peer_socket_path(&self.uds, host_port)).unwrap();
        self.give_rx(1);
        self.send(guest_pkt(OP_REQUEST, guest_port, host_port), &[]);
        let resp = self.recv_one();
        assert_eq!(resp.hdr.op, OP_RESPONSE, "{resp:?}");
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        (listener, stream)
    }
}

/// A packet header from the guest: `src_port` (guest) → `dst_port` (host).
pub fn guest_pkt(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

/// A unix client of the device socket (blocking, with a read timeout).
pub fn client(uds: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Reads one `\n`-terminated line (without it).
pub fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
        assert!(line.len() < 64, "runaway line {line:?}");
    }
    String::from_utf8(line).unwrap()
}

/// Whether the peer closed `s` (EOF or reset), without waiting long.
pub fn is_closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 16];
    let closed = match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    closed
}

/// Reads exactly `n` bytes.
pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

/// Whether the device's epoll fd becomes readable within `timeout_ms` (what wakes the worker).
pub fn extra_ready(dev: &VsockDevice, timeout_ms: i32) -> bool {
    let epoll = Epoll::new().unwrap();
    let fd = dev.extra_fd().unwrap();
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        .unwrap();
    let mut events = [EpollEvent::default(); 1];
    epoll.wait(timeout_ms, &mut events).unwrap() > 0
}

/// Runs the device like its worker would (wait for the epoll fd, then handle it) until `done`.
/// A timer wake-up may be for a deadline that has since moved, hence the loop.
pub fn run_until(g: &mut Guest, done: impl Fn(&Guest) -> bool) {
    for _ in 0..100 {
        if done(g) {
            return;
        }
        assert!(
            extra_ready(&g.dev, 5000),
            "the device's epoll fd never became readable"
        );
        g.poll();
    }
    panic!("condition not reached");
}

/// Reads until EOF (or reset) and returns everything read; the device is polled meanwhile.
pub fn drain_until_closed(g: &mut Guest, s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..100_000 {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => g.poll(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("read: {e}"),
        }
    }
    panic!("stream not closed after {} bytes", out.len());
}

/// Reads exactly `n` bytes from a client the device may still have to flush to; polls meanwhile.
pub fn read_polling(g: &mut Guest, s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = vec![0u8; n];
    let mut got = 0;
    for _ in 0..100_000 {
        if got == n {
            s.set_nonblocking(false).unwrap();
            return out;
        }
        match s.read(&mut out[got..]) {
            Ok(0) => panic!("EOF after {got} of {n} bytes"),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => g.poll(),
            Err(e) => panic!("read: {e}"),
        }
    }
    panic!("only {got} of {n} bytes arrived");
}

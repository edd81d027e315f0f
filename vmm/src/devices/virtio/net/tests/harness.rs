//! A device driven without a worker thread against guest memory, and a throwaway network namespace
//! holding the tap and the host end of the link.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::frames::*;
use crate::devices::virtio::net::chain::ETH_HLEN;
use crate::devices::virtio::net::{NetDevice, Tap, VNET_HDR_LEN};
use crate::devices::virtio::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

pub const MEM_SIZE: usize = 0x100_0000;
pub const RXQ: u64 = 0x1000;
pub const TXQ: u64 = 0x3000;
pub const QLEN: u16 = 64;
/// rx buffer `i` (descriptor index) lives at `RX_BUFS + i * 64 KiB`.
pub const RX_BUFS: u64 = 0x10_0000;
pub const TX_BUF: u64 = 0x60_0000;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const TAP_NAME: &str = "pvtest0";
pub const WAIT: Duration = Duration::from_secs(5);
pub const BASIC: u64 = VIRTIO_F_VERSION_1
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_MTU)
    | (1 << VIRTIO_NET_F_STATUS);

pub use podvisor_testkit::netns::TestNetns;

/// The namespace of one test, without IPv6 chatter; None (after a SKIPPED line) without root or a tun.
pub fn netns(test: &str) -> Option<TestNetns> {
    TestNetns::new(test, "net").map(TestNetns::without_ipv6)
}

/// A tap in `ns` with HOST_IP/24, up, and a permanent neighbour entry for the guest.
pub fn host_tap(ns: &TestNetns) -> (Arc<Tap>, [u8; 6]) {
    let tap = ns.run(|| Tap::open(TAP_NAME)).expect("open tap");
    ns.ip(&format!("addr add {}/24 dev {TAP_NAME}", ip_str(HOST_IP)));
    ns.ip(&format!("link set {TAP_NAME} up"));
    let guest = format!("{} lladdr {}", ip_str(GUEST_IP), mac_str(GUEST_MAC));
    ns.ip(&format!("neigh add {guest} dev {TAP_NAME} nud permanent"));
    // `ip -br link`: name, state, MAC, flags.
    let line = ns.ip(&format!("-br link show dev {TAP_NAME}"));
    let mac = parse_mac(line.split_whitespace().nth(2).unwrap());
    (Arc::new(tap), mac)
}

pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A device with its queues in guest memory, driven without a worker thread.
pub struct Harness<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub rxq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub txq: MockSplitQueue<'a, GuestMemoryMmap>,
    pub dev: NetDevice,
    pub irq: Arc<Interrupt>,
    /// Watches the device's extra fd, as the worker does.
    pub epoll: Epoll,
    pub rx_next: u16,
    pub tx_next: u16,
    pub rx_seen: u16,
}

impl<'a> Harness<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, tap: Arc<Tap>, features: u64) -> Harness<'a> {
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let dev = NetDevice::new(tap, GUEST_MAC, 1500, irq.clone()).unwrap();
        let epoll = Epoll::new().unwrap();
        let event = EpollEvent::new(EventSet::IN, 0);
        let extra = dev.extra_fd().unwrap();
        epoll.ctl(ControlOperation::Add, extra, event).unwrap();
        let mut h = Harness {
            mem,
            rxq: MockSplitQueue::create(mem, GuestAddress(RXQ), QLEN),
            txq: MockSplitQueue::create(mem, GuestAddress(TXQ), QLEN),
            dev,
            irq,
            epoll,
            rx_next: 0,
            tx_next: 0,
            rx_seen: 0,
        };
        h.activate(features);
        h
    }

    /// Fresh queues (as a driver sets them up after a reset), then DRIVER_OK with `features`.
    pub fn activate(&mut self, features: u64) {
        self.rxq = MockSplitQueue::create(self.mem, GuestAddress(RXQ), QLEN);
        self.txq = MockSplitQueue::create(self.mem, GuestAddress(TXQ), QLEN);
        (self.rx_next, self.tx_next, self.rx_seen) = (0, 0, 0);
        self.dev.set_acked_features(features);
        let queues = vec![
            self.rxq.create_queue().unwrap(),
            self.txq.create_queue().unwrap(),
        ];
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
        };
        self.dev.activate(activation).unwrap();
    }

    /// Makes a chain of `(addr, len, flags)` available on rx (`rx`) or tx; returns its head.
    pub fn add_chain(&mut self, rx: bool, parts: &[(u64, u32, u16)]) -> u16 {
        let (queue, next) = if rx {
            (&self.rxq, &mut self.rx_next)
        } else {
            (&self.txq, &mut self.tx_next)
        };
        let head = *next;
        let descs: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, (addr, len, flags))| {
                let more = i + 1 < parts.len();
                let flags = flags | if more { VRING_DESC_F_NEXT as u16 } else { 0 };
                desc(*addr, *len, flags, head + i as u16 + 1)
            })
            .collect();
        queue.add_desc_chains(&descs, head).unwrap();
        *next += parts.len() as u16;
        head
    }

    /// Makes `n` single-descriptor rx buffers of `len` bytes available (without notifying).
    pub fn add_rx_buffers(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = RX_BUFS + u64::from(self.rx_next) * 0x1_0000;
            self.add_chain(true, &[(addr, len, WRITE)]);
        }
    }

    /// The guest sends `frame` (after an all-zero virtio-net header) and notifies the tx queue.
    pub fn send(&mut self, frame: &[u8]) {
        let mut chain = vec![0u8; VNET_HDR_LEN];
        chain.extend_from_slice(frame);
        self.mem.write_slice(&chain, GuestAddress(TX_BUF)).unwrap();
        self.add_chain(false, &[(TX_BUF, chain.len() as u32, 0)]);
        self.dev.process_queue(1);
    }

    /// Used entries `(id, len)` of `queue` from index `from` on.
    pub fn used(queue: &MockSplitQueue<'_, GuestMemoryMmap>, from: u16) -> Vec<(u32, u32)> {
        let idx = queue.used().idx().load();
        (from..idx)
            .map(|i| {
                let elem = queue.used().ring().ref_at(usize::from(i % QLEN));
                let elem = elem.unwrap().load();
                (elem.id(), elem.len())
            })
            .collect()
    }

    pub fn tx_used(&self) -> Vec<(u32, u32)> {
        Self::used(&self.txq, 0)
    }

    /// Whether the device's extra fd becomes readable within `ms`.
    pub fn extra_readable(&self, ms: i32) -> bool {
        let mut events = [EpollEvent::default(); 1];
        // A signal (EINTR) on a loaded host is not an answer: wait again.
        loop {
            match self.epoll.wait(ms, &mut events) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r.unwrap() > 0,
            }
        }
    }

    /// Runs the device's rx side until at least `n` new used rx entries appear; returns them.
    pub fn wait_rx(&mut self, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let used = Self::used(&self.rxq, self.rx_seen);
            if used.len() >= n {
                self.rx_seen += used.len() as u16;
                return used;
            }
            assert!(Instant::now() < deadline, "no rx after {WAIT:?}: {used:?}");
            if self.extra_readable(100) {
                self.dev.process_extra();
            }
        }
    }

    /// The bytes of a used rx entry.
    pub fn rx_bytes(&self, (id, len): (u32, u32)) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        let addr = RX_BUFS + u64::from(id) * 0x1_0000;
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Waits for the next single-buffer frame whose Ethernet type is `ethertype`, skipping others.
    pub fn recv(&mut self, ethertype: u16) -> (VnetHdr, Vec<u8>) {
        loop {
            for entry in self.wait_rx(1) {
                let bytes = self.rx_bytes(entry);
                let (hdr, frame) = split_frame(&bytes);
                if frame.len() >= ETH_HLEN && ether_type(frame) == ethertype {
                    return (hdr, frame.to_vec());
                }
            }
        }
    }
}

pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

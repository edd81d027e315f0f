//! The virtio-net device model (virtio 1.1 §5.1): queues rx (0) and tx (1), a MAC address, an MTU and
//! a link-up status in configuration space, and a [`Tap`] on the host side.
//!
//! tx: every chain (virtio-net header and frame) is gathered and written to the tap as one frame.
//! rx: frames read from the tap go to the guest's rx buffers, several of them per frame when
//! `VIRTIO_NET_F_MRG_RXBUF` is negotiated. When the guest has no buffer left, the frame waits in the
//! device and the tap leaves the device's epoll set (the worker's wait is level-triggered): nothing
//! reads the tap until the driver notifies the rx queue.

use std::collections::VecDeque;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    virtio_net_config, virtio_net_hdr_v1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::chain::{read_tx_chain, RxBuffer, ETH_HLEN, MAX_FRAME_LEN};
use super::tap::{Tap, VNET_HDR_LEN};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1,
};

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
/// Frames read from the tap per wake-up; the tap stays armed, so the worker comes back for more.
const RX_BATCH: usize = 64;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = offset_of!(virtio_net_hdr_v1, num_buffers);
const CONFIG_LEN: usize = size_of::<virtio_net_config>();

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The device's epoll set cannot be created.
    #[error("net device epoll: {0}")]
    Epoll(#[source] io::Error),
}

/// Traffic counters of a net device (cumulative, reset never clears them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest (Ethernet frames, without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames read from the tap and dropped: shorter than an Ethernet header, longer than
    /// `MAX_FRAME_LEN`, or too large for the guest's buffers.
    pub rx_dropped: u64,
    /// Frames the guest sent that the tap accepted.
    pub tx_packets: u64,
    /// Bytes the tap accepted (Ethernet frames, without the virtio-net header).
    pub tx_bytes: u64,
    /// Well-formed guest frames the tap refused.
    pub tx_dropped: u64,
    /// Malformed descriptor chains (either queue), returned to the guest with length 0.
    pub bad_chains: u64,
}

/// The driver's queues, from activation to reset.
struct Queues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
}

/// The outcome of trying to hand the pending frame to the guest.
enum Delivery {
    /// The frame is gone (delivered or dropped).
    Done,
    /// The guest has no rx buffer; the frame waits.
    NoBuffers,
}

/// A virtio-net device backed by a tap.
pub struct NetDevice {
    tap: Arc<Tap>,
    mac: [u8; 6],
    mtu: u16,
    interrupt: Arc<Interrupt>,
    acked_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    queues: Option<Queues>,
    /// Holds the tap while the device wants rx frames; the worker waits on it.
    epoll: Epoll,
    tap_armed: bool,
    /// The frame read from the tap and not yet delivered: `rx_len` bytes of `rx_frame` (0: none).
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// rx buffers taken off the queue for the pending frame.
    rx_buffers: VecDeque<RxBuffer>,
    tx_frame: Vec<u8>,
    stats: NetStats,
}

impl NetDevice {
    /// A device with `mac` and `mtu` in its configuration space, exchanging frames with `tap`.
    pub fn new(
        tap: Arc<Tap>,
        mac: [u8; 6],
        mtu: u16,
        interrupt: Arc<Interrupt>,
    ) -> Result<NetDevice, NetError> {
        Ok(NetDevice {
            tap,
            mac,
            mtu,
            interrupt,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            queues: None,
            epoll: Epoll::new().map_err(NetError::Epoll)?,
            tap_armed: false,
            // One byte more than the largest frame: a longer read shows as truncated.
            rx_frame: vec![0; MAX_FRAME_LEN + 1],
            rx_len: 0,
            rx_buffers: VecDeque::new(),
            tx_frame: vec![0; MAX_FRAME_LEN],
            stats: NetStats::default(),
        })
    }

    /// The tap the device uses.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// A snapshot of the traffic counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }

    /// The `TUN_F_*` offloads matching the acked guest features: what the guest accepts on rx.
    pub fn tap_offloads(&self) -> u32 {
        let mut flags = 0;
        // The driver may only negotiate TSO together with checksum offload; so does the tap.
        if self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            if self.acked(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if self.acked(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
        }
        flags
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(offset_of!(virtio_net_config, mac), &self.mac);
        let status = VIRTIO_NET_S_LINK_UP as u16;
        put(offset_of!(virtio_net_config, status), &status.to_le_bytes());
        let pairs = offset_of!(virtio_net_config, max_virtqueue_pairs);
        put(pairs, &1u16.to_le_bytes());
        put(offset_of!(virtio_net_config, mtu), &self.mtu.to_le_bytes());
        config
    }

    /// Adds the tap to (or removes it from) the epoll set the worker waits on.
    fn arm_tap(&mut self, armed: bool) {
        if armed == self.tap_armed {
            return;
        }
        let op = if armed {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        let event = EpollEvent::new(EventSet::IN, 0);
        match self.epoll.ctl(op, self.tap.as_raw_fd(), event) {
            Ok(()) => self.tap_armed = armed,
            Err(e) => tracing::warn!("net: cannot (un)register tap {}: {e}", self.tap.name()),
        }
    }

    /// Moves frames from the tap to the guest until the tap is empty, the guest has no buffer left or
    /// the batch is done, and signals the guest once; then waits on the tap only if the guest can take
    /// more.
    fn process_rx(&mut self) {
        if self.queues.is_none() {
            return;
        }
        let mut wants_tap = true;
        let mut used = false;
        for _ in 0..RX_BATCH {
            if self.rx_len == 0 {
                match self.tap.read(&mut self.rx_frame) {
                    Ok(n) if (VNET_HDR_LEN + ETH_HLEN..=MAX_FRAME_LEN).contains(&n) => {
                        self.rx_len = n
                    }
                    Ok(n) => {
                        self.stats.rx_dropped += 1;
                        tracing::debug!("net: dropping a {n}-byte frame from the tap");
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Leave the tap alone rather than spin on a descriptor that always fails.
                        tracing::warn!("net: reading tap {} failed: {e}", self.tap.name());
                        wants_tap = false;
                        break;
                    }
                }
            }
            if let Delivery::NoBuffers = self.deliver(&mut used) {
                wants_tap = false;
                break;
            }
        }
        if used {
            self.interrupt.signal_used_queue();
        }
        self.arm_tap(wants_tap);
    }

    /// Hands the pending frame to the guest, taking as many rx buffers as it needs; sets `used` when
    /// buffers went to the used ring.
    fn deliver(&mut self, used: &mut bool) -> Delivery {
        let Some(q) = self.queues.as_mut() else {
            return Delivery::NoBuffers;
        };
        let mergeable = self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        loop {
            let room: usize = self.rx_buffers.iter().map(|b| b.capacity).sum();
            let enough = if mergeable {
                room >= self.rx_len
            } else {
                !self.rx_buffers.is_empty()
            };
            if enough {
                *used |= self.fill_buffers(mergeable);
                return Delivery::Done;
            }
            if self.rx_buffers.len() >= usize::from(q.rx.size()) {
                // Even every buffer the queue can hold would not do: drop the frame.
                self.stats.rx_dropped += 1;
                self.rx_len = 0;
                return Delivery::Done;
            }
            let Some(chain) = q.rx.pop_descriptor_chain(&q.mem) else {
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            match RxBuffer::parse(&q.mem, chain) {
                Ok(buffer) => self.rx_buffers.push_back(buffer),
                Err(e) => {
                    self.stats.bad_chains += 1;
                    tracing::debug!("net: returning malformed rx buffer {head}: {e}");
                    if let Err(e) = q.rx.add_used(&q.mem, head, 0) {
                        tracing::warn!("net: cannot return rx buffer {head}: {e}");
                    }
                    *used = true;
                }
            }
        }
    }

    /// Writes the pending frame into the taken rx buffers (enough of them are taken); returns whether
    /// buffers were used. A frame larger than a lone (non-mergeable) buffer is dropped; the buffer
    /// stays for the next frame.
    fn fill_buffers(&mut self, mergeable: bool) -> bool {
        let Some(q) = self.queues.as_mut() else {
            return false;
        };
        let len = std::mem::take(&mut self.rx_len);
        let mut count = 0;
        let mut room = 0;
        for buffer in &self.rx_buffers {
            if room >= len || (!mergeable && count == 1) {
                break;
            }
            room += buffer.capacity;
            count += 1;
        }
        if room < len {
            self.stats.rx_dropped += 1;
            tracing::debug!("net: dropping a {len}-byte frame: rx buffer too small");
            return false;
        }
        let frame = &mut self.rx_frame[..len];
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&(count as u16).to_le_bytes());
        let mut offset = 0;
        for buffer in self.rx_buffers.drain(..count) {
            let n = buffer.capacity.min(len - offset);
            let written = match buffer.write(&q.mem, &frame[offset..offset + n]) {
                Ok(()) => n as u32,
                Err(e) => {
                    tracing::warn!("net: rx buffer {}: {e}", buffer.head);
                    0
                }
            };
            offset += n;
            if let Err(e) = q.rx.add_used(&q.mem, buffer.head, written) {
                tracing::warn!("net: cannot return rx buffer {}: {e}", buffer.head);
            }
        }
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
        true
    }

    /// Writes every available tx chain to the tap and returns the chains.
    fn process_tx(&mut self) {
        let Some(q) = self.queues.as_mut() else {
            return;
        };
        let mut used = false;
        while let Some(chain) = q.tx.pop_descriptor_chain(&q.mem) {
            let head = chain.head_index();
            match read_tx_chain(&q.mem, chain, &mut self.tx_frame) {
                Ok(len) => match self.tap.write(&self.tx_frame[..len]) {
                    Ok(_) => {
                        self.stats.tx_packets += 1;
                        self.stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
                    }
                    Err(e) => {
                        self.stats.tx_dropped += 1;
                        tracing::debug!("net: tap {} refused a frame: {e}", self.tap.name());
                    }
                },
                Err(e) => {
                    self.stats.bad_chains += 1;
                    tracing::debug!("net: returning malformed tx chain {head}: {e}");
                }
            }
            if let Err(e) = q.tx.add_used(&q.mem, head, 0) {
                tracing::warn!("net: cannot return tx chain {head}: {e}");
                break;
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let bits = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
        ];
        bits.iter()
            .fold(VIRTIO_F_VERSION_1, |features, bit| features | (1 << bit))
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let Ok([rx, tx]) = <[Queue; NUM_QUEUES]>::try_from(activation.queues) else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got,
            });
        };
        self.tap
            .set_offload(self.tap_offloads())
            .map_err(ActivateError::Backend)?;
        self.queues = Some(Queues {
            mem: activation.mem,
            rx,
            tx,
        });
        self.arm_tap(true);
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
        self.arm_tap(false);
        if self.rx_len != 0 {
            self.stats.rx_dropped += 1;
            self.rx_len = 0;
        }
        self.rx_buffers.clear();
        self.acked_features = 0;
        if let Err(e) = self.tap.set_offload(0) {
            tracing::warn!(
                "net: cannot clear the offloads of tap {}: {e}",
                self.tap.name()
            );
        }
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }

    fn extra_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_extra(&mut self) {
        self.process_rx();
    }
}

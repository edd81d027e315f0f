//! The virtio-vsock device model (virtio 1.1 §5.10): queues rx (0), tx (1) and event (2), the guest
//! CID in configuration space, and a [`Muxer`] that joins guest streams to unix sockets.
//!
//! Every entry point (a queue notification or readiness of [`VirtioDevice::extra_fd`]) ends in
//! [`VsockDevice::run`]: unix-side events, timeouts, then as many rx buffers as there is work for.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;

use super::muxer::{Muxer, MuxerError, RxFill};
use super::packet::{Header, HEADER_SIZE, HOST_CID};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, Interrupt, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 3;
/// Largest payload accepted in a guest tx packet (Linux sends at most 64 KiB).
const MAX_TX_PAYLOAD: u32 = 64 * 1024;
/// Largest rx data buffer accepted (what is written into it is bounded separately).
const MAX_RX_BUFFER: u32 = 1 << 20;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 and `u32::MAX` are reserved; CIDs are 32-bit in practice.
    #[error("guest CID {0} is reserved or out of range")]
    InvalidCid(u64),
    /// The unix side cannot be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
}

/// The driver's queues, from activation to reset.
struct Queues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// Held so the driver's buffers stay with the device; no events are ever sent.
    _event: Queue,
}

/// A virtio-vsock device whose host side is a unix socket (Firecracker's "hybrid vsock").
pub struct VsockDevice {
    guest_cid: u64,
    muxer: Muxer,
    interrupt: Arc<Interrupt>,
    acked_features: u64,
    queue_sizes: [u16; NUM_QUEUES],
    queues: Option<Queues>,
    /// Guest packets wait because the control queue is too full to answer them.
    tx_stalled: bool,
    dropped_chains: u64,
}

impl VsockDevice {
    /// A device for the guest `guest_cid`, listening on `uds_path` (which must not exist; it is
    /// removed when the device is dropped). Guest connections to host port `P` go to `<uds_path>_P`.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        interrupt: Arc<Interrupt>,
    ) -> Result<VsockDevice, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        Ok(VsockDevice {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            interrupt,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            queues: None,
            tx_stalled: false,
            dropped_chains: 0,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The unix socket host clients connect to.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Number of open connections (in any state).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Malformed descriptor chains dropped so far (diagnostics).
    pub fn dropped_chains(&self) -> u64 {
        self.dropped_chains
    }

    /// Feature bits the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Changes the handshake/close timeout (tests).
    #[cfg(test)]
    pub(super) fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.muxer.set_timeout(timeout);
    }

    /// Unix-side events, timeouts, then rx buffers (and guest packets that had to wait).
    fn run(&mut self) {
        self.muxer.poll_events();
        self.muxer.sweep(Instant::now());
        if self.queues.is_some() {
            self.process_rx();
            if self.tx_stalled {
                self.process_tx();
                self.process_rx();
            }
        }
    }

    /// Fills rx buffers while there is something to send.
    fn process_rx(&mut self) {
        let Some(q) = self.queues.as_mut() else {
            return;
        };
        let mut used = false;
        while self.muxer.has_rx_work() {
            let Some(mut chain) = q.rx.pop_descriptor_chain(&q.mem) else {
                // Out of buffers: stop reading streams until the driver adds some.
                self.muxer.set_rx_ready(false);
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(&q.mem, &mut chain, MAX_RX_BUFFER) {
                Ok(mut pkt) => match self.muxer.fill_rx(pkt.data_slice()) {
                    RxFill::Packet(hdr) => match pkt.set_header_from_raw(&hdr.to_bytes()) {
                        Ok(()) => HEADER_SIZE as u32 + hdr.len,
                        Err(e) => {
                            tracing::warn!("vsock: cannot write an rx header: {e}");
                            0
                        }
                    },
                    RxFill::Unusable => {
                        self.dropped_chains += 1;
                        tracing::debug!("vsock: rx buffer {head} has no room for data; dropped");
                        0
                    }
                    RxFill::Nothing => {
                        q.rx.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    self.dropped_chains += 1;
                    tracing::debug!("vsock: dropping malformed rx buffer {head}: {e}");
                    0
                }
            };
            if let Err(e) = q.rx.add_used(&q.mem, head, len) {
                tracing::warn!("vsock: cannot return rx buffer {head}: {e}");
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }

    /// Hands guest packets to the muxer (unless their answers could not be queued).
    fn process_tx(&mut self) {
        let Some(q) = self.queues.as_mut() else {
            return;
        };
        let mut used = false;
        self.tx_stalled = false;
        loop {
            if self.muxer.tx_backpressure() {
                self.tx_stalled = true;
                break;
            }
            let Some(mut chain) = q.tx.pop_descriptor_chain(&q.mem) else {
                break;
            };
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&q.mem, &mut chain, MAX_TX_PAYLOAD) {
                Ok(pkt) => self
                    .muxer
                    .on_guest_packet(&Header::of(&pkt), pkt.data_slice()),
                Err(e) => {
                    self.dropped_chains += 1;
                    tracing::debug!("vsock: dropping malformed tx packet {head}: {e}");
                }
            }
            if let Err(e) = q.tx.add_used(&q.mem, head, 0) {
                tracing::warn!("vsock: cannot return tx buffer {head}: {e}");
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let Ok([rx, tx, event]) = <[Queue; NUM_QUEUES]>::try_from(activation.queues) else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got,
            });
        };
        self.queues = Some(Queues {
            mem: activation.mem,
            rx,
            tx,
            _event: event,
        });
        self.tx_stalled = false;
        self.muxer.set_rx_ready(true);
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
        self.tx_stalled = false;
        self.muxer.reset();
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.muxer.set_rx_ready(true),
            TX_QUEUE => self.process_tx(),
            _ => {} // event queue: buffers for transport-reset events, which are never sent
        }
        self.run();
    }

    fn extra_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_extra(&mut self) {
        self.run();
    }
}

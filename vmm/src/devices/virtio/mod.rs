//! virtio devices over the virtio-mmio transport (virtio 1.1, MMIO version 2).
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] owns it, exposes its registers to the
//! vCPUs and hands it its queues when the driver sets `DRIVER_OK`. Queue processing happens on the
//! device's own worker thread ([`worker`]), woken by KVM ioeventfds on the `QueueNotify` register.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// virtio device id of a network device.
pub const TYPE_NET: u32 = 1;
/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// virtio device id of a socket (vsock) device.
pub const TYPE_VSOCK: u32 = 19;
/// The device conforms to virtio 1.0 or later.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_USED_RING: u32 = 0x1;
/// Interrupt status bit: the device configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// The interrupt line of one device: the virtio-mmio `InterruptStatus` bits and the KVM irqfd.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt injected by writing `irqfd` (registered with KVM for the device's GSI).
    pub fn new(irqfd: EventFd) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot inject virtio interrupt: {e}");
        }
    }

    /// Tells the driver that used buffers are available.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    /// Current `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd (to register with KVM).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device gets when the driver activates it.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The configured queues, in device order.
    pub queues: Vec<Queue>,
}

/// Errors a device reports when it cannot be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// What the device needs.
        expected: usize,
        /// What the driver set up.
        got: usize,
    },
    /// The device's host backend refused the negotiated configuration.
    #[error("device backend: {0}")]
    Backend(#[source] std::io::Error),
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of [`Self::avail_features`]).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (ignored by default: read-only configs).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Returns to the pre-activation state (driver wrote 0 to `Status`).
    fn reset(&mut self);
    /// Processes queue `index` after a guest notification.
    fn process_queue(&mut self, index: usize);
    /// An extra file descriptor (typically an epoll fd) the worker waits on besides the queues.
    fn extra_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Handles readiness of [`Self::extra_fd`].
    fn process_extra(&mut self) {}
}

/// Copies `config[offset..]` into `data`, zero-filling past the end; out-of-range offsets read zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset < config.len() {
        let n = data.len().min(config.len() - offset);
        data[..n].copy_from_slice(&config[offset..offset + n]);
    }
}

//! virtio-net (virtio 1.1 §5.1) backed by a tap interface.
//!
//! `tap` opens the host side (`/dev/net/tun`, in the calling thread's network namespace), `chain` validates
//! the guest's descriptor chains, `device` is the virtio side. Frames cross the tap with their
//! virtio-net header (`IFF_VNET_HDR`), so checksum and segmentation offloads pass through unchanged:
//! the tap's offloads (`TUNSETOFFLOAD`) follow the features the driver acked.

mod chain;
mod device;
mod tap;

pub use chain::MAX_FRAME_LEN;
pub use device::{NetDevice, NetError, NetStats, QUEUE_SIZE};
pub use tap::{Tap, TapError, VNET_HDR_LEN};

#[cfg(test)]
mod tests;

//! Emulated devices: the 8250 serial console and virtio-mmio devices (block slots, vsock, net).

pub mod serial;
pub mod virtio;

/// A device on the MMIO bus; `offset` is relative to the device's window.
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

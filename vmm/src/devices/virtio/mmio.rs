//! The virtio-mmio transport (virtio 1.1 §4.2, register layout version 2).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("PDVS").
const VENDOR_ID: u32 = 0x5344_5650;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// Offset of `QueueNotify` in the window (where ioeventfds are registered).
pub const NOTIFY_REG_OFFSET: u64 = REG_QUEUE_NOTIFY;

/// Device status bits (virtio 1.1 §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// A virtio device behind the MMIO register interface.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_status: u32,
    features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    config_generation: u32,
    active: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`; `queue_evts[i]` is signalled when the driver notifies queue `i`.
    pub fn new(
        device: D,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> MmioTransport<D> {
        let queues = Self::fresh_queues(&device);
        MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_status: 0,
            features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            active: false,
        }
    }

    fn fresh_queues(device: &D) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|max| Queue::new(*max).expect("queue sizes are powers of two"))
            .collect()
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably (used by the worker thread and by hot-plug operations).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The interrupt of this device.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Announces a configuration change: bumps the generation and raises the config interrupt.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    /// Marks the device broken (`DEVICE_NEEDS_RESET`) and tells the driver.
    pub fn set_needs_reset(&mut self) {
        self.device_status |= status::DEVICE_NEEDS_RESET;
        self.notify_config_change();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the device runs.
        if self.active {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.queues = Self::fresh_queues(&self.device);
        self.device_status = 0;
        self.driver_features = 0;
        self.features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.device_status;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let acked = self.driver_features;
            if acked & !offered != 0 || acked & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!(
                    "virtio driver acked unsupported features {acked:#x} (offered {offered:#x})"
                );
                // Leave FEATURES_OK clear: the driver reads it back and fails the device.
                self.device_status = value & !status::FEATURES_OK;
                return;
            }
            self.device.set_acked_features(acked);
        }
        self.device_status = value;
        if newly & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self.queues.iter().all(|q| q.is_valid(&self.mem));
        if !valid {
            tracing::warn!("virtio driver set DRIVER_OK with an invalid queue");
            self.set_needs_reset();
            return;
        }
        let queues = std::mem::replace(&mut self.queues, Self::fresh_queues(&self.device));
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
        };
        match self.device.activate(activation) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::warn!("virtio device activation failed: {e}");
                self.set_needs_reset();
            }
        }
    }

    fn read_u32(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .device
                .queue_max_sizes()
                .get(self.queue_select as usize)
                .map_or(0, |m| u32::from(*m)),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready() || self.active)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_u32(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.features_select = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            REG_DRIVER_FEATURES => {
                if self.device_status & status::FEATURES_OK == 0 {
                    match self.driver_features_select {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_select = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally consumed in KVM by the ioeventfd; this is the slow path.
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW..=REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue() {
                    match offset {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                        REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
                        REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
                        REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
                        REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
                        _ => {}
                    }
                }
            }
            _ => tracing::debug!("virtio-mmio write to unknown register {offset:#x}"),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_u32(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset % 4 == 0) {
            self.write_u32(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests;

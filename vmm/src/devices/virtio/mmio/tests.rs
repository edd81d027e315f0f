use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::{ActivateError, INT_CONFIG, INT_USED_RING};

#[derive(Default)]
struct Dummy {
    acked: u64,
    activated: usize,
    resets: usize,
    fail_activation: bool,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 0b101
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::read_config_bytes(&[1, 2, 3, 4], offset, data)
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::QueueCount {
                expected: 9,
                got: activation.queues.len(),
            });
        }
        self.activated += 1;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
    }
    fn process_queue(&mut self, _index: usize) {}
}

fn transport(dev: Dummy) -> MmioTransport<Dummy> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    let evts = vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
    MmioTransport::new(dev, mem, irq, evts)
}

fn r(t: &mut MmioTransport<Dummy>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(t: &mut MmioTransport<Dummy>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Drives the driver side of initialization; returns the final status.
fn init(t: &mut MmioTransport<Dummy>, features: u64) -> u32 {
    w(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(t, REG_DRIVER_FEATURES_SEL, 0);
    w(t, REG_DRIVER_FEATURES, features as u32);
    w(t, REG_DRIVER_FEATURES_SEL, 1);
    w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    w(
        t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    if r(t, REG_STATUS) & status::FEATURES_OK == 0 {
        return r(t, REG_STATUS);
    }
    for q in 0..2u32 {
        let base = 0x1000 * (q + 1);
        w(t, REG_QUEUE_SEL, q);
        w(t, REG_QUEUE_NUM, 16);
        w(t, REG_QUEUE_DESC_LOW, base);
        w(t, REG_QUEUE_DRIVER_LOW, base + 0x100);
        w(t, REG_QUEUE_DEVICE_LOW, base + 0x200);
        w(t, REG_QUEUE_READY, 1);
    }
    w(
        t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    r(t, REG_STATUS)
}

#[test]
fn identification_registers() {
    let mut t = transport(Dummy::default());
    assert_eq!(r(&mut t, REG_MAGIC), MAGIC_VALUE);
    assert_eq!(r(&mut t, REG_VERSION), 2);
    assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
    w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
    w(&mut t, REG_QUEUE_SEL, 1);
    assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
    w(&mut t, REG_QUEUE_SEL, 7);
    assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
    let mut cfg = [0u8; 2];
    t.read(REG_CONFIG + 2, &mut cfg);
    assert_eq!(cfg, [3, 4]);
    t.read(REG_CONFIG + 1000, &mut cfg);
    assert_eq!(cfg, [0, 0]);
    // Unaligned or odd-sized register accesses are ignored, not fatal.
    let mut odd = [0xffu8; 2];
    t.read(REG_MAGIC, &mut odd);
    assert_eq!(odd, [0, 0]);
    t.write(REG_STATUS + 1, &[1, 2, 3, 4]);
}

#[test]
fn negotiation_then_activation() {
    let mut t = transport(Dummy::default());
    let st = init(&mut t, VIRTIO_F_VERSION_1 | 0b1);
    assert_ne!(st & status::DRIVER_OK, 0);
    assert!(t.is_active());
    assert_eq!(t.device().activated, 1);
    assert_eq!(t.device().acked, VIRTIO_F_VERSION_1 | 1);
    assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
    // Queue registers are frozen while running.
    w(&mut t, REG_QUEUE_SEL, 0);
    w(&mut t, REG_QUEUE_NUM, 4);
    // Reset returns to the initial state.
    w(&mut t, REG_STATUS, 0);
    assert!(!t.is_active());
    assert_eq!(t.device().resets, 1);
    assert_eq!(r(&mut t, REG_STATUS), 0);
}

#[test]
fn unsupported_or_legacy_features_are_refused() {
    let mut t = transport(Dummy::default());
    assert_eq!(
        init(&mut t, VIRTIO_F_VERSION_1 | 0b10) & status::FEATURES_OK,
        0
    );
    let mut t = transport(Dummy::default());
    assert_eq!(init(&mut t, 0b1) & status::FEATURES_OK, 0);
    assert!(!t.is_active());
}

#[test]
fn invalid_queues_or_failed_activation_need_reset() {
    let mut t = transport(Dummy::default());
    w(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
    w(&mut t, REG_DRIVER_FEATURES, 1);
    w(
        &mut t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    // Queues never configured: rings at address 0 with size 0 are invalid.
    w(
        &mut t,
        REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(!t.is_active());
    assert_ne!(r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);

    let mut t = transport(Dummy {
        fail_activation: true,
        ..Default::default()
    });
    assert_ne!(
        init(&mut t, VIRTIO_F_VERSION_1) & status::DEVICE_NEEDS_RESET,
        0
    );
    assert!(!t.is_active());
}

#[test]
fn interrupts_and_config_generation() {
    let mut t = transport(Dummy::default());
    let generation = r(&mut t, REG_CONFIG_GENERATION);
    t.notify_config_change();
    assert_eq!(r(&mut t, REG_CONFIG_GENERATION), generation + 1);
    t.interrupt().signal_used_queue();
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG | INT_USED_RING);
    w(&mut t, REG_INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
    // QueueNotify on the slow path signals the queue's eventfd; out-of-range indexes are ignored.
    w(&mut t, REG_QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_evts[1].read().unwrap(), 1);
    w(&mut t, REG_QUEUE_NOTIFY, 99);
}

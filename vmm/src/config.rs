//! VM configuration and its validation.

use std::path::PathBuf;
use std::sync::Arc;

use crate::devices::virtio::net::Tap;

/// Largest number of vCPUs a VM may have (MP table and APIC ids are sized for it).
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory accepted, in MiB.
pub const MIN_MEM_MIB: u32 = 64;
/// Largest guest memory accepted, in MiB.
pub const MAX_MEM_MIB: u32 = 64 * 1024;
/// Largest number of virtio-blk slots (each takes one virtio-mmio window and one IRQ).
pub const MAX_BLOCK_SLOTS: usize = 16;

/// Smallest MTU accepted (the IPv4 minimum).
pub const MIN_MTU: u16 = 68;

// virtio device i (vsock, every slot, then net) uses IOAPIC pin VIRTIO_IRQ_BASE + i.
const MAX_VIRTIO_DEVICES: u32 = 1 + MAX_BLOCK_SLOTS as u32 + 1;
const _: () = assert!(
    crate::arch::layout::VIRTIO_IRQ_BASE + MAX_VIRTIO_DEVICES - 1 <= crate::arch::layout::IRQ_MAX
);

/// One virtio-blk slot of the pool a VM boots with. Slots start empty (capacity 0) and are filled at
/// runtime; whether a slot is read-only is fixed at boot because the guest reads `VIRTIO_BLK_F_RO` once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSlotConfig {
    /// The guest sees the disk as read-only and every write request fails.
    pub read_only: bool,
}

/// The VM's virtio-net device and its host side.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The tap the device exchanges frames with (see [`Tap::open`]); it lives as long as its last clone.
    pub tap: Arc<Tap>,
    /// The guest's MAC address (unicast, not all-zero).
    pub mac: [u8; 6],
    /// The MTU the device advertises ([`MIN_MTU`]..=65535).
    pub mtu: u16,
}

/// Everything needed to boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u8,
    /// Guest memory in MiB ([`MIN_MEM_MIB`]..=[`MAX_MEM_MIB`]).
    pub mem_mib: u32,
    /// Uncompressed ELF `vmlinux` (64-bit entry).
    pub kernel: PathBuf,
    /// Uncompressed newc initramfs, or none.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; the VMM appends its `virtio_mmio.device=` declarations.
    pub cmdline: String,
    /// File the guest's serial console is written to (created or truncated).
    pub console_log: PathBuf,
    /// Host unix socket of the vsock device (hybrid-vsock); must not exist yet.
    pub vsock_uds: PathBuf,
    /// Guest vsock context id (>= 3).
    pub guest_cid: u64,
    /// The pool of block slots, slot `i` being `/dev/vd<a+i>` in the guest with serial `slot<i>`.
    pub block_slots: Vec<BlockSlotConfig>,
    /// A virtio-net device (the last virtio-mmio device, after the block slots), or none.
    pub net: Option<NetConfig>,
}

/// A [`VmConfig`] field that is out of range; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A field has an invalid value.
    #[error("invalid VM config field `{field}`: {reason}")]
    Invalid {
        /// The field name.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl VmConfig {
    /// Checks every field; does not touch the filesystem beyond `exists()` checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("{} not in 1..={MAX_VCPUS}", self.vcpus),
            ));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(invalid(
                "mem_mib",
                format!("{} not in {MIN_MEM_MIB}..={MAX_MEM_MIB}", self.mem_mib),
            ));
        }
        if !self.kernel.is_file() {
            return Err(invalid(
                "kernel",
                format!("{} is not a file", self.kernel.display()),
            ));
        }
        if let Some(initramfs) = &self.initramfs {
            if !initramfs.is_file() {
                return Err(invalid(
                    "initramfs",
                    format!("{} is not a file", initramfs.display()),
                ));
            }
        }
        if self.cmdline.contains('\0') || self.cmdline.contains('\n') {
            return Err(invalid("cmdline", "contains NUL or newline"));
        }
        if self.guest_cid < 3 || self.guest_cid > u64::from(u32::MAX) {
            return Err(invalid(
                "guest_cid",
                format!("{} not in 3..=2^32-1", self.guest_cid),
            ));
        }
        if self.block_slots.len() > MAX_BLOCK_SLOTS {
            return Err(invalid(
                "block_slots",
                format!(
                    "{} slots, at most {MAX_BLOCK_SLOTS}",
                    self.block_slots.len()
                ),
            ));
        }
        if self.vsock_uds.as_os_str().len() >= 100 {
            return Err(invalid(
                "vsock_uds",
                "unix socket path longer than 99 bytes",
            ));
        }
        if self.vsock_uds.exists() {
            return Err(invalid(
                "vsock_uds",
                format!("{} already exists", self.vsock_uds.display()),
            ));
        }
        if let Some(net) = &self.net {
            if net.mac == [0; 6] {
                return Err(invalid("net.mac", "all-zero MAC address"));
            }
            if net.mac[0] & 1 != 0 {
                return Err(invalid("net.mac", "multicast MAC address"));
            }
            if net.mtu < MIN_MTU {
                return Err(invalid(
                    "net.mtu",
                    format!("{} not in {MIN_MTU}..=65535", net.mtu),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"x").unwrap();
        VmConfig {
            vcpus: 1,
            mem_mib: 128,
            kernel,
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            console_log: dir.join("console.log"),
            vsock_uds: dir.join("vsock.sock"),
            guest_cid: 3,
            block_slots: vec![BlockSlotConfig { read_only: true }],
            net: Some(NetConfig {
                tap: Arc::new(Tap::stand_in("tap0")),
                mac: [0x02, 0, 0, 0, 0, 1],
                mtu: 1500,
            }),
        }
    }

    fn set_net(c: &mut VmConfig, mac: [u8; 6], mtu: u16) {
        let net = c.net.as_mut().unwrap();
        (net.mac, net.mtu) = (mac, mtu);
    }

    #[test]
    fn each_bad_field_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = config(dir.path());
        assert_eq!(good.validate(), Ok(()));
        type Mutation = Box<dyn Fn(&mut VmConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("vcpus", Box::new(|c| c.vcpus = 0)),
            ("vcpus", Box::new(|c| c.vcpus = 200)),
            ("mem_mib", Box::new(|c| c.mem_mib = 1)),
            ("kernel", Box::new(|c| c.kernel = "/nonexistent".into())),
            (
                "initramfs",
                Box::new(|c| c.initramfs = Some("/nonexistent".into())),
            ),
            ("cmdline", Box::new(|c| c.cmdline.push('\n'))),
            ("guest_cid", Box::new(|c| c.guest_cid = 2)),
            (
                "block_slots",
                Box::new(|c| c.block_slots = vec![BlockSlotConfig { read_only: false }; 17]),
            ),
            ("vsock_uds", Box::new(|c| c.vsock_uds = c.kernel.clone())),
            ("net.mac", Box::new(|c| set_net(c, [0; 6], 1500))),
            (
                "net.mac",
                Box::new(|c| set_net(c, [1, 0, 0x5e, 0, 0, 1], 1500)),
            ),
            ("net.mtu", Box::new(|c| set_net(c, [2, 0, 0, 0, 0, 1], 67))),
        ];
        for (field, mutate) in cases {
            let mut c = good.clone();
            mutate(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
        let mut no_net = good.clone();
        no_net.net = None;
        assert_eq!(no_net.validate(), Ok(()));
        let mut jumbo = good.clone();
        set_net(&mut jumbo, [0x52, 0x54, 0, 0x12, 0x34, 0x56], u16::MAX);
        assert_eq!(jumbo.validate(), Ok(()));
    }
}

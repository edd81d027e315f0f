//! podvisor's in-process KVM microVM.
//!
//! [`Vm::boot`] creates a KVM VM inside the calling process: guest memory (vm-memory), an ELF `vmlinux`
//! loaded with linux-loader and entered through the Linux 64-bit boot protocol, an uncompressed initramfs,
//! an 8250 serial port captured to a console log, a virtio-vsock device whose host side is a unix socket
//! speaking the hybrid-vsock convention (`CONNECT <port>\n` → `OK <port>\n`), and a fixed pool of
//! virtio-blk *slots* that start empty and are filled or emptied while the guest runs
//! ([`Vm::attach_block`], [`Vm::detach_block`]) with a config-change interrupt, and optionally a
//! virtio-net device backed by a [`Tap`] ([`NetConfig`], [`Vm::net_stats`]).
//!
//! [`Vm::boot`] runs one step per concern (`builder.rs`, after Firecracker's builder): create the KVM VM
//! and guest memory, attach the vsock device, the block slots, the net device and the serial console,
//! load the kernel, write the boot tables, create and start the vCPUs. Each step has its own error type
//! ([`CreateVmError`], [`AttachError`], [`SerialError`], [`BootError`](arch::boot::BootError),
//! [`SystemError`], [`VcpuError`]), each a variant of the crate's one [`Error`].
//!
//! Every failure of a VM — guest crash, KVM internal error, triple fault, a panic in one of its threads —
//! ends as an [`ExitReason`], never as a panic of the embedding process. Dropping a [`Vm`] stops it and
//! releases every thread, file descriptor, mapping and socket file it created.
//!
//! See `vmm/SPECIFICATION.md` for the guest-visible contract (memory map, IRQs, devices).

pub mod arch;
mod builder;
mod config;
pub mod devices;
mod exit;
pub mod host;
mod thread;
mod vcpu;
mod vm;

pub use builder::{AttachError, CreateVmError, DeviceId, SerialError, SystemError, VcpuError};
pub use config::{
    BlockSlotConfig, ConfigError, NetConfig, VmConfig, MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB,
};
pub use devices::virtio::net::{NetStats, Tap, TapError};
pub use exit::ExitReason;
pub use host::{HostKind, KvmHost};
pub use thread::{ThreadKind, VmThread};
pub use vm::{Error, ExitWatch, Vm, VmState};

/// The kernel command line podvisor boots guests with on `host` (serial console, reboot ends the VM,
/// no PCI/ACPI probing), plus what the host's KVM kind needs (see [`KvmHost::guest_cmdline_args`]).
pub fn default_cmdline(host: &KvmHost) -> String {
    let base = "console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 tsc=reliable quiet";
    format!("{base} {}", host.guest_cmdline_args())
        .trim()
        .to_string()
}

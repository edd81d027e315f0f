//! The steps of [`Vm::boot`], one per device kind, in the order they run (the shape of Firecracker's
//! `vmm::builder`):
//!
//! 1. [`Builder::new`]: the KVM VM (TSS, in-kernel IRQ chip, PIT) and its guest memory;
//! 2. [`Builder::attach_vsock`], [`Builder::attach_block_slots`], [`Builder::attach_net`]: the
//!    virtio-mmio devices, in window order (vsock, the block slots, the optional net device last so it
//!    does not move the slots), each with its irqfd, queue ioeventfds and worker thread;
//! 3. [`Builder::attach_serial`]: the 8250 console, which closes the I/O bus the vCPUs dispatch to;
//! 4. [`Builder::load_kernel`]: command line (with the virtio-mmio devices), kernel and initramfs;
//! 5. [`Builder::configure_system`]: MP table and boot page tables/GDT;
//! 6. [`Builder::create_vcpus`] and [`Builder::start_vcpus`], which hands over the running [`Vm`].
//!
//! Each step has its own error type, converted into [`crate::Error`]. A step that fails drops the
//! builder, whose [`Vm`] (declared first) stops the workers already started before the VM fd and the
//! guest memory are released.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::boot::{load_boot_images, make_cmdline, BootError};
use crate::arch::layout::{
    self, create_guest_memory, mmio_addr, LayoutError, MMIO_WINDOW, SERIAL_IRQ, VIRTIO_IRQ_BASE,
};
use crate::arch::mptable::{setup_mptable, MptableError};
use crate::arch::regs::{setup_boot_vcpu, setup_vcpu_common, write_boot_tables, RegsError};
use crate::config::VmConfig;
use crate::devices::serial::SerialConsole;
use crate::devices::virtio::block::BlockDevice;
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::net::{NetDevice, NetError};
use crate::devices::virtio::vsock::{VsockDevice, VsockError};
use crate::devices::virtio::worker::{self, WorkerError};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::BusDevice;
use crate::exit::ExitReason;
use crate::host::{HostKind, KvmHost};
use crate::thread::{self, ThreadKind};
use crate::vcpu::{install_kick_handler, run_vcpu, IoBus};
use crate::vm::{Vm, Worker};

/// A virtio-mmio device of the VM (names its worker thread `virtio-<id>` and its errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceId {
    /// The vsock device (window 0).
    Vsock,
    /// Block slot `i`.
    Block(usize),
    /// The net device.
    Net,
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Vsock => f.write_str("vsock"),
            DeviceId::Block(slot) => write!(f, "blk{slot}"),
            DeviceId::Net => f.write_str("net"),
        }
    }
}

/// Creating the KVM VM and its guest memory (the `new` step).
#[derive(Debug, thiserror::Error)]
pub enum CreateVmError {
    /// A KVM ioctl failed (`/dev/kvm`, `KVM_CREATE_VM`, TSS, IRQ chip, PIT).
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] LayoutError),
    /// A guest memory region could not be given to KVM.
    #[error("KVM_SET_USER_MEMORY_REGION (slot {slot}) failed: {source}")]
    MemoryRegion {
        /// The KVM memory slot.
        slot: u32,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

/// Attaching a virtio-mmio device (the `attach_vsock`, `attach_block_slots` and `attach_net` steps).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The net device could not be created.
    #[error(transparent)]
    Net(#[from] NetError),
    /// An irqfd, ioeventfd or stop eventfd could not be created or cloned.
    #[error("virtio-{device}: cannot create an eventfd: {source}")]
    EventFd {
        /// The device.
        device: DeviceId,
        /// The error.
        source: io::Error,
    },
    /// Registering an irqfd or ioeventfd with KVM failed.
    #[error("virtio-{device}: KVM {what} failed: {source}")]
    Kvm {
        /// The device.
        device: DeviceId,
        /// `KVM_IRQFD` or `KVM_IOEVENTFD`.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The device's worker thread could not be started.
    #[error("virtio-{device}: cannot start its worker: {source}")]
    Worker {
        /// The device.
        device: DeviceId,
        /// The error.
        source: WorkerError,
    },
}

/// Attaching the serial console (the `attach_serial` step).
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The serial irqfd could not be created.
    #[error("cannot create the serial irqfd: {0}")]
    EventFd(#[source] io::Error),
    /// Registering the serial irqfd failed.
    #[error("KVM KVM_IRQFD (serial) failed: {0}")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// The console log cannot be created.
    #[error("cannot create the console log {}: {source}", path.display())]
    ConsoleLog {
        /// [`VmConfig::console_log`].
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Writing the guest's boot tables (the `configure_system` step).
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// The GDT and page tables could not be written.
    #[error(transparent)]
    BootTables(#[from] RegsError),
}

/// Creating or starting the vCPUs (the `create_vcpus` and `start_vcpus` steps).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The process-wide vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(#[source] io::Error),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VCPU` failed.
    #[error("KVM KVM_CREATE_VCPU (vCPU {id}) failed: {source}")]
    Create {
        /// The vCPU index.
        id: u8,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The vCPU's CPUID, MSRs or registers could not be set.
    #[error("vCPU {id}: {source}")]
    Setup {
        /// The vCPU index.
        id: u8,
        /// The error.
        source: RegsError,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn {
        /// The vCPU index.
        id: u8,
        /// The error.
        source: io::Error,
    },
}

/// A VM being booted: what the steps share until [`Builder::start_vcpus`] hands over the [`Vm`].
pub(crate) struct Builder {
    /// First, so a failed boot stops the started workers before the VM fd and memory are dropped.
    vm: Vm,
    kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    /// The virtio-mmio devices, `mmio[i]` in window `i` with IRQ `VIRTIO_IRQ_BASE + i`.
    mmio: Vec<Arc<Mutex<dyn BusDevice>>>,
}

impl Builder {
    /// Creates the KVM VM and its guest memory for a validated `config`.
    pub(crate) fn new(config: VmConfig) -> Result<Builder, CreateVmError> {
        let kvm_err = |what| move |source| CreateVmError::Kvm { what, source };
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let mem = create_memory(&vm_fd, config.mem_mib)?;
        Ok(Builder {
            vm: Vm::new(config),
            kvm,
            vm_fd,
            mem,
            mmio: Vec::new(),
        })
    }

    /// The vsock device, in window 0.
    pub(crate) fn attach_vsock(&mut self) -> Result<(), AttachError> {
        let (interrupt, queue_evts) = self.device_fds(DeviceId::Vsock, 3)?;
        let (cid, uds) = (self.vm.config.guest_cid, &self.vm.config.vsock_uds);
        let dev = VsockDevice::new(cid, uds, interrupt.clone())?;
        let transport = self.add_device(dev, DeviceId::Vsock, interrupt, queue_evts)?;
        self.mmio.push(transport);
        Ok(())
    }

    /// The block slots, empty, in the windows after the vsock device.
    pub(crate) fn attach_block_slots(&mut self) -> Result<(), AttachError> {
        for (slot, slot_config) in self.vm.config.block_slots.clone().iter().enumerate() {
            let id = DeviceId::Block(slot);
            let (interrupt, queue_evts) = self.device_fds(id, 1)?;
            let dev = BlockDevice::new(slot, slot_config.read_only, interrupt.clone());
            let transport = self.add_device(dev, id, interrupt, queue_evts)?;
            self.vm.blocks.push(transport.clone());
            self.mmio.push(transport);
        }
        Ok(())
    }

    /// The net device on its tap, if configured: the last window, so it does not move the block slots.
    pub(crate) fn attach_net(&mut self) -> Result<(), AttachError> {
        let Some(net) = self.vm.config.net.clone() else {
            return Ok(());
        };
        let (interrupt, queue_evts) = self.device_fds(DeviceId::Net, 2)?;
        let dev = NetDevice::new(net.tap, net.mac, net.mtu, interrupt.clone())?;
        let transport = self.add_device(dev, DeviceId::Net, interrupt, queue_evts)?;
        self.vm.net = Some(transport.clone());
        self.mmio.push(transport);
        Ok(())
    }

    /// The serial console on its irqfd, writing to the console log. Closes the I/O bus (serial port and
    /// virtio-mmio devices), returned for the vCPUs.
    pub(crate) fn attach_serial(&mut self) -> Result<Arc<IoBus>, SerialError> {
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        self.vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(SerialError::Irqfd)?;
        let path = &self.vm.config.console_log;
        let console = File::create(path).map_err(|source| SerialError::ConsoleLog {
            path: path.clone(),
            source,
        })?;
        let io = Arc::new(IoBus {
            serial: Mutex::new(SerialConsole::new(serial_irq, console)),
            mmio: std::mem::take(&mut self.mmio),
        });
        self.vm.io = Some(io.clone());
        Ok(io)
    }

    /// Writes the command line (with one `virtio_mmio.device=` per device on `io`), loads the kernel
    /// and the initramfs; returns the kernel's 64-bit entry point.
    pub(crate) fn load_kernel(&self, io: &IoBus) -> Result<GuestAddress, BootError> {
        let config = &self.vm.config;
        let mut cmdline = make_cmdline(&config.cmdline)?;
        for index in 0..io.mmio.len() {
            cmdline.add_virtio_mmio_device(
                MMIO_WINDOW,
                GuestAddress(mmio_addr(index)),
                VIRTIO_IRQ_BASE + index as u32,
                None,
            )?;
        }
        let initramfs = config.initramfs.as_deref();
        let images = load_boot_images(&self.mem, &config.kernel, initramfs, &cmdline)?;
        tracing::debug!(
            "kernel entry {:#x}, initramfs {:?}",
            images.entry.raw_value(),
            images.initramfs
        );
        Ok(images.entry)
    }

    /// Writes the MP table (CPUs, IOAPIC, IRQ routing) and the boot GDT and page tables.
    pub(crate) fn configure_system(&self) -> Result<(), SystemError> {
        setup_mptable(&self.mem, self.vm.config.vcpus)?;
        write_boot_tables(&self.mem)?;
        Ok(())
    }

    /// Creates the vCPUs with their CPUID and MSRs; vCPU 0 starts at `entry` in 64-bit mode.
    pub(crate) fn create_vcpus(&self, entry: GuestAddress) -> Result<Vec<VcpuFd>, VcpuError> {
        install_kick_handler().map_err(VcpuError::KickHandler)?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::Cpuid)?;
        let hide_pv_hypercalls = KvmHost::detect().kind == HostKind::Pvm;
        let count = self.vm.config.vcpus;
        (0..count)
            .map(|id| {
                let vcpu = self
                    .vm_fd
                    .create_vcpu(u64::from(id))
                    .map_err(|source| VcpuError::Create { id, source })?;
                let setup_err = |source| VcpuError::Setup { id, source };
                setup_vcpu_common(&vcpu, id, count, &cpuid, hide_pv_hypercalls)
                    .map_err(setup_err)?;
                if id == 0 {
                    setup_boot_vcpu(&vcpu, entry.raw_value()).map_err(setup_err)?;
                }
                Ok(vcpu)
            })
            .collect()
    }

    /// Hands the VM fd and memory to the [`Vm`] and starts one thread per vCPU on `io`.
    pub(crate) fn start_vcpus(self, vcpus: Vec<VcpuFd>, io: Arc<IoBus>) -> Result<Vm, VcpuError> {
        let mut vm = self.vm;
        vm.mem = Some(self.mem);
        vm.vm_fd = Some(self.vm_fd);
        vm.booted_at = Instant::now();
        for (id, vcpu) in (0u8..).zip(vcpus) {
            let (shared, io) = (vm.shared.clone(), io.clone());
            let (handle, thread) =
                thread::spawn(format!("vcpu{id}"), ThreadKind::Vcpu, move || {
                    run_vcpu(id, vcpu, shared, io)
                })
                .map_err(|source| VcpuError::Spawn { id, source })?;
            vm.vcpus.push(handle);
            vm.threads.push(thread);
        }
        vm.publish_vcpu_threads();
        Ok(vm)
    }

    /// Creates the irqfd (registered for the device's GSI) and the queue-notify ioeventfds of the
    /// device about to take the next window.
    fn device_fds(
        &self,
        device: DeviceId,
        queues: u32,
    ) -> Result<(Arc<Interrupt>, Vec<EventFd>), AttachError> {
        let index = self.mmio.len();
        let evt_err = |source| AttachError::EventFd { device, source };
        let kvm_err = |what| {
            move |source| AttachError::Kvm {
                device,
                what,
                source,
            }
        };
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(evt_err)?;
        self.vm_fd
            .register_irqfd(&irqfd, VIRTIO_IRQ_BASE + index as u32)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let notify = IoEventAddress::Mmio(mmio_addr(index) + NOTIFY_REG_OFFSET);
        let mut evts = Vec::new();
        for queue in 0..queues {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(evt_err)?;
            self.vm_fd
                .register_ioevent(&evt, &notify, queue)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            evts.push(evt);
        }
        Ok((Arc::new(Interrupt::new(irqfd)), evts))
    }

    /// Wraps `device` in a transport and starts its worker thread.
    fn add_device<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        id: DeviceId,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, AttachError> {
        let evt_err = |source| AttachError::EventFd { device: id, source };
        let worker_evts = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(evt_err)?;
        let mem = self.mem.clone();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device, mem, interrupt, queue_evts,
        )));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(evt_err)?;
        let shared = self.vm.shared.clone();
        let (thread, info) = worker::spawn(
            format!("virtio-{id}"),
            transport.clone(),
            worker_evts,
            stop.try_clone().map_err(evt_err)?,
            Box::new(move |msg| shared.finish(ExitReason::VmmPanic(msg))),
        )
        .map_err(|source| AttachError::Worker { device: id, source })?;
        self.vm.workers.push(Worker { stop, thread });
        self.vm.threads.push(info);
        Ok(transport)
    }
}

/// Maps `mem_mib` of guest memory and gives its regions to KVM.
fn create_memory(vm_fd: &VmFd, mem_mib: u32) -> Result<GuestMemoryMmap, CreateVmError> {
    let mem = create_guest_memory(mem_mib)?;
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let region_desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the builder and then the Vm keep
        // until after the VM fd is closed (fields drop in order), so KVM never sees an unmapped range.
        unsafe { vm_fd.set_user_memory_region(region_desc) }
            .map_err(|source| CreateVmError::MemoryRegion { slot, source })?;
    }
    Ok(mem)
}

//! [`Vm`]: boot, block-slot hot-plug, network counters, exit reporting and teardown of one microVM.

use std::fmt;
use std::fs::File;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::boot::{load_boot_images, make_cmdline, BootError};
use crate::arch::layout::{
    self, create_guest_memory, mmio_addr, LayoutError, MMIO_WINDOW, SERIAL_IRQ, VIRTIO_IRQ_BASE,
};
use crate::arch::mptable::{setup_mptable, MptableError};
use crate::arch::regs::{setup_boot_vcpu, setup_vcpu_common, write_boot_tables, RegsError};
use crate::config::{ConfigError, VmConfig};
use crate::devices::serial::SerialConsole;
use crate::devices::virtio::block::{BlockDevice, BlockError};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::net::{NetDevice, NetError, NetStats};
use crate::devices::virtio::vsock::{VsockDevice, VsockError};
use crate::devices::virtio::worker::{self, lock, WorkerError};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::BusDevice;
use crate::exit::ExitReason;
use crate::host::{HostKind, KvmHost};
use crate::thread::{self, ThreadKind, VmThread};
use crate::vcpu::{install_kick_handler, run_vcpu, IoBus, Shared};

/// How long [`Vm::stop`] keeps kicking vCPUs before giving up on joining them.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors booting or operating a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] LayoutError),
    /// Kernel, initramfs or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// vCPU registers could not be set.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The net device could not be created.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A device worker could not be started.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// A block slot operation failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// No such block slot.
    #[error("no block slot {slot} (the VM has {count})")]
    NoSuchSlot {
        /// The requested slot.
        slot: usize,
        /// How many slots exist.
        count: usize,
    },
    /// The VM is not running any more.
    #[error("the VM has exited: {0}")]
    NotRunning(ExitReason),
    /// A host resource (file, eventfd, thread) could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What was being created.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Observes a VM's exit from another thread; valid after the VM is dropped.
#[derive(Clone)]
pub struct ExitWatch(Arc<Shared>);

impl ExitWatch {
    /// Waits up to `timeout` for the VM to stop; returns why it stopped.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.0.wait_exit(timeout)
    }
}

impl fmt::Debug for ExitWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ExitWatch")
            .field(&self.0.exit_reason())
            .finish()
    }
}

/// Whether a VM runs or why it stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmState {
    /// vCPUs are running.
    Running,
    /// The VM stopped.
    Exited(ExitReason),
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// A running microVM. Dropping it stops the VM and releases all its resources.
pub struct Vm {
    config: VmConfig,
    shared: Arc<Shared>,
    vcpus: Vec<JoinHandle<()>>,
    workers: Vec<Worker>,
    threads: Vec<VmThread>,
    blocks: Vec<Arc<Mutex<MmioTransport<BlockDevice>>>>,
    net: Option<Arc<Mutex<MmioTransport<NetDevice>>>>,
    io: Option<Arc<IoBus>>,
    // Dropped last: the VM fd and guest memory.
    vm_fd: Option<VmFd>,
    mem: Option<GuestMemoryMmap>,
    booted_at: Instant,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("vsock_uds", &self.config.vsock_uds)
            .finish()
    }
}

impl Vm {
    /// Boots a VM from `config`; returns once its vCPUs run.
    pub fn boot(config: VmConfig) -> Result<Vm, Error> {
        config.validate()?;
        install_kick_handler().map_err(io_err("install vCPU kick signal handler"))?;
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

        let mem = create_guest_memory(config.mem_mib)?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the Vm keeps until after the
            // VM fd is closed (fields drop in order), so KVM never sees an unmapped host range.
            unsafe { vm_fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let mut vm = Vm {
            config,
            shared: Arc::new(Shared::new()),
            vcpus: Vec::new(),
            workers: Vec::new(),
            threads: Vec::new(),
            blocks: Vec::new(),
            net: None,
            io: None,
            vm_fd: None,
            mem: None,
            booted_at: Instant::now(),
        };
        // From here on, a failure tears down what was started through Drop.
        let mut cmdline = make_cmdline(&vm.config.cmdline)?;
        let mut mmio: Vec<Arc<Mutex<dyn BusDevice>>> = Vec::new();

        let vsock_index = mmio.len();
        let (interrupt, queue_evts) = vm.device_fds(&vm_fd, vsock_index, 3)?;
        let vsock = VsockDevice::new(vm.config.guest_cid, &vm.config.vsock_uds, interrupt.clone())?;
        let vsock = vm.add_device(vsock, "vsock", &mem, interrupt, queue_evts)?;
        mmio.push(vsock);
        for (slot, slot_config) in vm.config.block_slots.clone().iter().enumerate() {
            let index = mmio.len();
            let (interrupt, queue_evts) = vm.device_fds(&vm_fd, index, 1)?;
            let dev = BlockDevice::new(slot, slot_config.read_only, interrupt.clone());
            let transport =
                vm.add_device(dev, &format!("blk{slot}"), &mem, interrupt, queue_evts)?;
            vm.blocks.push(transport.clone());
            mmio.push(transport);
        }
        // Last, so that adding a net device does not move the block slots.
        if let Some(net) = vm.config.net.clone() {
            let index = mmio.len();
            let (interrupt, queue_evts) = vm.device_fds(&vm_fd, index, 2)?;
            let dev = NetDevice::new(net.tap, net.mac, net.mtu, interrupt.clone())?;
            let transport = vm.add_device(dev, "net", &mem, interrupt, queue_evts)?;
            vm.net = Some(transport.clone());
            mmio.push(transport);
        }
        for index in 0..mmio.len() {
            cmdline
                .add_virtio_mmio_device(
                    MMIO_WINDOW,
                    GuestAddress(mmio_addr(index)),
                    VIRTIO_IRQ_BASE + index as u32,
                    None,
                )
                .map_err(BootError::from)?;
        }

        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("create serial irqfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let console = File::create(&vm.config.console_log).map_err(io_err("create console log"))?;
        let io = Arc::new(IoBus {
            serial: Mutex::new(SerialConsole::new(serial_irq, console)),
            mmio,
        });
        vm.io = Some(io.clone());

        let images = load_boot_images(
            &mem,
            &vm.config.kernel,
            vm.config.initramfs.as_deref(),
            &cmdline,
        )?;
        tracing::debug!(
            "kernel entry {:#x}, initramfs {:?}",
            images.entry.raw_value(),
            images.initramfs
        );
        setup_mptable(&mem, vm.config.vcpus)?;
        write_boot_tables(&mem)?;

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let hide_pv_hypercalls = KvmHost::detect().kind == HostKind::Pvm;
        let mut vcpu_fds = Vec::new();
        for id in 0..vm.config.vcpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            setup_vcpu_common(&vcpu, id, vm.config.vcpus, &cpuid, hide_pv_hypercalls)?;
            if id == 0 {
                setup_boot_vcpu(&vcpu, images.entry.raw_value())?;
            }
            vcpu_fds.push(vcpu);
        }
        vm.mem = Some(mem);
        vm.vm_fd = Some(vm_fd);
        vm.booted_at = Instant::now();
        for (id, vcpu) in vcpu_fds.into_iter().enumerate() {
            let (shared, io) = (vm.shared.clone(), io.clone());
            let (handle, thread) =
                thread::spawn(format!("vcpu{id}"), ThreadKind::Vcpu, move || {
                    run_vcpu(id as u8, vcpu, shared, io)
                })
                .map_err(io_err("spawn vCPU thread"))?;
            vm.vcpus.push(handle);
            vm.threads.push(thread);
        }
        vm.shared
            .set_vcpu_threads(vm.vcpus.iter().map(|t| t.as_pthread_t()).collect());
        Ok(vm)
    }

    /// Creates the irqfd (registered for the device's GSI) and the queue-notify ioeventfds.
    fn device_fds(
        &self,
        vm_fd: &VmFd,
        index: usize,
        queues: usize,
    ) -> Result<(Arc<Interrupt>, Vec<EventFd>), Error> {
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(io_err("create irqfd"))?;
        vm_fd
            .register_irqfd(&irqfd, VIRTIO_IRQ_BASE + index as u32)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let mut evts = Vec::new();
        for q in 0..queues {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("create ioeventfd"))?;
            vm_fd
                .register_ioevent(
                    &evt,
                    &IoEventAddress::Mmio(mmio_addr(index) + NOTIFY_REG_OFFSET),
                    q as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            evts.push(evt);
        }
        Ok((Arc::new(Interrupt::new(irqfd)), evts))
    }

    /// Wraps `device` in a transport and starts its worker thread.
    fn add_device<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        name: &str,
        mem: &GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, Error> {
        let clone = |e: &EventFd| e.try_clone().map_err(io_err("clone ioeventfd"));
        let worker_evts = queue_evts
            .iter()
            .map(clone)
            .collect::<Result<Vec<_>, _>>()?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            interrupt,
            queue_evts,
        )));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(io_err("create stop eventfd"))?;
        let shared = self.shared.clone();
        let (thread, info) = worker::spawn(
            format!("virtio-{name}"),
            transport.clone(),
            worker_evts,
            stop.try_clone().map_err(io_err("clone stop eventfd"))?,
            Box::new(move |msg| shared.finish(ExitReason::VmmPanic(msg))),
        )?;
        self.workers.push(Worker { stop, thread });
        self.threads.push(info);
        Ok(transport)
    }

    /// Whether the VM runs, or why it stopped.
    pub fn state(&self) -> VmState {
        match self.shared.exit_reason() {
            None => VmState::Running,
            Some(reason) => VmState::Exited(reason),
        }
    }

    /// Waits up to `timeout` for the VM to stop by itself; returns why it stopped.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.shared.wait_exit(timeout)
    }

    /// A handle that observes this VM's exit without owning the VM (for watcher threads).
    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch(self.shared.clone())
    }

    /// The VM's threads (vCPUs and device workers) with their kernel thread ids, so the embedder
    /// can place them in host cgroups. They live until the VM is stopped.
    pub fn threads(&self) -> &[VmThread] {
        &self.threads
    }

    /// Time since the vCPUs were started.
    pub fn uptime(&self) -> Duration {
        self.booted_at.elapsed()
    }

    /// The host unix socket of the vsock device.
    pub fn vsock_uds(&self) -> &Path {
        &self.config.vsock_uds
    }

    /// The console log file.
    pub fn console_log(&self) -> &Path {
        &self.config.console_log
    }

    /// The configuration the VM booted with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The traffic counters of the net device, if the VM has one (still readable once the guest stopped).
    pub fn net_stats(&self) -> Option<NetStats> {
        self.net.as_ref().map(|t| lock(t).device().stats())
    }

    fn slot(&self, slot: usize) -> Result<&Arc<Mutex<MmioTransport<BlockDevice>>>, Error> {
        if let Some(reason) = self.shared.exit_reason() {
            return Err(Error::NotRunning(reason));
        }
        self.blocks.get(slot).ok_or(Error::NoSuchSlot {
            slot,
            count: self.blocks.len(),
        })
    }

    /// Fills an empty block slot with `path` and tells the guest; returns the capacity in bytes.
    /// The guest sees `/dev/vdX` (serial `slot<N>`) grow from 0 to that size.
    pub fn attach_block(&self, slot: usize, path: &Path, read_only: bool) -> Result<u64, Error> {
        let mut transport = lock(self.slot(slot)?);
        let capacity = transport.device_mut().attach(path, read_only)?;
        transport.notify_config_change();
        tracing::info!(slot, path = %path.display(), capacity, "block slot attached");
        Ok(capacity)
    }

    /// Empties a block slot (the guest must have stopped using the disk); returns the detached file.
    pub fn detach_block(&self, slot: usize) -> Result<PathBuf, Error> {
        let mut transport = lock(self.slot(slot)?);
        let path = transport.device_mut().detach()?;
        transport.notify_config_change();
        tracing::info!(slot, path = %path.display(), "block slot detached");
        Ok(path)
    }

    /// Stops the VM (if still running), joins every thread and releases every resource. Returns why
    /// the VM ended: its own exit reason, or [`ExitReason::Stopped`].
    pub fn stop(mut self) -> ExitReason {
        self.teardown()
    }

    fn teardown(&mut self) -> ExitReason {
        self.shared.finish(ExitReason::Stopped);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.vcpus.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            self.shared.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        self.shared.take_vcpu_threads();
        let mut stuck = false;
        for thread in self.vcpus.drain(..) {
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::error!("vCPU thread did not stop within {STOP_TIMEOUT:?}; detaching it");
                stuck = true;
            }
        }
        for worker in &self.workers {
            let _ = worker.stop.write(1);
        }
        for worker in self.workers.drain(..) {
            let _ = worker.thread.join();
        }
        if let Some(io) = self.io.take() {
            lock(&io.serial).flush();
        }
        self.blocks.clear();
        self.net.take();
        self.vm_fd.take();
        if stuck {
            // A vCPU may still enter the guest: never unmap memory under it.
            std::mem::forget(self.mem.take());
        }
        self.mem.take();
        self.shared.exit_reason().unwrap_or(ExitReason::Stopped)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.vcpus.is_empty() || !self.workers.is_empty() || self.vm_fd.is_some() {
            self.teardown();
        }
    }
}

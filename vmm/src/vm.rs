//! [`Vm`]: boot (the steps are in [`crate::builder`]), block-slot hot-plug, network counters, exit
//! reporting and teardown of one microVM.

use std::fmt;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::BootError;
use crate::builder::{AttachError, Builder, CreateVmError, SerialError, SystemError, VcpuError};
use crate::config::{ConfigError, VmConfig};
use crate::devices::virtio::block::{BlockDevice, BlockError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{NetDevice, NetStats};
use crate::devices::virtio::worker::lock;
use crate::exit::ExitReason;
use crate::thread::VmThread;
use crate::vcpu::{IoBus, Shared};

/// How long [`Vm::stop`] keeps kicking vCPUs before giving up on joining them.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors booting or operating a VM: one variant per boot step (see [`Vm::boot`]), then the block-slot
/// operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The KVM VM or its guest memory could not be created.
    #[error(transparent)]
    CreateVm(#[from] CreateVmError),
    /// A virtio-mmio device could not be attached.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// The serial console could not be attached.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// Kernel, initramfs or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The MP table or the boot page tables could not be written.
    #[error(transparent)]
    System(#[from] SystemError),
    /// The vCPUs could not be created or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
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

/// A device worker thread and the eventfd that stops it.
pub(crate) struct Worker {
    pub(crate) stop: EventFd,
    pub(crate) thread: JoinHandle<()>,
}

/// A running microVM. Dropping it stops the VM and releases all its resources.
///
/// The fields are filled by the boot steps (`builder.rs`).
pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) shared: Arc<Shared>,
    pub(crate) vcpus: Vec<JoinHandle<()>>,
    pub(crate) workers: Vec<Worker>,
    pub(crate) threads: Vec<VmThread>,
    pub(crate) blocks: Vec<Arc<Mutex<MmioTransport<BlockDevice>>>>,
    pub(crate) net: Option<Arc<Mutex<MmioTransport<NetDevice>>>>,
    pub(crate) io: Option<Arc<IoBus>>,
    // Dropped last: the VM fd, then guest memory.
    pub(crate) vm_fd: Option<VmFd>,
    pub(crate) mem: Option<GuestMemoryMmap>,
    pub(crate) booted_at: Instant,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("vsock_uds", &self.config.vsock_uds)
            .finish()
    }
}

impl Vm {
    /// Boots a VM from `config`; returns once its vCPUs run. The steps, in order: validate the config,
    /// create the KVM VM and guest memory, attach vsock, the block slots, the net device and the serial
    /// console, load the kernel, write the boot tables, create and start the vCPUs (`builder.rs`).
    pub fn boot(config: VmConfig) -> Result<Vm, Error> {
        config.validate()?;
        let mut builder = Builder::new(config)?;
        builder.attach_vsock()?;
        builder.attach_block_slots()?;
        builder.attach_net()?;
        let io = builder.attach_serial()?;
        let entry = builder.load_kernel(&io)?;
        builder.configure_system()?;
        let vcpus = builder.create_vcpus(entry)?;
        Ok(builder.start_vcpus(vcpus, io)?)
    }

    /// A VM with nothing attached yet (the first boot step).
    pub(crate) fn new(config: VmConfig) -> Vm {
        Vm {
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
        }
    }

    /// Lets [`Vm::stop`] kick the vCPU threads started so far.
    pub(crate) fn publish_vcpu_threads(&self) {
        self.shared
            .set_vcpu_threads(self.vcpus.iter().map(|t| t.as_pthread_t()).collect());
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

//! A VM pod: a microVM booted in-process (vmm) with the guest agent as PID 1. Boot places the VM's
//! threads in the pod's host cgroups and waits for the agent; the sandbox setup gives the guest its
//! identity and network; images are block slots swapped under the running guest.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pb::AgentClient;
use podvisor_proto as pb;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use vmm::{BlockSlotConfig, ExitReason, ExitWatch, Vm, VmConfig};

use super::net::{Attachment, PodNic};
use super::process::PortStream;
use super::{agent_err, blocking, lock, ImageDisk, Pod, PodError};
use crate::cgroups::PodCgroups;

/// Bytes of the console log quoted in boot errors.
const CONSOLE_TAIL: usize = 2048;

fn console_tail(path: &Path) -> String {
    let log = std::fs::read(path).unwrap_or_default();
    let start = log.len().saturating_sub(CONSOLE_TAIL);
    String::from_utf8_lossy(&log[start..]).into_owned()
}

/// The guest every VM pod boots: kernel, initramfs, command line, devices, agent deadline.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// Guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Image block slots per VM (distinct images a pod can run).
    pub image_slots: u32,
    /// How long a booting VM has to bring its agent up.
    pub boot_timeout: Duration,
    /// The guest kernel runs without XSAVE (the command line has `noxsave`): programs must avoid AVX
    /// (`CreateSandboxRequest.avoid_avx`).
    pub avoid_avx: bool,
}

/// What one pod VM is made of.
pub struct VmShape {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// The pod's directory (console log).
    pub dir: PathBuf,
    /// The host end of the VM's vsock device.
    pub vsock: PathBuf,
    /// The network device.
    pub nic: Option<PodNic>,
    /// Host cgroups its threads join as soon as they exist.
    pub cgroups: Option<PodCgroups>,
}

/// A running pod VM.
pub struct VmPod {
    vm: Arc<Mutex<Option<Vm>>>,
    /// The host end of the VM's vsock device (hybrid vsock).
    vsock: PathBuf,
    agent: AgentClient<Channel>,
    exit: ExitWatch,
    stopping: AtomicBool,
    avoid_avx: bool,
}

impl VmPod {
    /// Boots a VM of `shape`, places its threads in the pod's host cgroups, and waits for its agent.
    pub async fn boot(guest: &GuestConfig, shape: VmShape) -> Result<VmPod, PodError> {
        let started = std::time::Instant::now();
        let result = Self::boot_vm(guest, shape).await;
        crate::metrics::METRICS.boot(&result, started.elapsed());
        result
    }

    async fn boot_vm(guest: &GuestConfig, shape: VmShape) -> Result<VmPod, PodError> {
        let vm_config = VmConfig {
            vcpus: shape.vcpus,
            mem_mib: shape.mem_mib,
            kernel: guest.kernel.clone(),
            initramfs: Some(guest.initramfs.clone()),
            cmdline: guest.cmdline.clone(),
            console_log: shape.dir.join("console.log"),
            vsock_uds: shape.vsock.clone(),
            guest_cid: 3,
            block_slots: (0..guest.image_slots)
                .map(|_| BlockSlotConfig { read_only: true })
                .collect(),
            net: shape.nic.map(|n| n.device),
        };
        let console = vm_config.console_log.clone();
        let cgroups = shape.cgroups;
        let vm = blocking("boot", move || {
            let vm = Vm::boot(vm_config).map_err(PodError::Boot)?;
            if let Some(cgroups) = cgroups {
                // On failure the VM is dropped, which stops it.
                cgroups.place(vm.threads())?;
            }
            Ok::<_, PodError>(vm)
        })
        .await?;
        let exit = vm.exit_watch();
        let agent = tokio::select! {
            agent = pb::client::wait_for_agent(&shape.vsock, guest.boot_timeout) => {
                agent.map_err(|source| PodError::AgentStart { source, console: String::new() })
            }
            reason = wait_exit(exit.clone()) => {
                Err(PodError::BootExit { reason, console: String::new() })
            }
        };
        match agent {
            Ok(agent) => Ok(VmPod {
                vm: Arc::new(Mutex::new(Some(vm))),
                vsock: shape.vsock,
                agent,
                exit,
                stopping: AtomicBool::new(false),
                avoid_avx: guest.avoid_avx,
            }),
            Err(mut e) => {
                let _ = tokio::task::spawn_blocking(move || vm.stop()).await;
                if let PodError::AgentStart { console: tail, .. }
                | PodError::BootExit { console: tail, .. } = &mut e
                {
                    *tail = console_tail(&console);
                }
                Err(e)
            }
        }
    }

    /// Gives the guest its identity (hostname, DNS, sysctls, clock, entropy: `sandbox`; whether it may
    /// use AVX, from the guest config) and its network interface and routes from the pod's CNI
    /// `attachment`.
    pub async fn set_up(
        &self,
        mut sandbox: pb::CreateSandboxRequest,
        attachment: &Attachment,
    ) -> Result<(), PodError> {
        sandbox.avoid_avx = self.avoid_avx;
        self.agent()
            .create_sandbox(sandbox)
            .await
            .map_err(agent_err("CreateSandbox"))?;
        super::net::configure_guest(&mut self.agent(), attachment).await
    }

    /// Runs `f` on the VM (block slot changes) off the async threads.
    async fn with_vm<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Vm) -> Result<T, vmm::Error> + Send + 'static,
    ) -> Result<T, PodError> {
        let vm = self.vm.clone();
        blocking("VM", move || match lock(&vm).as_ref() {
            Some(vm) => f(vm).map_err(|source| PodError::Vm { op, source }),
            None => Err(PodError::Stopped),
        })
        .await
    }
}

#[async_trait::async_trait]
impl Pod for VmPod {
    fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }

    async fn stop(&self) -> Option<String> {
        self.stopping.store(true, Ordering::SeqCst);
        let vm = lock(&self.vm).take()?;
        let reason = tokio::task::spawn_blocking(move || vm.stop()).await.ok()?;
        Some(reason.to_string())
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    async fn wait_unexpected_exit(&self) -> Option<String> {
        let reason = wait_exit(self.exit.clone()).await;
        (!self.stopping()).then(|| reason.to_string())
    }

    async fn add_image(&self, slot: u32, image: &ImageDisk) -> Result<(), PodError> {
        let path = image.path.clone();
        self.with_vm("attach block", move |vm| {
            vm.attach_block(slot as usize, &path, true)
        })
        .await?;
        self.agent()
            .add_storage(pb::AddStorageRequest {
                id: image.storage_id.clone(),
                block_slot: slot,
                fstype: image.fstype.clone(),
                read_only: true,
                mount_point: None,
                image_path: None,
                timeout_ms: pb::DEFAULT_STORAGE_TIMEOUT_MS,
            })
            .await
            .map_err(agent_err("AddStorage"))?;
        Ok(())
    }

    async fn remove_image(&self, slot: u32, storage_id: &str) -> Result<(), PodError> {
        super::remove_storage(self.agent(), storage_id).await?;
        if let Err(e) = self
            .with_vm("detach block", move |vm| vm.detach_block(slot as usize))
            .await
        {
            tracing::info!(slot, "detach: {e}");
        }
        Ok(())
    }

    async fn port_forward(&self, port: u16) -> Result<PortStream, PodError> {
        let failed = |why: String| PodError::PortForward { port, why };
        let (vsock, _) = pb::client::hybrid_vsock_connect(&self.vsock, pb::PORT_FORWARD_VSOCK_PORT)
            .await
            .map_err(|e| failed(format!("reaching the pod VM: {e}")))?;
        let mut vsock = tokio::io::BufStream::new(vsock);
        vsock
            .write_all(format!("PORT {port}\n").as_bytes())
            .await
            .and(vsock.flush().await)
            .map_err(|e| failed(format!("request: {e}")))?;
        let mut reply = String::new();
        vsock
            .read_line(&mut reply)
            .await
            .map_err(|e| failed(format!("reply: {e}")))?;
        match reply.trim_end().strip_prefix("ERR ") {
            Some(why) => Err(failed(why.to_string())),
            None if reply.trim_end() != "OK" => Err(failed(format!("unexpected reply {reply:?}"))),
            None => Ok(Box::new(vsock)),
        }
    }
}

/// Waits for the VM behind `exit` to stop, polling in a blocking thread.
async fn wait_exit(exit: ExitWatch) -> ExitReason {
    loop {
        let e = exit.clone();
        match tokio::task::spawn_blocking(move || e.wait_timeout(Duration::from_secs(1))).await {
            Ok(Some(reason)) => return reason,
            Ok(None) => {}
            Err(e) => return ExitReason::VmmPanic(format!("exit watch: {e}")),
        }
    }
}

//! What exists only while the daemon runs: a pod's VM and agent connection, a container's exit watch
//! and log copiers. The state store has the durable half of each.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use pb::AgentClient;
use podvisor_proto as pb;
use tokio::sync::watch;
use tonic::transport::Channel;
use vmm::{BlockSlotConfig, ExitReason, ExitWatch, Vm, VmConfig};

use super::{lock, ManagerConfig, SandboxError};
use crate::cgroups::PodCgroups;
use crate::logs::{LogWriter, Stream};

/// A running pod VM.
pub struct LivePod {
    vm: Mutex<Option<Vm>>,
    /// The host end of the VM's vsock device (hybrid vsock).
    pub vsock: std::path::PathBuf,
    /// The agent client (one HTTP/2 connection, cheap to clone).
    pub agent: AgentClient<Channel>,
    exit: ExitWatch,
    stopping: AtomicBool,
}

/// Bytes of the console log quoted in boot errors.
const CONSOLE_TAIL: usize = 2048;

fn console_tail(path: &Path) -> String {
    let log = std::fs::read(path).unwrap_or_default();
    let start = log.len().saturating_sub(CONSOLE_TAIL);
    String::from_utf8_lossy(&log[start..]).into_owned()
}

/// What a pod VM is made of besides the manager's settings.
pub struct VmShape {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// The network device.
    pub net: Option<vmm::NetConfig>,
    /// Host cgroups its threads join as soon as they exist.
    pub cgroups: Option<PodCgroups>,
}

impl LivePod {
    /// Boots a VM with its console log in `dir` and its vsock socket at `vsock`, places its threads
    /// in the pod's host cgroups, and waits for its agent.
    pub async fn boot(
        config: &ManagerConfig,
        dir: &Path,
        vsock: &Path,
        shape: VmShape,
    ) -> Result<LivePod, SandboxError> {
        let started = std::time::Instant::now();
        let result = Self::boot_vm(config, dir, vsock, shape).await;
        crate::metrics::METRICS.boot(&result, started.elapsed());
        result
    }

    async fn boot_vm(
        config: &ManagerConfig,
        dir: &Path,
        vsock: &Path,
        shape: VmShape,
    ) -> Result<LivePod, SandboxError> {
        let vm_config = VmConfig {
            vcpus: shape.vcpus,
            mem_mib: shape.mem_mib,
            kernel: config.kernel.clone(),
            initramfs: Some(config.initramfs.clone()),
            cmdline: config.cmdline.clone(),
            console_log: dir.join("console.log"),
            vsock_uds: vsock.to_path_buf(),
            guest_cid: 3,
            block_slots: (0..config.image_slots)
                .map(|_| BlockSlotConfig { read_only: true })
                .collect(),
            net: shape.net,
        };
        let uds = vm_config.vsock_uds.clone();
        let console = vm_config.console_log.clone();
        let cgroups = shape.cgroups;
        let vm = tokio::task::spawn_blocking(move || {
            let vm = Vm::boot(vm_config).map_err(|e| SandboxError::Vm(format!("boot: {e}")))?;
            if let Some(cgroups) = cgroups {
                // On failure the VM is dropped, which stops it.
                cgroups.place(vm.threads())?;
            }
            Ok::<_, SandboxError>(vm)
        })
        .await
        .map_err(|e| SandboxError::Vm(format!("boot task: {e}")))??;
        let exit = vm.exit_watch();
        let agent = tokio::select! {
            agent = pb::client::wait_for_agent(&uds, config.boot_timeout) => agent.map_err(|e| e.to_string()),
            reason = wait_exit(exit.clone()) => Err(format!("the VM stopped while booting: {reason}")),
        };
        match agent {
            Ok(agent) => Ok(LivePod {
                vm: Mutex::new(Some(vm)),
                vsock: uds,
                agent,
                exit,
                stopping: AtomicBool::new(false),
            }),
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || vm.stop()).await;
                Err(SandboxError::Vm(format!(
                    "{e}; console tail:\n{}",
                    console_tail(&console)
                )))
            }
        }
    }

    /// A clone of the agent client.
    pub fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }

    /// Waits until the VM stops by itself. Returns None if the host stopped it.
    pub async fn wait_unexpected_exit(&self) -> Option<ExitReason> {
        let reason = wait_exit(self.exit.clone()).await;
        (!self.stopping.load(Ordering::SeqCst)).then_some(reason)
    }

    /// Whether the host is stopping (or has stopped) the VM: calls failing now are expected.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Runs `f` on the VM (block slot changes) off the async threads.
    pub async fn with_vm<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        f: impl FnOnce(&Vm) -> Result<T, vmm::Error> + Send + 'static,
    ) -> Result<T, SandboxError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || match lock(&me.vm).as_ref() {
            Some(vm) => f(vm).map_err(|e| SandboxError::Vm(e.to_string())),
            None => Err(SandboxError::FailedPrecondition(
                "the pod VM is stopped".into(),
            )),
        })
        .await
        .map_err(|e| SandboxError::Vm(format!("VM task: {e}")))?
    }

    /// Stops the VM (idempotent); returns why it ended.
    pub async fn stop(self: &std::sync::Arc<Self>) -> Option<ExitReason> {
        self.stopping.store(true, Ordering::SeqCst);
        let vm = lock(&self.vm).take()?;
        tokio::task::spawn_blocking(move || vm.stop()).await.ok()
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

/// Output chunks of a container's main process kept for late attach subscribers.
const OUTPUT_BACKLOG: usize = 256;

/// A container known to the running daemon: its exit watch, its log and its output for attach.
pub struct LiveContainer {
    exited: watch::Sender<bool>,
    /// The CRI log file, if kubelet asked for one.
    pub log: Option<LogWriter>,
    output: tokio::sync::broadcast::Sender<(Stream, bytes::Bytes)>,
    copiers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl LiveContainer {
    /// A container not yet exited.
    pub fn new(log: Option<LogWriter>) -> LiveContainer {
        LiveContainer {
            exited: watch::channel(false).0,
            log,
            output: tokio::sync::broadcast::channel(OUTPUT_BACKLOG).0,
            copiers: Mutex::default(),
        }
    }

    /// Marks the container exited and wakes every waiter.
    pub fn set_exited(&self) {
        self.exited.send_replace(true);
    }

    /// Waits up to `timeout` for the exit; returns whether it happened.
    pub async fn wait_exited(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|e| *e)).await;
        waited.is_ok()
    }

    /// Whether the container has exited.
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// A receiver of the main process's output from now on (CRI Attach).
    pub fn subscribe_output(&self) -> tokio::sync::broadcast::Receiver<(Stream, bytes::Bytes)> {
        self.output.subscribe()
    }

    /// Copies the main process's output streams from the agent into the log file (if any) and to
    /// attached clients, until they end.
    pub fn start_log_copiers(&self, agent: &AgentClient<Channel>, container_id: &str, tty: bool) {
        let streams: &[(pb::OutputStream, Stream)] = if tty {
            &[(pb::OutputStream::Stdout, Stream::Stdout)]
        } else {
            &[
                (pb::OutputStream::Stdout, Stream::Stdout),
                (pb::OutputStream::Stderr, Stream::Stderr),
            ]
        };
        let mut copiers = lock(&self.copiers);
        for &(which, stream) in streams {
            let mut agent = agent.clone();
            let log = self.log.clone();
            let output = self.output.clone();
            let req = pb::ReadOutputRequest {
                container_id: container_id.into(),
                exec_id: String::new(),
                stream: which.into(),
            };
            let id = container_id.to_string();
            copiers.push(tokio::spawn(async move {
                match agent.read_output(req).await {
                    Ok(resp) => {
                        let mut s = resp.into_inner();
                        loop {
                            match s.message().await {
                                Ok(Some(chunk)) => {
                                    let data = bytes::Bytes::from(chunk.data);
                                    if let Some(Err(e)) =
                                        log.as_ref().map(|l| l.write(stream, &data))
                                    {
                                        tracing::warn!(container = %id, "log write: {e}");
                                    }
                                    let _ = output.send((stream, data));
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::info!(container = %id, "output stream ended: {e}");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(container = %id, "read_output: {e}"),
                }
                if let Some(Err(e)) = log.as_ref().map(|l| l.finish(stream)) {
                    tracing::warn!(container = %id, "log finish: {e}");
                }
            }));
        }
    }

    /// Waits up to `timeout` for the log copiers to drain the streams (they end at the process exit).
    pub async fn drain_logs(&self, timeout: Duration) {
        let copiers: Vec<_> = std::mem::take(&mut *lock(&self.copiers));
        for mut c in copiers {
            if tokio::time::timeout(timeout, &mut c).await.is_err() {
                c.abort();
            }
        }
    }
}

impl Drop for LiveContainer {
    fn drop(&mut self) {
        for c in lock(&self.copiers).iter() {
            c.abort();
        }
    }
}

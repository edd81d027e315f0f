//! The daemon: binds the CRI socket and serves until SIGTERM or SIGINT.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cgroups::CgroupConfig;
use crate::defaults;
use crate::images::{open_db, open_store, ImageArgs, Images, OpenError};
use crate::runtime::Runtime;
use crate::sandbox::{Manager, ManagerConfig};
use crate::state::StateStore;
use crate::streaming::StreamingServer;
use std::sync::Arc;

/// Daemon flags.
#[derive(clap::Args, Clone, Debug)]
pub struct DaemonArgs {
    /// Configuration file (TOML; every key is a flag of this list, flags win). Read if it exists.
    #[arg(long, default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// CRI unix socket.
    #[arg(long, default_value = defaults::SOCKET)]
    pub socket: PathBuf,
    /// State directory.
    #[arg(long, default_value = defaults::STATE_DIR)]
    pub state_dir: PathBuf,
    /// Runtime directory (VM sockets).
    #[arg(long, default_value = defaults::RUN_DIR)]
    pub run_dir: PathBuf,
    /// Directory holding the guest vmlinux and initramfs.cpio.
    #[arg(long, default_value = defaults::GUEST_DIR)]
    pub guest_dir: PathBuf,
    /// Address of the streaming server (Exec/Attach/PortForward URLs); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub streaming_addr: std::net::SocketAddr,
    /// Address of the Prometheus endpoint (`GET /metrics`); `""` turns it off.
    #[arg(long, default_value = defaults::METRICS_ADDR, value_parser = optional_addr)]
    pub metrics_addr: OptionalAddr,
    /// OTLP/gRPC collector the daemon's spans are exported to (`http://HOST:4317`); `""` turns export
    /// off.
    #[arg(long, default_value = "")]
    pub otlp_endpoint: String,
    /// Image store settings.
    #[command(flatten)]
    pub images: ImageArgs,
    /// Pod VM settings.
    #[command(flatten)]
    pub pods: PodArgs,
    /// Pod network settings.
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Host cgroup settings.
    #[command(flatten)]
    pub cgroups: CgroupArgs,
}

/// Host cgroup flags (where pod VM threads are placed).
#[derive(clap::Args, Clone, Debug)]
pub struct CgroupArgs {
    /// Place pod VM threads in host cgroups: vCPUs in `<cgroup_parent>/podvisor-<pod id>` with the
    /// pod's CPU limits, device threads in the overhead cgroup (needs cgroup v1 controllers).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub host_cgroups: bool,
    /// Put device threads in the sandbox cgroup too (no overhead cgroup), as Kata's
    /// `sandbox_cgroup_only`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub sandbox_cgroup_only: bool,
    /// Parent of the per-pod overhead cgroups (device threads): a cgroup path or a systemd slice.
    #[arg(long, default_value = "/podvisor_overhead")]
    pub overhead_cgroup: String,
    /// Parent of the sandbox cgroups of pods that give no `cgroup_parent`.
    #[arg(long, default_value = "/podvisor")]
    pub default_cgroup_parent: String,
}

impl CgroupArgs {
    /// The settings as given.
    pub fn settings(&self) -> CgroupConfig {
        CgroupConfig {
            enabled: self.host_cgroups,
            sandbox_cgroup_only: self.sandbox_cgroup_only,
            default_parent: self.default_cgroup_parent.clone(),
            overhead_parent: self.overhead_cgroup.clone(),
        }
    }

    /// The manager's settings; host cgroups are off (with a warning) where the host cannot have them.
    pub fn config(&self) -> CgroupConfig {
        let mut config = self.settings();
        if config.enabled {
            if let Some(why) = crate::cgroups::unsupported() {
                tracing::warn!("pod VM threads stay in the daemon's cgroups: {why}");
                config.enabled = false;
            }
        }
        config
    }
}

/// A listen address that may be turned off (`""`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<std::net::SocketAddr>);

fn optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s.is_empty() {
        return Ok(OptionalAddr(None));
    }
    s.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|e| format!("{e} (expected IP:PORT, or \"\" to turn it off)"))
}

/// Pod network flags (CNI).
#[derive(clap::Args, Clone, Debug)]
pub struct NetworkArgs {
    /// CNI network configuration directory; its lexically first `.conflist`, `.conf` or `.json` file
    /// is the pod network.
    #[arg(long, default_value = defaults::CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    /// Directories searched for CNI plugin binaries, in order (repeat the flag to give several).
    #[arg(long = "cni-bin-dir", default_values = defaults::CNI_BIN_DIRS)]
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Where pod network namespaces are bind-mounted (`ip netns` lists `/run/netns`).
    #[arg(long, default_value = defaults::NETNS_DIR)]
    pub netns_dir: PathBuf,
}

/// Pod VM flags.
#[derive(clap::Args, Clone, Debug)]
pub struct PodArgs {
    /// Image block slots per pod VM (distinct images one pod can run); each costs guest boot time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub image_slots: u32,
    /// Seconds a pod VM has to boot its agent.
    #[arg(long, default_value_t = 600)]
    pub boot_timeout_secs: u64,
    /// Guest memory of a pod without memory limits, MiB.
    #[arg(long, default_value_t = 512)]
    pub default_pod_memory_mib: u32,
    /// Guest memory added to a pod's memory limits for its guest kernel and agent, MiB.
    #[arg(long, default_value_t = 128)]
    pub guest_overhead_mib: u32,
    /// Size cap of each container's writable layer (tmpfs in the guest), MiB.
    #[arg(long, default_value_t = 256)]
    pub writable_layer_mib: u64,
    /// Pods that share the node's network, PID or IPC namespace (kube-proxy, CNI agents, CSI node
    /// plugins) and pods of the `native` runtime handler: run them natively on the node, without a VM
    /// (`native`), or refuse them (`refuse`: a VM-only node).
    #[arg(long, value_enum, default_value_t = HostPods::Native)]
    pub host_pods: HostPods,
}

/// What the daemon does with pods a VM cannot run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPods {
    /// Run them on the node with the pod agent's container engine: no VM boundary.
    Native,
    /// Refuse them (hostNetwork: InvalidArgument; host PID or IPC: Unimplemented; `native`: NotFound).
    Refuse,
}

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A directory or the socket could not be prepared.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another process serves the socket.
    #[error("{0} is in use by another running daemon")]
    SocketInUse(PathBuf),
    /// The image store could not be opened.
    #[error("image store: {0}")]
    Images(#[from] OpenError),
    /// The pod state could not be opened.
    #[error("pod state: {0}")]
    State(#[from] crate::state::StateError),
    /// The host cgroups configured for pods are unusable.
    #[error("host cgroups: {0}")]
    Cgroups(#[source] crate::cgroups::CgroupError),
    /// Reconciling the pods of the previous run failed.
    #[error("reconciling pods: {0}")]
    Reconcile(#[source] crate::sandbox::SandboxError),
    /// The streaming server could not start.
    #[error(transparent)]
    Streaming(#[from] crate::streaming::StreamingError),
    /// The metrics address could not be bound.
    #[error("metrics address {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
    /// Telemetry could not be set up.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The gRPC server failed.
    #[error("CRI server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Binds `socket`, replacing a stale socket file but never a live one or a non-socket file.
pub fn bind(socket: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if !meta.file_type().is_socket() {
            return Err(DaemonError::Io {
                path: socket.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                ),
            });
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(DaemonError::SocketInUse(socket.to_owned()));
        }
        std::fs::remove_file(socket).map_err(io_err(socket))?;
    }
    let listener = UnixListener::bind(socket).map_err(io_err(socket))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err(socket))?;
    Ok(listener)
}

fn manager_config(args: &DaemonArgs) -> ManagerConfig {
    let p = &args.pods;
    let host = vmm::KvmHost::detect();
    ManagerConfig {
        guest: crate::pod::vm::GuestConfig {
            kernel: args.guest_dir.join("vmlinux"),
            initramfs: args.guest_dir.join("initramfs.cpio"),
            cmdline: vmm::default_cmdline(&host),
            image_slots: p.image_slots,
            boot_timeout: std::time::Duration::from_secs(p.boot_timeout_secs),
            // Decided with the command line: `noxsave` there means no AVX in the guest.
            avoid_avx: host.guest_xsave_disabled(),
        },
        pods_dir: args.state_dir.join("pods"),
        run_dir: args.run_dir.clone(),
        default_mem_mib: p.default_pod_memory_mib,
        guest_overhead_mib: p.guest_overhead_mib,
        writable_layer_bytes: p.writable_layer_mib << 20,
        network: crate::network::NetworkConfig {
            conf_dir: args.network.cni_conf_dir.clone(),
            bin_dirs: args.network.cni_bin_dirs.clone(),
            netns_dir: args.network.netns_dir.clone(),
            ..Default::default()
        },
        cgroups: args.cgroups.config(),
        native: crate::pod::native::NativeConfig {
            enabled: p.host_pods == HostPods::Native,
            agent: args.guest_dir.join("podvisor-agent"),
            start_timeout: std::time::Duration::from_secs(60),
        },
    }
}

async fn serve(args: DaemonArgs) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&args.state_dir).map_err(io_err(&args.state_dir))?;
    let db = open_db(&args.state_dir)?;
    let store = open_store(&db, &args.state_dir, &args.images)?;
    let state = StateStore::open(&db)?;
    let config = manager_config(&args);
    config.cgroups.validate().map_err(DaemonError::Cgroups)?;
    let manager = Manager::new(config, state, store.clone());
    let touched = manager.reconcile().await.map_err(DaemonError::Reconcile)?;
    if touched > 0 {
        tracing::info!(pods = touched, "reconciled pods left by the previous run");
    }
    let _release_retrier = AbortOnDrop(manager.spawn_release_retrier());
    let images = Images::new(store);
    let _metrics = match args.metrics_addr.0 {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| DaemonError::Metrics(addr, e))?;
            let bound = listener
                .local_addr()
                .map_err(|e| DaemonError::Metrics(addr, e))?;
            tracing::info!(addr = %bound, "metrics endpoint (GET /metrics) listening");
            Some(AbortOnDrop(tokio::spawn(crate::metrics::serve(
                listener,
                manager.store().clone(),
            ))))
        }
        None => None,
    };
    let listener = bind(&args.socket)?;
    tracing::info!(socket = %args.socket.display(), state = %args.state_dir.display(), "podvisor serving CRI v1");
    let streaming =
        StreamingServer::start(args.streaming_addr, crate::sandbox::backend(&manager)).await?;
    tracing::info!(addr = %streaming.addr(), "streaming server (exec, attach, port-forward) listening");
    let pods = manager.clone();
    let runtime = Runtime::new(args.guest_dir.clone(), manager, Arc::new(streaming));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    let result = tonic::transport::Server::builder()
        .layer(crate::telemetry::CriLayer)
        .add_service(RuntimeServiceServer::new(runtime))
        .add_service(ImageServiceServer::new(images))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&args.socket);
    // VM pods end with this process; native pods' agents are processes of their own.
    pods.stop_native_pods().await;
    Ok(result?)
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the daemon to completion.
pub fn run(args: DaemonArgs) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podvisor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _runtime = rt.enter();
        match crate::telemetry::init("info", Some(&args.otlp_endpoint)) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("podvisor: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let result = rt.block_on(serve(args));
    // Spans still buffered go out while the runtime (the exporter's gRPC client) runs.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podvisor: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_sockets_are_replaced_but_live_ones_and_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/podvisor.sock");
        let live = bind(&sock).unwrap();
        assert!(matches!(bind(&sock), Err(DaemonError::SocketInUse(_))));
        drop(live);
        // The file stays behind after the listener is gone: stale, so it is replaced.
        assert!(sock.exists());
        let _again = bind(&sock).unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(DaemonError::Io { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}

//! podvisor-agent: PID 1 of every pod VM. Mounts the basics, then serves `podvisor.agent.v1.Agent` on vsock
//! port [`AGENT_VSOCK_PORT`]. It never exits on an error: it logs to the console and keeps running, or, when
//! it cannot serve at all, reboots (which stops the VM).
#![warn(missing_docs)]

mod container;
mod copy;
mod engine;
mod events;
mod exits;
mod files;
mod init;
mod netdev;
mod network;
mod node;
mod portforward;
mod sandbox;
mod server;
mod service;
mod storage;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podvisor_proto::{AGENT_VSOCK_PORT, PORT_FORWARD_VSOCK_PORT};
use tokio::sync::Notify;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

use crate::container::spec::PodContext;
use crate::container::{ContainerManager, Paths};
use crate::engine::EngineClient;
use crate::exits::Exits;
use crate::node::NodeArgs;
use crate::sandbox::Sandbox;
use crate::server::Listener;
use crate::service::{AgentService, BootInfo};
use crate::storage::StorageManager;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long to keep retrying the vsock bind (the device may not be there yet) before giving up.
const BIND_RETRY_FOR: Duration = Duration::from_secs(60);
/// Pause between bind attempts.
const BIND_RETRY_EVERY: Duration = Duration::from_millis(500);
/// How often a failed server is restarted before the agent gives up.
const SERVER_RESTARTS: u32 = 3;
/// Time for the Shutdown reply to reach the host before the VM goes down.
const SHUTDOWN_FLUSH_DELAY: Duration = Duration::from_millis(200);

/// Errors that stop the agent from serving.
#[derive(Debug, thiserror::Error)]
enum AgentError {
    /// The tokio runtime could not be built.
    #[error("building the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The vsock port could not be bound.
    #[error("binding vsock port {port} failed for {waited:?}, last error: {source}")]
    Bind {
        port: u32,
        waited: Duration,
        source: std::io::Error,
    },
    /// A node agent could not set itself up (subreaper, its directory, its socket).
    #[error("preparing the node agent: {0}")]
    Node(#[source] std::io::Error),
    /// The gRPC server failed too often.
    #[error("the gRPC server failed {restarts} times, last error: {source}")]
    Serve {
        restarts: u32,
        source: server::ServerError,
    },
}

/// Writes one line to the console (stderr). Never fails: PID 1 must not die of a log line.
pub(crate) fn log(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "podvisor-agent: {msg}");
}

/// Logs `err` and stops: reboots the VM as PID 1, exits otherwise.
fn fatal(pid1: bool, err: &AgentError) -> ! {
    log(&format!("fatal: {err}"));
    if pid1 {
        log("rebooting");
        init::reboot()
    }
    std::process::exit(1)
}

fn main() {
    let started = Instant::now();
    // As PID 1 the arguments are the kernel command line's leftovers (`noxsave`...), never a mode.
    let node = match std::process::id() {
        1 => None,
        _ => NodeArgs::parse(std::env::args_os().skip(1)).unwrap_or_else(|e| {
            log(&e.to_string());
            std::process::exit(2)
        }),
    };
    if let Some(n) = &node {
        if n.mode == node::Mode::Sweep {
            let errors = node::sweep(n);
            for e in &errors {
                log(e);
            }
            std::process::exit(i32::from(!errors.is_empty()))
        }
        if node::lifeline_already_closed() {
            log("the daemon is gone (lifeline closed) before the pod started: exiting");
            std::process::exit(0)
        }
        // While the process has one thread.
        if let Err(e) = node::enter_namespaces(n) {
            log(&e.to_string());
            std::process::exit(1)
        }
    }
    let pid1 = node.is_none() && std::process::id() == 1;
    if pid1 {
        if let Err(err) = init::leave_rootfs() {
            log(&format!("{err}; containers cannot pivot_root"));
        }
        for err in init::mount_early() {
            log(&err.to_string());
        }
        if let Err(err) = init::ensure_console() {
            log(&err.to_string());
        }
        if let Err(err) = init::setup_cgroups() {
            log(&err.to_string());
        }
    }
    // Before any thread exists: the engine must be forked from a single-threaded process.
    let paths = node.as_ref().map_or_else(Paths::system, NodeArgs::paths);
    let engine = engine::spawn(&paths.engine_state)
        .map_err(|e| log(&format!("{e}; containers are unavailable")))
        .ok();
    let boot_to_agent_start_ms = init::kernel_uptime_ms()
        .map_err(|e| log(&e.to_string()))
        .ok();
    let kernel_release = init::kernel_release().unwrap_or_else(|e| {
        log(&e.to_string());
        String::new()
    });
    log(&format!(
        "{VERSION} starting: pid {}, kernel {kernel_release}, uptime {} ms",
        std::process::id(),
        boot_to_agent_start_ms.map_or("?".into(), |ms| ms.to_string())
    ));
    let boot = Arc::new(BootInfo {
        started,
        kernel_release,
        boot_to_agent_start_ms,
        boot_to_ready_ms: 0.into(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let err = match runtime {
        Ok(rt) => rt.block_on(run(pid1, boot, engine, paths, node)),
        Err(e) => AgentError::Runtime(e),
    };
    fatal(pid1, &err)
}

/// Serves until the server cannot be kept up; returns why.
async fn run(
    pid1: bool,
    boot: Arc<BootInfo>,
    engine: Option<std::os::fd::OwnedFd>,
    paths: Paths,
    node: Option<NodeArgs>,
) -> AgentError {
    let (storage, sandbox) = match &node {
        None => (StorageManager::system(), Sandbox::system()),
        Some(n) => (
            StorageManager::node(n.storage_dir()),
            Sandbox::node(n.sandbox_dir()),
        ),
    };
    let (storage, sandbox) = (Arc::new(storage), Arc::new(sandbox));
    let shutdown = Arc::new(Notify::new());
    let exits = Arc::new(Exits::default());
    {
        let exits = exits.clone();
        tokio::spawn(async move {
            if let Err(err) = exits.run().await {
                log(&format!("installing the SIGCHLD handler: {err}"));
            }
        });
    }
    let mut service = AgentService::new(boot.clone(), storage.clone(), shutdown.clone());
    if node.is_none() {
        service = with_guest_network(service).await;
    }
    match engine.map(EngineClient::new).transpose() {
        Ok(Some(engine)) => {
            let mut pod = PodContext::guest(sandbox.files_dir().to_path_buf());
            if node.is_some() {
                // A native pod binds the node's paths, as runc does (the daemon checked them).
                pod.bind_roots.clear();
            }
            let manager = ContainerManager::new(Arc::new(engine), exits, storage, paths, pod);
            service = service.with_containers(Arc::new(manager), sandbox);
        }
        Ok(None) => {}
        Err(err) => log(&format!(
            "container engine channel: {err}; containers are unavailable"
        )),
    }
    tokio::spawn(shutdown_when_asked(pid1, shutdown.clone(), service.clone()));
    match node {
        Some(node) => serve_on_node(&node, service, shutdown).await,
        None => serve_in_guest(&boot, service).await,
    }
}

/// Adds the guest's network configuration and port forwarder.
async fn with_guest_network(service: AgentService) -> AgentService {
    match bind_with_retry(PORT_FORWARD_VSOCK_PORT).await {
        Ok(listener) => {
            tokio::spawn(portforward::serve(listener));
        }
        Err(err) => log(&format!("port forwarding is unavailable: {err}")),
    }
    match network::Network::new() {
        Ok(network) => {
            if let Err(err) = network.loopback_up().await {
                log(&format!("loopback: {err}"));
            }
            service.with_network(Arc::new(network))
        }
        Err(err) => {
            log(&format!("{err}; network configuration is unavailable"));
            service
        }
    }
}

/// A native pod's agent: serves on its unix socket until the lifeline closes, then tears the pod down.
async fn serve_on_node(
    node: &NodeArgs,
    service: AgentService,
    shutdown: Arc<Notify>,
) -> AgentError {
    let listener = match node::prepare(node) {
        Ok(listener) => Listener::Unix(listener),
        Err(e) => return AgentError::Node(e),
    };
    // The daemon gone, or the agent told to stop (a service manager's SIGTERM): remove the pod.
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            node::lifeline_closed().await;
            log("the daemon is gone (lifeline closed): removing the pod");
            shutdown.notify_one();
            return;
        };
        type Why = std::pin::Pin<Box<dyn std::future::Future<Output = &'static str> + Send>>;
        let whys: Vec<Why> = vec![
            Box::pin(async {
                node::lifeline_closed().await;
                "the daemon is gone (lifeline closed)"
            }),
            Box::pin(async move {
                term.recv().await;
                "SIGTERM"
            }),
            Box::pin(async move {
                int.recv().await;
                "SIGINT"
            }),
        ];
        let (why, _, _) = futures_util::future::select_all(whys).await;
        log(&format!("{why}: removing the pod"));
        shutdown.notify_one();
    });
    log(&format!(
        "{VERSION} ready on {} (native pod)",
        node.socket().display()
    ));
    let source = server::serve(&listener, service).await;
    AgentError::Serve {
        restarts: 0,
        source,
    }
}

/// A pod VM's agent: serves on vsock, restarting the server a few times if it fails.
async fn serve_in_guest(boot: &BootInfo, service: AgentService) -> AgentError {
    let mut restarts = 0;
    loop {
        let listener = match bind_with_retry(AGENT_VSOCK_PORT).await {
            Ok(listener) => Listener::Vsock(listener),
            Err(err) => return err,
        };
        if restarts == 0 {
            let ready_ms = init::kernel_uptime_ms().unwrap_or(0);
            boot.boot_to_ready_ms.store(ready_ms, Ordering::Relaxed);
            // The line the VMM and humans look for; keep its format.
            let _ = writeln!(
                std::io::stderr().lock(),
                "podvisor-agent {VERSION} ready on vsock port {AGENT_VSOCK_PORT}"
            );
            log(&format!(
                "kernel uptime at ready: {ready_ms} ms (agent start +{} ms)",
                boot.started.elapsed().as_millis()
            ));
        } else {
            log(&format!("listening again on vsock port {AGENT_VSOCK_PORT}"));
        }
        let source = server::serve(&listener, service.clone()).await;
        restarts += 1;
        log(&format!(
            "server failed ({restarts}/{SERVER_RESTARTS}): {source}"
        ));
        if restarts >= SERVER_RESTARTS {
            return AgentError::Serve { restarts, source };
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Binds the agent's vsock port, retrying for [`BIND_RETRY_FOR`] (the vsock transport may still be probing).
async fn bind_with_retry(port: u32) -> Result<VsockListener, AgentError> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)) {
            Ok(listener) => {
                if attempts > 0 {
                    log(&format!(
                        "vsock port {port} bound after {} ms",
                        start.elapsed().as_millis()
                    ));
                }
                return Ok(listener);
            }
            Err(source) => {
                let waited = start.elapsed();
                if waited >= BIND_RETRY_FOR {
                    return Err(AgentError::Bind {
                        port,
                        waited,
                        source,
                    });
                }
                // Log the first failure and then every 10 s.
                if attempts % 20 == 0 {
                    log(&format!(
                        "cannot bind vsock port {port} ({source}); is there a virtio-vsock device? \
                         retrying for up to {}s",
                        BIND_RETRY_FOR.saturating_sub(waited).as_secs()
                    ));
                }
                attempts += 1;
                tokio::time::sleep(BIND_RETRY_EVERY).await;
            }
        }
    }
}

/// After a `Shutdown` call (or, on the node, the lifeline closing): let the reply go out, remove the pod's
/// containers when they would outlive the agent (on the node), sync, unmount storages, and reboot (exit
/// when not PID 1).
async fn shutdown_when_asked(pid1: bool, asked: Arc<Notify>, service: AgentService) {
    asked.notified().await;
    tokio::time::sleep(SHUTDOWN_FLUSH_DELAY).await;
    if !pid1 {
        // In a VM the power-off ends them; on the node nothing would.
        for err in service.tear_down().await {
            log(&err);
        }
    }
    log("shutting down: sync, unmount storages, reboot");
    nix::unistd::sync();
    for err in service.storage().unmount_all() {
        log(&err.to_string());
    }
    if pid1 {
        init::reboot()
    }
    std::process::exit(0)
}

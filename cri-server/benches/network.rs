//! Host→pod TCP throughput over the pod network: podvisor (a microVM per pod behind a tap)
//! against containerd 1.6 + runc (a private instance with its CRI plugin), both driven by the same
//! CRI client code and attached by the same CNI conflist to the same bridge (`pvbench0`,
//! 10.89.0.0/24, portmap). Each runtime runs one pod whose container loops
//! `nc -l -p 5201 -e dd ...` (dd reads the socket itself); the host sends N MiB to the pod IP, then
//! to a host port DNATed by portmap, 3 times each, and checks that the container logged exactly
//! N MiB received. Prints one JSON line per metric
//! (median MiB/s):
//! `{"metric":..,"unit":"MiB/s","ours":..,"peer":"containerd+runc","peer_value":..,"ratio":..}`.
//!
//! `cargo bench -p cri-server --bench network`. Env: PODVISOR_BENCH_NET_MIB sets N (default 64, or
//! 4 on PVM hosts, where the guest kernel's TCP receive path is emulated: about 0.2 MiB/s, so 64 MiB
//! would take over 5 minutes a run),
//! PODVISOR_BENCH_NET_PEER_ONLY=1 measures containerd alone, PODVISOR_BENCH_NET_TIMEOUT_S (default
//! 1800) bounds each runtime's part.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image_service::testing::{self, Registry};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use podvisor_testkit::cni::bench::{self as cni, CniNet};
use podvisor_testkit::containerd::{push_pause_image, CriContainerd};
use podvisor_testkit::cri::{container_config, create_container, pod_config, run_pod};
use podvisor_testkit::daemon::{connect, podvisor_cmd, Daemon};
use podvisor_testkit::guest::pod_prerequisites;
use podvisor_testkit::image::push_pod_image;
use tonic::transport::Channel;

const PEER: &str = "containerd+runc";
const PORT: u16 = 5201;
const RUNS: usize = 3;
const MIB: usize = 1 << 20;
/// The receiver: one `nc` per connection (busybox nc stops listening once it accepts) that execs
/// `dd` on the socket; dd logs `<full>+<partial> records in` on stderr, so `N+0` is exactly N MiB.
/// (`nc -l | wc -c` caps at a few hundred MiB/s: busybox nc relays 8 KiB at a time through a pipe.)
const RECEIVER: &str =
    "while true; do nc -l -p 5201 -e /bin/dd of=/dev/null bs=1M iflag=fullblock; done";
/// A transfer fails when no byte moves for this long.
const STALL: Duration = Duration::from_secs(120);

/// One runtime's throughputs (MiB/s per run): to the pod IP, and to a host port (with the address
/// used) or why that did not work.
struct Side {
    direct: Vec<f64>,
    host_port: Result<(String, Vec<f64>), String>,
}

/// What the bench needs everywhere: the images, the CNI network, N.
struct Setup {
    dir: PathBuf,
    image: String,
    pause: String,
    registry: String,
    conf_dir: PathBuf,
    mib: usize,
    limit: Duration,
}

/// Why a send failed: the receiver never accepted, or the transfer broke.
enum SendError {
    Connect(String),
    Transfer(String),
}

/// Sends `mib` MiB to `addr` once something accepts there (connects retried for `within`), shuts
/// down the write side and reads to EOF (the receiver exits after taking everything); returns the
/// seconds from the first byte to EOF.
fn send(addr: SocketAddr, mib: usize, within: Duration) -> Result<f64, SendError> {
    let deadline = Instant::now() + within;
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(SendError::Connect(format!("connect {addr}: {e}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let buf = vec![0x5a_u8; MIB];
    let transfer = |s: &mut TcpStream| -> std::io::Result<f64> {
        s.set_write_timeout(Some(STALL))?;
        s.set_read_timeout(Some(STALL))?;
        s.set_nodelay(true)?;
        let start = Instant::now();
        for _ in 0..mib {
            s.write_all(&buf)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(start.elapsed().as_secs_f64())
    };
    transfer(&mut s).map_err(|e| SendError::Transfer(format!("sending to {addr}: {e}")))
}

/// The 1 MiB records the receiver logged reading so far, one `<full>+<partial>` per connection
/// (CRI log lines `<time> stderr F <full>+<partial> records in`).
fn records(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 6 && f[4..] == ["records", "in"]).then(|| f[3].to_owned())
        })
        .collect()
}

/// One measured transfer: the receiver's `n`th (0-based) connection must log exactly what was sent.
async fn transfer(
    addr: SocketAddr,
    s: &Setup,
    within: Duration,
    log: &Path,
    n: usize,
) -> Result<f64, SendError> {
    let mib = s.mib;
    let secs = tokio::task::spawn_blocking(move || send(addr, mib, within))
        .await
        .map_err(|e| SendError::Transfer(e.to_string()))??;
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        if let Some(r) = records(log).into_iter().nth(n) {
            break r;
        }
        if Instant::now() > deadline {
            return Err(SendError::Transfer(format!(
                "no record count #{n} in {} within 60 s",
                log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if got != format!("{}+0", s.mib) {
        return Err(SendError::Transfer(format!(
            "invalid measurement: sent {} MiB to {addr}, the receiver read {got} (full+partial) \
             1 MiB records",
            s.mib
        )));
    }
    let rate = s.mib as f64 / secs;
    eprintln!(
        "  {} MiB to {addr} in {secs:.3} s: {} MiB/s",
        s.mib,
        significant(rate)
    );
    Ok(rate)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Pulls the images, runs the receiver pod (its id pushed to `pods` for cleanup) and measures.
async fn measure(
    chan: Channel,
    name: &'static str,
    pull: Vec<String>,
    s: Arc<Setup>,
    pods: Arc<Mutex<Vec<String>>>,
) -> Result<Side, String> {
    let mut rt = RuntimeServiceClient::new(chan.clone());
    let mut images = ImageServiceClient::new(chan);
    for image in pull {
        let spec = ImageSpec {
            image,
            ..Default::default()
        };
        images
            .pull_image(PullImageRequest {
                image: Some(spec),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("PullImage: {e}"))?;
    }
    let logs = s.dir.join(format!("logs-{name}"));
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let host_port = free_port();
    let mut config = pod_config(&format!("net-{name}"), &format!("uid-net-{name}"), &logs);
    config.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: PORT.into(),
        host_port: host_port.into(),
        host_ip: String::new(),
    }];
    let start = Instant::now();
    let pod = run_pod(&mut rt, &config).await;
    pods.lock().unwrap().push(pod.clone());
    eprintln!("{name}: RunPodSandbox took {:.1?}", start.elapsed());
    let status = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .map_err(|e| format!("PodSandboxStatus: {e}"))?
        .into_inner();
    let ip = status
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .filter(|ip| !ip.is_empty())
        .ok_or("PodSandboxStatus has no network.ip")?;
    eprintln!("{name}: pod IP {ip}, host port {host_port}");
    let app = container_config("recv", &s.image, &["sh", "-c", RECEIVER], 0);
    let id = create_container(&mut rt, &pod, app, &config).await;
    rt.start_container(StartContainerRequest { container_id: id })
        .await
        .map_err(|e| format!("StartContainer: {e}"))?;
    let log = logs.join("recv.log");

    let addr: SocketAddr = format!("{ip}:{PORT}").parse().map_err(|e| format!("{e}"))?;
    let mut direct = Vec::new();
    for n in 0..RUNS {
        // The first connect waits for the container to listen.
        let within = Duration::from_secs(if n == 0 { 300 } else { 60 });
        match transfer(addr, &s, within, &log, n).await {
            Ok(rate) => direct.push(rate),
            Err(SendError::Connect(e) | SendError::Transfer(e)) => return Err(e),
        }
    }
    // Through the host port: portmap DNATs locally generated connections (OUTPUT) to any local
    // address; the bridge's address first, then loopback (needs portmap's route_localnet + SNAT).
    let mut unreachable = Vec::new();
    let mut n = RUNS;
    for host in [cni::GATEWAY, "127.0.0.1"] {
        let addr: SocketAddr = format!("{host}:{host_port}").parse().expect("address");
        let mut rates = Vec::new();
        for _ in 0..RUNS {
            match transfer(addr, &s, Duration::from_secs(10), &log, n).await {
                Ok(rate) => rates.push(rate),
                Err(SendError::Connect(e)) => {
                    eprintln!("{name}: host port unreachable: {e}");
                    break;
                }
                Err(SendError::Transfer(e)) => return Err(e),
            }
            n += 1;
        }
        if rates.len() == RUNS {
            return Ok(Side {
                direct,
                host_port: Ok((addr.to_string(), rates)),
            });
        }
        unreachable.push(format!("{addr} refused or timed out"));
    }
    Ok(Side {
        direct,
        host_port: Err(unreachable.join(", ")),
    })
}

/// Runs [`measure`] on the runtime behind `chan` (bounded; a panic is an error), then stops and
/// removes its pod whatever happened.
async fn side(
    chan: Channel,
    name: &'static str,
    pull: Vec<String>,
    s: &Arc<Setup>,
) -> Result<Side, String> {
    let pods = Arc::new(Mutex::new(Vec::new()));
    let mut task = tokio::spawn(measure(chan.clone(), name, pull, s.clone(), pods.clone()));
    let result = match tokio::time::timeout(s.limit, &mut task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(match e.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()),
            Err(e) => e.to_string(),
        }),
        Err(_) => {
            task.abort();
            Err(format!("not done within {:?}", s.limit))
        }
    };
    let mut rt = RuntimeServiceClient::new(chan);
    let ids: Vec<String> = std::mem::take(&mut *pods.lock().unwrap());
    for id in ids {
        let stop = rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        });
        match tokio::time::timeout(Duration::from_secs(300), stop).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("{name}: StopPodSandbox {id}: {e}"),
            Err(e) => eprintln!("{name}: StopPodSandbox {id}: {e}"),
        }
        let remove = rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        });
        match tokio::time::timeout(Duration::from_secs(300), remove).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("{name}: RemovePodSandbox {id}: {e}"),
            Err(e) => eprintln!("{name}: RemovePodSandbox {id}: {e}"),
        }
    }
    result
}

async fn peer(s: &Arc<Setup>) -> Result<Side, String> {
    let (ctrd, chan) = CriContainerd::start(
        &s.dir.join("containerd"),
        &s.conf_dir,
        &s.registry,
        &s.pause,
    )
    .await?;
    let pull = vec![s.pause.clone(), s.image.clone()];
    side(chan, "peer", pull, s)
        .await
        .map_err(|e| format!("{e}\ncontainerd log (tail):\n{}", ctrd.log_tail()))
}

async fn ours(s: &Arc<Setup>, guest: &Path) -> Result<Side, String> {
    let help = Command::new(env!("CARGO_BIN_EXE_podvisor"))
        .arg("--help")
        .output()
        .map_err(|e| format!("podvisor --help: {e}"))?;
    if !String::from_utf8_lossy(&help.stdout).contains("--cni-conf-dir") {
        return Err("podvisor has no --cni-conf-dir flag (pod networking not built yet)".into());
    }
    let conf = s.conf_dir.to_str().expect("utf-8 path");
    // State, run dir and certs.d (the registry's hosts.toml) under the bench's dir.
    let cmd = podvisor_cmd(
        env!("CARGO_BIN_EXE_podvisor"),
        &s.dir,
        &[
            "--image-slots",
            "1",
            "--default-pod-memory-mib",
            "256",
            "--cni-conf-dir",
            conf,
            "--cni-bin-dir",
            cni::BIN_DIR,
        ],
    );
    let socket = s.dir.join("podvisor.sock");
    let daemon_log = s.dir.join("daemon.log");
    let _daemon = Daemon::start_with(cmd, &socket, guest, Some(&daemon_log)).await;
    if !socket.exists() {
        return Err(format!("podvisor did not start:\n{}", tail(&daemon_log)));
    }
    let chan = connect(socket).await;
    side(chan, "ours", vec![s.image.clone()], s)
        .await
        .map_err(|e| format!("{e}\npodvisor log (tail):\n{}", tail(&daemon_log)))
}

fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Why this host cannot run the peer (root, containerd, runc, the CNI plugins, the registry tools).
fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some("not root (bridges, netns and iptables need it)".into());
    }
    for (bin, pkg) in [
        ("/usr/bin/containerd", "containerd"),
        ("/usr/bin/containerd-shim-runc-v2", "containerd"),
        ("/usr/sbin/runc", "runc"),
        ("/usr/lib/cni/bridge", "containernetworking-plugins"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
        ("/usr/lib/cni/portmap", "containernetworking-plugins"),
        ("/usr/sbin/iptables", "iptables"),
    ] {
        if !Path::new(bin).exists() {
            return Some(format!("{bin} is not installed (apt package {pkg})"));
        }
    }
    testing::skip_reason()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `v` rounded to 4 significant digits (a ratio of 0.00005 must not print as 0).
fn significant(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// A JSON line `{"metric","unit","ours","peer","peer_value","ratio","note"}` without the absent
/// values; none when neither runtime was measured.
fn line(metric: &str, ours: Option<f64>, peer: Option<f64>, note: &str) {
    if ours.is_none() && peer.is_none() {
        return;
    }
    let mut fields = vec![
        format!(r#""metric":"{metric}""#),
        r#""unit":"MiB/s""#.to_string(),
    ];
    if let Some(o) = ours {
        fields.push(format!(r#""ours":{}"#, significant(o)));
    }
    fields.push(format!(r#""peer":"{PEER}""#));
    if let Some(p) = peer {
        fields.push(format!(r#""peer_value":{}"#, significant(p)));
    }
    if let (Some(o), Some(p)) = (ours, peer) {
        fields.push(format!(r#""ratio":{}"#, significant(o / p)));
    }
    if !note.is_empty() {
        fields.push(format!(r#""note":{}"#, serde_json::Value::from(note)));
    }
    println!("{{{}}}", fields.join(","));
}

/// MiB sent per run by default: 64, or 4 on PVM hosts (see the module docs).
fn default_mib() -> u64 {
    if vmm::KvmHost::detect().kind == vmm::HostKind::Pvm {
        4
    } else {
        64
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    // `cargo test --benches` runs this without --bench; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let peer_only = std::env::var("PODVISOR_BENCH_NET_PEER_ONLY").as_deref() == Ok("1");
    if let Some(reason) = skip_reason() {
        println!("SKIPPED bench network: {reason}");
        return ExitCode::SUCCESS;
    }
    let guest = if peer_only {
        None
    } else {
        match pod_prerequisites("bench network") {
            Some(guest) => Some(guest),
            None => return ExitCode::SUCCESS,
        }
    };
    let reg = Registry::start(None).expect("registry");
    let dir = testing::tempdir();
    let d = dir.path();
    let image = push_pod_image(&reg, d, "bench/busybox");
    let pause = push_pause_image(&reg, d);
    testing::write_hosts(&d.join("certs.d"), &reg.host, &reg.host).expect("hosts.toml");
    let mut net = CniNet::create(d);
    let s = Arc::new(Setup {
        dir: d.to_owned(),
        image,
        pause,
        registry: reg.host.clone(),
        conf_dir: net.conf_dir.clone(),
        mib: env("PODVISOR_BENCH_NET_MIB", default_mib()).max(1) as usize,
        limit: Duration::from_secs(env("PODVISOR_BENCH_NET_TIMEOUT_S", 1800)),
    });
    eprintln!("sending {} MiB per run, {RUNS} runs per path", s.mib);

    let peer = peer(&s).await;
    let ours = match &guest {
        Some(guest) => Some(ours(&s, guest).await),
        None => None,
    };
    let leaks = net.cleanup();
    for leak in &leaks {
        eprintln!("LEAK (removed): {leak}");
    }

    let mut failed = !leaks.is_empty();
    for (who, r) in [("peer", Some(&peer)), ("ours", ours.as_ref())] {
        match r {
            Some(Err(e)) => {
                eprintln!("FAILED {who}: {e}");
                failed = true;
            }
            None => eprintln!("ours: not measured (PODVISOR_BENCH_NET_PEER_ONLY=1)"),
            Some(Ok(_)) => {}
        }
    }
    let peer = peer.ok();
    let ours = ours.and_then(Result::ok);
    let direct = |s: &Option<Side>| s.as_ref().map(|s| median(&s.direct));
    line(
        "host_to_pod_tcp_throughput",
        direct(&ours),
        direct(&peer),
        "",
    );
    let via = |s: &Option<Side>, who: &str, notes: &mut Vec<String>| match s.as_ref()?.host_port {
        Ok((ref addr, ref rates)) => {
            notes.push(format!("{who} via {addr}"));
            Some(median(rates))
        }
        Err(ref e) => {
            notes.push(format!("{who}: host port unreachable ({e})"));
            None
        }
    };
    let mut notes = Vec::new();
    let (o, p) = (via(&ours, "ours", &mut notes), via(&peer, PEER, &mut notes));
    line("host_port_to_pod_tcp_throughput", o, p, &notes.join("; "));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

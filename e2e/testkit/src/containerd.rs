//! The network bench's peer: a private containerd 1.6 with its CRI plugin on (own root, state, runc
//! root and socket under one directory; runc through containerd-shim-runc-v2, overlayfs, cgroupfs),
//! and the pause image its sandboxes run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image_service::testing::{gzip, OciLayout, Registry, TarBuilder};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::VersionRequest;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// containerd 1.6 puts shim sockets here whatever its state dir.
const SHIM_SOCKETS: &str = "/run/containerd";

/// Pushes `bench/pause:v1` (static busybox, `sleep` as entrypoint, so the sandbox stays up like
/// registry.k8s.io/pause, which is unreachable here) to `reg`; returns its reference.
pub fn push_pause_image(reg: &Registry, dir: &Path) -> String {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut t = TarBuilder::default();
    t.dir("bin/", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .link(tar::EntryType::Symlink, "bin/sleep", "busybox");
    let layer = t.finish();
    let diff_id = Sha256::digest(&layer);
    let mut layout = OciLayout::new(&dir.join("layout-pause"));
    let layer_desc = layout.blob("application/vnd.oci.image.layer.v1.tar+gzip", &gzip(&layer));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sleep"], "Cmd": ["2147483647"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", hex::encode(diff_id))]},
    });
    let config = layout.blob(
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).expect("json"),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer_desc],
    });
    let mut desc = layout.blob(
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).expect("json"),
    );
    desc["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    layout.tag(&desc, "v1");
    reg.push(layout.path(), "v1", "bench/pause:v1", false)
        .expect("push pause image");
    format!("{}/bench/pause:v1", reg.host)
}

/// A running private containerd; on drop it is killed, then whatever its pods left is removed
/// (runc containers, shims, mounts under its directory, the empty host directories it created).
pub struct CriContainerd {
    child: Child,
    /// Its CRI (and containerd API) socket.
    pub socket: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    new_host_dirs: Vec<PathBuf>,
}

/// Host directories containerd's CRI creates outside its own: shim sockets, the pods' cgroupfs
/// parent in each hierarchy.
fn host_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(SHIM_SOCKETS)];
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        dirs.extend(hierarchies.flatten().map(|h| h.path().join("k8s.io")));
    }
    dirs
}

impl CriContainerd {
    /// Starts containerd in `dir` with CRI pods on the CNI conf in `cni_conf_dir`, images pulled
    /// over plain http from `registry` (`host:port`), and `sandbox_image` as the pause image; waits
    /// (bounded) until CRI Version answers.
    pub async fn start(
        dir: &Path,
        cni_conf_dir: &Path,
        registry: &str,
        sandbox_image: &str,
    ) -> Result<(CriContainerd, Channel), String> {
        // containerd 1.6 rejects a hosts.toml without a [host] table ("invalid `host` tree").
        let certs_dir = dir.join("certs.d");
        let hosts = certs_dir.join(registry);
        std::fs::create_dir_all(&hosts).map_err(|e| e.to_string())?;
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"http://{registry}\"\n[host.\"http://{registry}\"]\n  \
                 capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
        // restrict_oom_score_adj: this host cannot lower oom_score_adj (the sandbox wants -998).
        let body = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc_root}"
  [{cri}.cni]
    bin_dir = "{bin_dir}"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
  [{cri}.registry]
    config_path = "{certs}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            runc_root = dir.join("runc").display(),
            bin_dir = crate::cni::CNI_BIN_DIR,
            conf_dir = cni_conf_dir.display(),
            certs = certs_dir.display(),
        );
        std::fs::write(&config, body).map_err(|e| e.to_string())?;
        let new_host_dirs = host_dirs().into_iter().filter(|d| !d.exists()).collect();
        let log = dir.join("containerd.log");
        let stderr = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("containerd: {e}"))?;
        let mut c = CriContainerd {
            child,
            socket,
            dir: dir.to_owned(),
            log,
            new_host_dirs,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.socket.exists() {
            if let Ok(Some(s)) = c.child.try_wait() {
                return Err(format!("containerd exited: {s}\n{}", c.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("no containerd socket in 30 s\n{}", c.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let chan = crate::daemon::connect(c.socket.clone()).await;
        let mut rt = RuntimeServiceClient::new(chan.clone());
        loop {
            match rt.version(VersionRequest::default()).await {
                Ok(v) => {
                    let v = v.into_inner();
                    eprintln!("peer: {} {}", v.runtime_name, v.runtime_version);
                    return Ok((c, chan));
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("CRI Version: {e}\n{}", c.log_tail()))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The last lines of containerd's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Pids of the processes whose command line names this containerd's socket (its shims).
    fn shims(&self) -> Vec<String> {
        let sock = self.socket.display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return vec![];
        };
        procs
            .flatten()
            .filter_map(|p| {
                let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
                let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                (cmdline.contains("containerd-shim") && cmdline.contains(&sock))
                    .then(|| pid.to_string())
            })
            .collect()
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Normally empty: the bench removed its pods before. Otherwise the containers go first
        // (runc kills their processes), then their shims.
        let runc_root = self.dir.join("runc");
        if let Ok(namespaces) = std::fs::read_dir(&runc_root) {
            for ns in namespaces.flatten() {
                let Ok(containers) = std::fs::read_dir(ns.path()) else {
                    continue;
                };
                for c in containers.flatten() {
                    eprintln!("LEAK (removed): runc container {:?}", c.file_name());
                    let _ = Command::new("runc")
                        .arg("--root")
                        .arg(ns.path())
                        .args(["delete", "-f"])
                        .arg(c.file_name())
                        .status();
                }
            }
        }
        for pid in self.shims() {
            eprintln!("LEAK (killed): containerd shim pid {pid}");
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        let dir = format!("{}/", self.dir.display());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut leftover: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&dir))
            .collect();
        leftover.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in leftover {
            let _ = Command::new("umount").args(["-R", m]).status();
        }
        // Only those this containerd created; cgroups only when empty (rmdir).
        for d in &self.new_host_dirs {
            let _ = if d == Path::new(SHIM_SOCKETS) {
                std::fs::remove_dir_all(d)
            } else {
                std::fs::remove_dir(d)
            };
        }
    }
}

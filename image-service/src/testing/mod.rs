//! Test support (feature `testing`, and always in this crate's unit tests): a private Debian
//! `docker-registry` on 127.0.0.1, offline-built busybox images pushed to it with skopeo, and a raw tar
//! builder. Used by this crate's unit and integration tests and bench and by cri-server's tests.

mod layout;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use layout::{
    busybox_base, config_digest, gzip, layer_digests, zstd_compress, OciLayout, TarBuilder, MTIME,
};

/// The registry binary from Debian's `docker-registry` package.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Why the registry-based tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    for (bin, pkg) in [
        (REGISTRY_BIN, "docker-registry"),
        ("/usr/bin/skopeo", "skopeo"),
        ("/bin/busybox", "busybox-static"),
        ("/sbin/debugfs", "e2fsprogs"),
    ] {
        if !Path::new(bin).exists() {
            return Some(format!("{bin} is not installed (apt package {pkg})"));
        }
    }
    None
}

/// A running registry, killed on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// Basic-auth credentials it requires, if any.
    pub creds: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `GET /v2/` status code, if the registry answers.
fn probe(host: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&host.parse().ok()?, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /v2/ HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Registry {
    /// Starts a registry with temporary storage, optionally requiring htpasswd basic auth.
    pub fn start(auth: Option<(&str, &str)>) -> Result<Registry, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut auth_yaml = String::new();
        if let Some((user, pass)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .map_err(|e| format!("htpasswd (apt package apache2-utils): {e}"))?;
            if !out.status.success() {
                return Err(format!("htpasswd failed: {:?}", out));
            }
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).map_err(|e| e.to_string())?;
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: podvisor-test\n    path: {}\n",
                file.display()
            );
        }
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port().map_err(|e| e.to_string())?;
            let host = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{auth_yaml}",
                    dir.path().join("data").display()
                ),
            )
            .map_err(|e| e.to_string())?;
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{REGISTRY_BIN}: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(code) = probe(&host) {
                    if code == 200 || code == 401 {
                        return Ok(Registry {
                            child,
                            host,
                            creds: auth.map(|(u, p)| (u.to_owned(), p.to_owned())),
                            _dir: dir,
                        });
                    }
                }
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("registry exited with {status} (port {port} taken?)");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = "registry not ready within 20 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err(last_err)
    }

    /// Where the registry stores blob `digest` (`sha256:<hex>`; manifests are blobs too): tests overwrite
    /// it to play a registry serving corrupt content.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self._dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes the image manifest `desc` of `layout` and its blobs as `<this registry>/<repo>:<tag>` with
    /// oci-client, byte for byte (skopeo refuses some images podvisor must refuse itself, such as configs
    /// over 4 MiB).
    pub async fn push_raw(
        &self,
        layout: &OciLayout,
        desc: &serde_json::Value,
        repo: &str,
        tag: &str,
    ) -> Result<(), String> {
        use oci_client::client::{ClientConfig, ClientProtocol};
        use oci_client::secrets::RegistryAuth;
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let reference: oci_client::Reference = format!("{}/{repo}:{tag}", self.host)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let auth = match &self.creds {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| format!("auth: {e}"))?;
        let blob = |d: &str| -> Result<Vec<u8>, String> {
            let hex = d.strip_prefix("sha256:").ok_or("digest")?;
            std::fs::read(layout.path().join("blobs/sha256").join(hex)).map_err(|e| e.to_string())
        };
        let digest = desc["digest"].as_str().ok_or("manifest digest")?;
        let manifest = blob(digest)?;
        let m: serde_json::Value = serde_json::from_slice(&manifest).map_err(|e| e.to_string())?;
        let layers = m["layers"].as_array().cloned().unwrap_or_default();
        for d in layers.iter().chain([&m["config"]]) {
            let d = d["digest"].as_str().ok_or("blob digest")?;
            client
                .push_blob(&reference, blob(d)?, d)
                .await
                .map_err(|e| format!("push blob {d}: {e}"))?;
        }
        let media_type =
            reqwest::header::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json");
        client
            .push_manifest_raw(&reference, manifest, media_type)
            .await
            .map_err(|e| format!("push manifest: {e}"))?;
        Ok(())
    }

    /// Pushes `layout:tag` to `<this registry>/<dest>` with skopeo (`--all` keeps indexes), converting to
    /// Docker schema2 when `docker_format` is set.
    pub fn push(
        &self,
        layout: &Path,
        tag: &str,
        dest: &str,
        docker_format: bool,
    ) -> Result<(), String> {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--all",
            "--dest-tls-verify=false",
        ]);
        if docker_format {
            cmd.args(["--format", "v2s2"]);
        }
        if let Some((u, p)) = &self.creds {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{dest}", self.host));
        let out = cmd.output().map_err(|e| format!("skopeo: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "skopeo copy failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

/// Writes a `hosts.toml` under `certs_dir` declaring `registry` as served over plain http by `mirror`
/// (which may be the registry itself).
pub fn write_hosts(certs_dir: &Path, registry: &str, mirror: &str) -> std::io::Result<()> {
    let dir = certs_dir.join(registry);
    std::fs::create_dir_all(&dir)?;
    let body = if registry == mirror {
        format!("server = \"http://{mirror}\"\n")
    } else {
        format!("[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n")
    };
    std::fs::write(dir.join("hosts.toml"), body)
}

/// Runs `debugfs -R '<request> PATH' image`; `None` if the path is absent or debugfs fails.
fn debugfs(image: &Path, request: &str, path: &str) -> Option<Vec<u8>> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("{request} {path}"))
        .arg(image)
        .output()
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File not found") || !out.status.success() {
        return None;
    }
    Some(out.stdout)
}

/// Reads a file out of an ext4 image with `debugfs -R 'cat PATH'` (no mount needed). `None` if absent.
pub fn debugfs_cat(image: &Path, path: &str) -> Option<Vec<u8>> {
    debugfs(image, "cat", path)
}

/// `debugfs -R 'stat PATH'` output, if the path exists in the image.
pub fn debugfs_stat(image: &Path, path: &str) -> Option<String> {
    debugfs(image, "stat", path).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// Names of the entries of directory `path` in an ext4 image (`debugfs -R 'ls -p PATH'`).
pub fn debugfs_ls(image: &Path, path: &str) -> Vec<String> {
    let Ok(out) = Command::new("debugfs")
        .arg("-R")
        .arg(format!("ls -p {path}"))
        .arg(image)
        .output()
    else {
        return vec![];
    };
    // Lines look like `/<inode>/<mode>/<uid>/<gid>/<name>/<size>/`.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().split('/').nth(5).map(str::to_owned))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

/// A temporary directory path for test state.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Files (not directories) under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Returns from the calling test, printing `SKIPPED <name>: <reason>`, when the registry tools
/// ([`skip_reason`]) are missing.
#[macro_export]
macro_rules! require_registry_tools {
    ($name:literal) => {
        if let Some(reason) = $crate::testing::skip_reason() {
            println!("SKIPPED {}: {reason}", $name);
            return;
        }
    };
}

/// An image service with its own state and certs dirs under `dir` declaring `registry` as plain http,
/// with `limits` (the defaults when None).
pub fn plain_http_service(
    dir: &Path,
    registry: &str,
    limits: Option<crate::apply::Limits>,
) -> crate::ImageService {
    let certs = dir.join("certs.d");
    write_hosts(&certs, registry, registry).unwrap();
    let mut config = crate::Config::new(dir.join("state"));
    config.certs_dir = certs;
    if let Some(l) = limits {
        config.limits = l;
    }
    let db = sled::open(dir.join("state/db")).unwrap();
    crate::ImageService::open(config, &db).unwrap()
}

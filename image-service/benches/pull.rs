//! Pull + unpack benchmark: podvisor (download, verify, apply layers, build the block image) against
//! containerd 1.6 (`ctr images pull --plain-http`, which downloads, verifies and unpacks into its overlayfs
//! snapshotter) on the same images from a local `docker-registry`, in one run. Prints JSON lines
//! `{"metric","unit","ours","peer":"containerd","peer_value","ratio"}`; measures only with `--bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image_service::testing::{self, busybox_base, OciLayout, Registry};
use image_service::{Config, Credentials, ImageService};

const RUNS: usize = 3;

/// A layer tar of the host directory `src`, stored under `dest` (symlinks kept as symlinks).
fn tar_of(src: &str, dest: &str, max_bytes: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut total = 0;
    let mut stack = vec![PathBuf::from(src)];
    while let Some(dir) = stack.pop() {
        let rel = dir.strip_prefix(src).expect("under src");
        b.append_dir(Path::new(dest).join(rel), &dir).expect("dir");
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .expect("readable")
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).expect("stat");
            let name = Path::new(dest).join(p.strip_prefix(src).expect("under src"));
            if m.is_dir() {
                stack.push(p);
            } else if (m.is_file() && total + m.len() <= max_bytes) || m.file_type().is_symlink() {
                total += m.len();
                b.append_path_with_name(&p, &name).expect("entry");
            }
        }
    }
    b.into_inner().expect("tar")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "-B1"])
        .arg(path)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn line(metric: &str, unit: &str, ours: f64, peer: f64) {
    println!(
        "{}",
        serde_json::json!({
            "metric": metric, "unit": unit, "ours": ours, "peer": "containerd",
            "peer_value": peer, "ratio": if peer > 0.0 { ours / peer } else { f64::NAN },
        })
    );
}

/// A private containerd (own root, state and socket; CRI plugin off), killed on drop.
struct Containerd {
    child: Child,
    socket: PathBuf,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Unmount anything left by unpacking, then the temp dir goes.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                self.root.display()
            ))
            .status();
    }
}

impl Containerd {
    fn start() -> Result<Containerd, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let root = dir.path().join("root");
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}.ttrpc\"\n[metrics]\n  address = \"\"\n",
                root.display(),
                dir.path().join("state").display(),
                socket.display(),
                socket.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("containerd: {e}"))?;
        let mut c = Containerd {
            child,
            socket,
            root,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if c.ctr(&["version"]).is_ok() {
                return Ok(c);
            }
            if let Ok(Some(s)) = c.child.try_wait() {
                return Err(format!("containerd exited: {s}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("containerd not ready within 20 s".into())
    }

    fn ctr(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "bench"])
            .args(args)
            .output()
            .map_err(|e| format!("ctr: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn pull(&self, image: &str) -> Result<f64, String> {
        let t = Instant::now();
        self.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--platform",
            "linux/amd64",
            image,
        ])?;
        Ok(t.elapsed().as_secs_f64())
    }
}

async fn ours(reg: &Registry, image: &str) -> (f64, f64, u64) {
    let dir = testing::tempdir();
    let certs = dir.path().join("certs.d");
    testing::write_hosts(&certs, &reg.host, &reg.host).expect("hosts.toml");
    let mut config = Config::new(dir.path().join("state"));
    config.certs_dir = certs;
    let db = sled::open(dir.path().join("db")).expect("sled");
    let svc = ImageService::open(config, &db).expect("store");
    let t = Instant::now();
    svc.pull(image, &Credentials::default(), None)
        .await
        .expect("our pull");
    let cold = t.elapsed().as_secs_f64();
    let t = Instant::now();
    svc.pull(image, &Credentials::default(), None)
        .await
        .expect("our warm pull");
    let warm = t.elapsed().as_secs_f64();
    (cold, warm, du(&dir.path().join("state/images")))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Some(reason) = testing::skip_reason() {
        println!("SKIPPED pull bench: {reason}");
        return;
    }
    if !Path::new("/usr/bin/containerd").exists() {
        println!("SKIPPED pull bench: containerd is not installed (apt package containerd)");
        return;
    }
    let reg = Registry::start(None).expect("registry");
    let work = testing::tempdir();
    // A small image (busybox) and a larger, many-file one (busybox + the Python stdlib + shared libs).
    let mut layout = OciLayout::new(&work.path().join("layout"));
    let base = busybox_base();
    let small = layout.image("amd64", &[(&base, "gzip")], "");
    layout.tag(&small, "small");
    let py = tar_of("/usr/lib/python3.11", "usr/lib/python3.11", 200 << 20);
    let libs = tar_of(
        "/usr/lib/x86_64-linux-gnu",
        "usr/lib/x86_64-linux-gnu",
        120 << 20,
    );
    let large = layout.image(
        "amd64",
        &[(&base, "gzip"), (&py, "gzip"), (&libs, "gzip")],
        "",
    );
    layout.tag(&large, "large");
    for tag in ["small", "large"] {
        reg.push(layout.path(), tag, &format!("bench/app:{tag}"), false)
            .expect("push");
    }
    eprintln!(
        "large image: {} MB uncompressed in 3 layers",
        (base.len() + py.len() + libs.len()) >> 20
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for tag in ["small", "large"] {
        let image = format!("{}/bench/app:{tag}", reg.host);
        let (mut oc, mut ow, mut ob) = (vec![], vec![], 0);
        let (mut pc, mut pw, mut pb) = (vec![], vec![], 0);
        for _ in 0..RUNS {
            let (c, w, b) = rt.block_on(ours(&reg, &image));
            oc.push(c);
            ow.push(w);
            ob = b;
            let ctrd = match Containerd::start() {
                Ok(c) => c,
                Err(e) => {
                    println!("SKIPPED pull bench: {e}");
                    return;
                }
            };
            match ctrd.pull(&image).and_then(|c| Ok((c, ctrd.pull(&image)?))) {
                Ok((c, w)) => {
                    pc.push(c);
                    pw.push(w);
                    pb = du(&ctrd.root);
                }
                Err(e) => {
                    println!("SKIPPED pull bench: ctr images pull failed: {e}");
                    return;
                }
            }
        }
        line(
            &format!("cold_pull_unpack_{tag}"),
            "s",
            median(oc),
            median(pc),
        );
        line(&format!("warm_repull_{tag}"), "s", median(ow), median(pw));
        line(&format!("store_bytes_{tag}"), "bytes", ob as f64, pb as f64);
    }
}

//! The real `podvisor` daemon for tests and benches: its command line, starting it, and a CRI gRPC
//! channel over its unix socket.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::cni::CNI_BIN_DIR;

/// A running daemon, killed and reaped on drop.
pub struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Daemon {
    /// Spawns `cmd` (a `podvisor` command line) with `--socket socket --guest-dir <dir>/guest` added and
    /// waits (bounded) for the socket to appear.
    pub async fn start(cmd: Command, socket: &Path, dir: &Path) -> Daemon {
        Daemon::start_with(cmd, socket, &dir.join("guest"), None).await
    }

    /// Like [`Daemon::start`] with an explicit guest directory, its log appended to `log` if given.
    pub async fn start_with(
        mut cmd: Command,
        socket: &Path,
        guest_dir: &Path,
        log: Option<&Path>,
    ) -> Daemon {
        let stderr = match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::null(),
        };
        let child = cmd
            .arg("--socket")
            .arg(socket)
            .arg("--guest-dir")
            .arg(guest_dir)
            .stderr(stderr)
            .spawn()
            .unwrap();
        let daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon
    }

    /// SIGKILL, as a crash would, and reap.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Waits (bounded) for the daemon to exit by itself; its exit status if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// A gRPC channel over the unix socket, retrying (bounded) while the daemon is not accepting yet
/// (a socket file left by a killed daemon exists before the new one binds).
pub async fn connect(socket: PathBuf) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = socket.clone();
        let result =
            Endpoint::from_static("http://[::]:50051")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = s.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await;
        match result {
            Ok(channel) => return channel,
            Err(e) if Instant::now() > deadline => {
                panic!("connecting to {}: {e}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The `podvisor` daemon command line of the pod tests: the binary `bin` (the caller's
/// `env!("CARGO_BIN_EXE_podvisor")`) with state, run, registry and CNI config under `dir` (a
/// [`crate::cni::TestNetwork`] writes the conflist there), plus `extra` flags.
pub fn podvisor_cmd(bin: impl AsRef<OsStr>, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--certs-dir")
        .arg(dir.join("certs.d"))
        .arg("--cni-conf-dir")
        .arg(dir.join("cni"))
        .arg("--cni-bin-dir")
        .arg(CNI_BIN_DIR)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(extra);
    cmd
}

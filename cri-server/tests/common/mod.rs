//! Shared by the daemon tests: start the real `podvisor` binary and connect to its CRI socket.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A running daemon, killed and reaped on drop.
pub struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Spawns `cmd` (a `podvisor` command line) with `--socket socket --guest-dir <dir>/guest` added and
    /// waits (bounded) for the socket to appear.
    pub async fn start(mut cmd: Command, socket: &Path, dir: &Path) -> Daemon {
        let child = cmd
            .arg("--socket")
            .arg(socket)
            .arg("--guest-dir")
            .arg(dir.join("guest"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        daemon
    }
}

/// A gRPC channel over the unix socket.
pub async fn connect(socket: PathBuf) -> Channel {
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap()
}

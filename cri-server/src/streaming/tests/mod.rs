//! End-to-end tests: the server on 127.0.0.1:0 with a test backend, driven by real clients.

mod frames;
mod python;
mod spdy_client;
mod spdy_sessions;
mod ws_sessions;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::tokens::ManualClock;
use super::{Backend, Config, ExitInfo, ProcessIo, StreamingError, StreamingServer, TerminalSize};
use crate::sandbox::SandboxError;

/// Test backend.
///
/// exec `cmd`: `["echo", N]` echoes stdin to stdout, writes `stderr-line\n` to stderr, exits N;
/// `["resize"]` prints the first terminal size as `WxH\n`; `["fail"]` returns a backend error.
/// attach echoes stdin to stdout. port-forward answers each chunk with `<port>:<chunk>`, and
/// refuses port 9.
#[derive(Default)]
pub struct TestBackend {
    /// Every resize the backend saw.
    pub resizes: Mutex<Vec<TerminalSize>>,
}

async fn echo(io: &mut ProcessIo) {
    if let Some(stdin) = io.stdin.as_mut() {
        while let Some(chunk) = stdin.recv().await {
            if let Some(out) = &io.stdout {
                let _ = out.send(chunk).await;
            }
        }
    }
}

#[async_trait::async_trait]
impl Backend for TestBackend {
    async fn exec(
        &self,
        _container_id: &str,
        cmd: &[String],
        mut io: ProcessIo,
    ) -> Result<ExitInfo, SandboxError> {
        match cmd.first().map(String::as_str) {
            Some("echo") => {
                echo(&mut io).await;
                if let Some(err) = &io.stderr {
                    let _ = err.send(Bytes::from_static(b"stderr-line\n")).await;
                }
                let exit_code = cmd.get(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                Ok(ExitInfo { exit_code })
            }
            Some("resize") => {
                let size = io.resize.recv().await;
                if let (Some(size), Some(out)) = (size, &io.stdout) {
                    self.resizes.lock().unwrap().push(size);
                    let line = format!("{}x{}\n", size.width, size.height);
                    let _ = out.send(Bytes::from(line)).await;
                }
                Ok(ExitInfo { exit_code: 0 })
            }
            _ => Err(SandboxError::FailedPrecondition("boom".into())),
        }
    }

    async fn attach(&self, _container_id: &str, mut io: ProcessIo) -> Result<(), SandboxError> {
        echo(&mut io).await;
        Ok(())
    }

    async fn port_forward(
        &self,
        _pod_sandbox_id: &str,
        port: u16,
        mut stream: tokio::io::DuplexStream,
    ) -> Result<(), SandboxError> {
        if port == 9 {
            return Err(SandboxError::FailedPrecondition(
                "connection refused".into(),
            ));
        }
        let mut buf = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| SandboxError::FailedPrecondition(e.to_string()))?;
            if n == 0 {
                return Ok(());
            }
            let mut reply = format!("{port}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            stream
                .write_all(&reply)
                .await
                .map_err(|e| SandboxError::FailedPrecondition(e.to_string()))?;
        }
    }
}

/// A running server plus its backend and clock.
pub struct Harness {
    pub server: StreamingServer,
    pub backend: Arc<TestBackend>,
    pub clock: Arc<ManualClock>,
}

/// Starts a server on 127.0.0.1:0 with a short stream creation timeout.
pub async fn harness() -> Harness {
    let backend = Arc::new(TestBackend::default());
    let clock = Arc::new(ManualClock::new());
    let config = Config {
        stream_creation_timeout: Duration::from_millis(500),
        clock: clock.clone(),
        ..Config::default()
    };
    let server =
        StreamingServer::start_with_config("127.0.0.1:0".parse().unwrap(), backend.clone(), config)
            .await
            .unwrap();
    Harness {
        server,
        backend,
        clock,
    }
}

/// An exec request for `cmd` with the given streams.
pub fn exec_req(cmd: &[&str], stdin: bool, stdout: bool, stderr: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        stdin,
        stdout,
        stderr,
        tty,
    }
}

/// Sends a bare GET to `url` and returns the status code and body.
pub async fn plain_get(url: &str, extra_headers: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra_headers}\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tcp.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

#[tokio::test]
async fn urls_validate_like_kubelet() {
    let h = harness().await;
    let ok = h
        .server
        .exec_url(&exec_req(&["echo"], false, true, false, false))
        .unwrap();
    let prefix = format!("http://{}/exec/", h.server.addr());
    assert!(ok.starts_with(&prefix), "{ok}");
    let bad = [
        exec_req(&["echo"], false, true, true, true),
        exec_req(&["echo"], false, false, false, false),
        exec_req(&[], false, true, false, false),
        ExecRequest {
            container_id: String::new(),
            ..exec_req(&["echo"], false, true, false, false)
        },
    ];
    for req in bad {
        let err = h.server.exec_url(&req).unwrap_err();
        assert!(matches!(err, StreamingError::InvalidArgument(_)), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
    }
    let attach = AttachRequest {
        container_id: "c1".into(),
        stdout: true,
        ..Default::default()
    };
    assert!(h.server.attach_url(&attach).unwrap().contains("/attach/"));
    let pf = PortForwardRequest::default();
    assert!(h.server.port_forward_url(&pf).is_err());
}

#[tokio::test]
async fn unknown_reused_expired_and_mismatched_tokens_are_404() {
    let h = harness().await;
    let addr = h.server.addr();
    assert_eq!(
        plain_get(&format!("http://{addr}/exec/nope"), "").await.0,
        404
    );
    assert_eq!(
        plain_get(&format!("http://{addr}/other/x"), "").await.0,
        404
    );

    // First use consumes the token (the upgrade then fails for lack of headers: 400).
    let url = h
        .server
        .exec_url(&exec_req(&["echo"], false, true, false, false))
        .unwrap();
    assert_eq!(plain_get(&url, "").await.0, 400);
    assert_eq!(plain_get(&url, "").await.0, 404, "tokens are single use");

    let url = h
        .server
        .exec_url(&exec_req(&["echo"], false, true, false, false))
        .unwrap();
    h.clock.advance(Duration::from_secs(61));
    assert_eq!(
        plain_get(&url, "").await.0,
        404,
        "tokens expire after a minute"
    );

    let url = h
        .server
        .exec_url(&exec_req(&["echo"], false, true, false, false))
        .unwrap();
    let wrong = url.replace("/exec/", "/attach/");
    assert_eq!(plain_get(&wrong, "").await.0, 404);
}

//! Exec and attach sessions: Kubernetes' remotecommand protocol over SPDY or WebSocket.
//!
//! SPDY (`v4`/`v3`/`v2.channel.k8s.io`, `channel.k8s.io`): the client opens one stream per
//! `streamType` (error, stdin, stdout, stderr, resize) within the stream creation timeout.
//! WebSocket (`v5`/`v4`[`.base64`]`.channel.k8s.io`, `channel.k8s.io`, `base64.channel.k8s.io`):
//! channels 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize. Either way the session ends with a
//! status on the error stream: a JSON `metav1.Status` from v4 on, the failure message before.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::spdy_conn::{self, IncomingStream, StreamWriter};
use super::websocket::{self, ChannelConn, ChannelWriter};
use super::{plain, switching_protocols, ExitInfo, ProcessIo, Shared, TerminalSize};

/// SPDY protocols, newest first.
const SPDY_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// WebSocket subprotocols (`""`: a client that offers none gets the binary v1 framing).
const WS_PROTOCOLS: &[&str] = &[
    websocket::V5_CHANNEL,
    websocket::V4_CHANNEL,
    websocket::V4_BASE64_CHANNEL,
    websocket::CHANNEL,
    websocket::BASE64_CHANNEL,
    "",
];

/// Why a session ended early (logged; the client learns through the connection closing).
#[derive(Debug, thiserror::Error)]
pub enum RemoteCommandError {
    /// The HTTP upgrade did not complete.
    #[error("upgrade failed: {0}")]
    Upgrade(#[from] hyper::Error),
    /// The client did not open its streams in time.
    #[error("timed out waiting for client to create streams")]
    StreamTimeout,
    /// The client went away before opening its streams.
    #[error("connection closed before all streams were created")]
    ConnectionClosed,
}

/// What the session runs.
pub enum Target {
    /// A new process.
    Exec {
        /// Container to run in.
        container_id: String,
        /// Command line.
        cmd: Vec<String>,
    },
    /// The container's main process.
    Attach {
        /// Container to attach to.
        container_id: String,
    },
}

/// Which streams the CRI request asked for.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Client sends input.
    pub stdin: bool,
    /// Client receives stdout.
    pub stdout: bool,
    /// Client receives stderr.
    pub stderr: bool,
    /// Terminal mode (resize stream, no stderr).
    pub tty: bool,
}

impl Options {
    /// The options of a request asking for `[stdin, stdout, stderr]` and maybe a terminal.
    pub fn new(streams: [bool; 3], tty: bool) -> Options {
        let [stdin, stdout, stderr] = streams;
        Options {
            stdin,
            stdout,
            stderr,
            tty,
        }
    }
}

/// Answers the upgrade request and runs the session on the upgraded connection.
pub fn serve(
    req: Request<Incoming>,
    target: Target,
    opts: Options,
    shared: Arc<Shared>,
) -> Response<Full<Bytes>> {
    if websocket::is_websocket_request(req.headers()) {
        let (protocol, headers) = match websocket::accept(req.headers(), WS_PROTOCOLS) {
            Ok(ok) => ok,
            Err(e) => return plain(e.status, e.message),
        };
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => run_ws(up, protocol, target, opts, shared).await,
                Err(e) => tracing::warn!("exec/attach: {}", RemoteCommandError::from(e)),
            }
        });
        return switching_protocols(headers);
    }
    let (protocol, headers) = match spdy_conn::handshake(req.headers(), SPDY_PROTOCOLS) {
        Ok(ok) => ok,
        Err(resp) => return *resp,
    };
    tokio::spawn(async move {
        let result = match hyper::upgrade::on(req).await {
            Ok(up) => run_spdy(up, &protocol, target, opts, shared).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            tracing::warn!("exec/attach over {protocol}: {e}");
        }
    });
    switching_protocols(headers)
}

async fn run_spdy(
    up: hyper::upgrade::Upgraded,
    protocol: &str,
    target: Target,
    opts: Options,
    shared: Arc<Shared>,
) -> Result<(), RemoteCommandError> {
    let version = match protocol {
        "v4.channel.k8s.io" => 4,
        "v3.channel.k8s.io" => 3,
        "v2.channel.k8s.io" => 2,
        _ => 1,
    };
    let mut expected = vec!["error"];
    for (wanted, name) in [
        (opts.stdin, "stdin"),
        (opts.stdout, "stdout"),
        (opts.stderr, "stderr"),
        (opts.tty && version >= 3, "resize"),
    ] {
        if wanted {
            expected.push(name);
        }
    }
    let (mut incoming, ctl) = spdy_conn::start(TokioIo::new(up));
    let mut got: HashMap<&'static str, IncomingStream> = HashMap::new();
    let deadline = tokio::time::sleep(shared.stream_creation_timeout);
    tokio::pin!(deadline);
    while got.len() < expected.len() {
        tokio::select! {
            stream = incoming.recv() => {
                let Some(stream) = stream else {
                    ctl.close().await;
                    return Err(RemoteCommandError::ConnectionClosed);
                };
                let kind = stream.header("streamtype").unwrap_or("").to_string();
                match expected.iter().find(|e| **e == kind) {
                    Some(name) => {
                        got.insert(name, stream);
                    }
                    None => tracing::debug!("exec/attach: ignoring stream of type {kind:?}"),
                }
            }
            _ = &mut deadline => {
                ctl.close().await;
                return Err(RemoteCommandError::StreamTimeout);
            }
        }
    }
    // Streams opened after setup are dropped (their data discarded).
    tokio::spawn(async move { while incoming.recv().await.is_some() {} });
    let Some(error) = got.remove("error").map(|s| Output::Spdy(s.out)) else {
        ctl.close().await;
        return Err(RemoteCommandError::ConnectionClosed);
    };
    let mut take = |name| got.remove(name);
    let wiring = Wiring {
        stdin: take("stdin").map(|s| s.data),
        stdout: take("stdout").map(|s| Output::Spdy(s.out)),
        stderr: take("stderr").map(|s| Output::Spdy(s.out)),
        resize: take("resize").map(|s| s.data),
        error,
        json_status: version >= 4,
    };
    run(target, opts.tty, &shared, wiring).await;
    ctl.close().await;
    Ok(())
}

async fn run_ws(
    up: hyper::upgrade::Upgraded,
    protocol: String,
    target: Target,
    opts: Options,
    shared: Arc<Shared>,
) {
    let mut readable = Vec::new();
    if opts.stdin {
        readable.push(0);
    }
    if opts.tty {
        readable.push(4);
    }
    let mut conn = ChannelConn::start(up, &protocol, 5, &readable).await;
    // Like kubelet: an empty message on the lowest writable channel says "connected".
    let first = if opts.stdout {
        1
    } else if opts.stderr {
        2
    } else {
        3
    };
    let _ = conn.writer(first).write(Bytes::new()).await;
    let wiring = Wiring {
        stdin: conn.inbound[0].take(),
        stdout: opts.stdout.then(|| Output::Ws(conn.writer(1))),
        stderr: opts.stderr.then(|| Output::Ws(conn.writer(2))),
        resize: conn.inbound[4].take(),
        error: Output::Ws(conn.writer(3)),
        json_status: matches!(
            protocol.as_str(),
            websocket::V5_CHANNEL | websocket::V4_CHANNEL | websocket::V4_BASE64_CHANNEL
        ),
    };
    run(target, opts.tty, &shared, wiring).await;
    conn.close().await;
}

/// One outbound stream or channel.
enum Output {
    Spdy(StreamWriter),
    Ws(ChannelWriter),
}

impl Output {
    async fn write(&self, data: Bytes) -> bool {
        match self {
            Output::Spdy(w) => w.write(data).await.is_ok(),
            Output::Ws(w) => w.write(data).await.is_ok(),
        }
    }

    /// Ends our side (SPDY FIN; WebSocket channels only end with the connection).
    async fn close(&self) {
        if let Output::Spdy(w) = self {
            let _ = w.close().await;
        }
    }
}

/// The protocol ends of a session, however they were negotiated.
struct Wiring {
    stdin: Option<mpsc::Receiver<Bytes>>,
    stdout: Option<Output>,
    stderr: Option<Output>,
    resize: Option<mpsc::Receiver<Bytes>>,
    error: Output,
    json_status: bool,
}

/// Copies process output to `out` until the backend is done (`done`) and the buffer is drained.
/// If the client is gone the receiver is dropped, so the backend's sends fail instead of blocking.
async fn forward(mut rx: mpsc::Receiver<Bytes>, out: Output, mut done: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            biased;
            msg = rx.recv() => match msg {
                Some(data) => {
                    if !out.write(data).await {
                        return;
                    }
                }
                None => break,
            },
            _ = &mut done => {
                rx.close();
                while let Some(data) = rx.recv().await {
                    if !out.write(data).await {
                        return;
                    }
                }
                break;
            }
        }
    }
    out.close().await;
}

/// Decodes a stream of concatenated JSON `TerminalSize` objects (Go's `json.Decoder`).
async fn decode_resizes(mut raw: mpsc::Receiver<Bytes>, tx: mpsc::Sender<TerminalSize>) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = raw.recv().await {
        buf.extend_from_slice(&chunk);
        let mut sizes = Vec::new();
        let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TerminalSize>();
        let mut consumed = 0;
        let mut broken = false;
        loop {
            match it.next() {
                Some(Ok(size)) => {
                    sizes.push(size);
                    consumed = it.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!("resize stream: {e}");
                    broken = true;
                    break;
                }
                None => {
                    consumed = it.byte_offset();
                    break;
                }
            }
        }
        buf.drain(..consumed);
        for size in sizes {
            if tx.send(size).await.is_err() {
                return;
            }
        }
        if broken {
            return;
        }
    }
}

async fn run(target: Target, tty: bool, shared: &Shared, w: Wiring) {
    let mut dones = Vec::new();
    let mut tasks = Vec::new();
    let mut pipe = |out: Option<Output>| {
        out.map(|out| {
            let (tx, rx) = mpsc::channel(32);
            let (done_tx, done_rx) = oneshot::channel();
            dones.push(done_tx);
            tasks.push(tokio::spawn(forward(rx, out, done_rx)));
            tx
        })
    };
    let stdout = pipe(w.stdout);
    let stderr = pipe(w.stderr);
    let (resize_tx, resize) = mpsc::channel(8);
    let resizer = w
        .resize
        .map(|raw| tokio::spawn(decode_resizes(raw, resize_tx)));
    let io = ProcessIo {
        stdin: w.stdin,
        stdout,
        stderr,
        tty,
        resize,
    };
    let status = match &target {
        Target::Exec { container_id, cmd } => {
            match shared.backend.exec(container_id, cmd, io).await {
                Ok(ExitInfo { exit_code: 0 }) => Status::success(),
                Ok(ExitInfo { exit_code }) => Status::non_zero_exit(cmd, exit_code),
                Err(e) => Status::internal(format!("error executing command in container: {e}")),
            }
        }
        Target::Attach { container_id } => match shared.backend.attach(container_id, io).await {
            Ok(()) => Status::success(),
            Err(e) => Status::internal(format!("error attaching to container: {e}")),
        },
    };
    for done in dones {
        let _ = done.send(());
    }
    for task in tasks {
        let _ = task.await;
    }
    if let Some(r) = resizer {
        r.abort();
    }
    let body = if w.json_status {
        serde_json::to_vec(&status).unwrap_or_default()
    } else if status.status == "Success" {
        Vec::new()
    } else {
        status.message.clone().unwrap_or_default().into_bytes()
    };
    if !body.is_empty() {
        w.error.write(Bytes::from(body)).await;
    }
    w.error.close().await;
}

/// `metav1.Status`, field for field in Go's JSON order.
#[derive(Debug, Serialize)]
pub struct Status {
    metadata: Empty,
    /// "Success" or "Failure".
    pub status: &'static str,
    /// Human-readable description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
}

#[derive(Debug, Serialize)]
struct Empty {}

#[derive(Debug, Serialize)]
struct Details {
    causes: Vec<Cause>,
}

#[derive(Debug, Serialize)]
struct Cause {
    #[serde(rename = "reason", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    message: String,
}

impl Status {
    /// `{"metadata":{},"status":"Success"}`.
    pub fn success() -> Status {
        Status {
            metadata: Empty {},
            status: "Success",
            message: None,
            reason: None,
            details: None,
            code: None,
        }
    }

    /// Reason `NonZeroExitCode` with an `ExitCode` cause carrying the code, as kubelet sends.
    pub fn non_zero_exit(cmd: &[String], code: i32) -> Status {
        Status {
            metadata: Empty {},
            status: "Failure",
            message: Some(format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                cmd.join(" ")
            )),
            reason: Some("NonZeroExitCode"),
            details: Some(Details {
                causes: vec![Cause {
                    kind: Some("ExitCode"),
                    message: code.to_string(),
                }],
            }),
            code: None,
        }
    }

    /// `apierrors.NewInternalError`: reason `InternalError`, code 500.
    pub fn internal(err: String) -> Status {
        Status {
            metadata: Empty {},
            status: "Failure",
            message: Some(format!("Internal error occurred: {err}")),
            reason: Some("InternalError"),
            details: Some(Details {
                causes: vec![Cause {
                    kind: None,
                    message: err,
                }],
            }),
            code: Some(StatusCode::INTERNAL_SERVER_ERROR.as_u16()),
        }
    }
}

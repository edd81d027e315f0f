//! The CRI streaming server: where `Exec`, `Attach` and `PortForward` URLs point.
//!
//! The CRI RPCs only hand out a URL (`http://<addr>/{exec,attach,portforward}/<token>`); kubelet
//! (proxying kubectl) or crictl then connects there and speaks Kubernetes' remotecommand or
//! portforward protocol over SPDY/3.1 or WebSocket. This module serves those protocols and
//! turns each session into calls on a [`Backend`], which only ever sees byte pipes.

mod portforward;
mod remotecommand;
mod spdy;
mod spdy_conn;
#[cfg(test)]
mod tests;
mod tokens;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use k8s_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use tokio::task::JoinHandle;

use tokens::{CachedRequest, RequestCache, TokenError};

use crate::sandbox::SandboxError;
pub use tokens::{Clock, SystemClock};

pub use crate::pod::process::{ProcessIo, TerminalSize};

/// How an exec'd process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit status (0 is success).
    pub exit_code: i32,
}

/// What the runtime provides to the streaming server.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `cmd` in the container, wiring `io`; returns once the process exited and its
    /// output was sent into `io` (output sent after returning may be lost).
    async fn exec(
        &self,
        container_id: &str,
        cmd: &[String],
        io: ProcessIo,
    ) -> Result<ExitInfo, SandboxError>;
    /// Attaches `io` to the container's main process until the client or the process is done
    /// (like kubelet, the client is told success whatever the process's exit code).
    async fn attach(&self, container_id: &str, io: ProcessIo) -> Result<(), SandboxError>;
    /// Connects `stream` to `port` inside the sandbox's network namespace until either side
    /// closes. EOF on `stream` means the client finished sending.
    async fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
        stream: tokio::io::DuplexStream,
    ) -> Result<(), SandboxError>;
}

/// Tunables; [`Config::default`] matches kubelet's streaming defaults.
#[derive(Clone)]
pub struct Config {
    /// How long a URL's token stays valid (kubelet: 1 minute).
    pub token_ttl: Duration,
    /// Most outstanding tokens (kubelet: 1000).
    pub max_in_flight: usize,
    /// How long the client has to open its streams after the upgrade (kubelet: 30 s).
    pub stream_creation_timeout: Duration,
    /// Time source for token expiry.
    pub clock: Arc<dyn Clock>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            token_ttl: Duration::from_secs(60),
            max_in_flight: 1000,
            stream_creation_timeout: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
        }
    }
}

/// Why a URL could not be issued or the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    /// The CRI request is invalid (kubelet answers InvalidArgument).
    #[error("{0}")]
    InvalidArgument(&'static str),
    /// No token could be issued.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl From<StreamingError> for tonic::Status {
    fn from(e: StreamingError) -> Self {
        match e {
            StreamingError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            StreamingError::Token(TokenError::CacheFull(_)) => {
                tonic::Status::resource_exhausted(e.to_string())
            }
            other => tonic::Status::internal(other.to_string()),
        }
    }
}

/// State shared by every connection.
pub(crate) struct Shared {
    backend: Arc<dyn Backend>,
    cache: RequestCache,
    stream_creation_timeout: Duration,
}

/// The running streaming server; dropping it (or [`StreamingServer::shutdown`]) stops accepting.
pub struct StreamingServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl StreamingServer {
    /// Binds `addr` (port 0 picks one) and serves with [`Config::default`].
    pub async fn start(
        addr: SocketAddr,
        backend: Arc<dyn Backend>,
    ) -> Result<StreamingServer, StreamingError> {
        Self::start_with_config(addr, backend, Config::default()).await
    }

    /// Binds `addr` and serves with `config`.
    pub async fn start_with_config(
        addr: SocketAddr,
        backend: Arc<dyn Backend>,
        config: Config,
    ) -> Result<StreamingServer, StreamingError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StreamingError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| StreamingError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            backend,
            cache: RequestCache::new(config.clock, config.token_ttl, config.max_in_flight),
            stream_creation_timeout: config.stream_creation_timeout,
        });
        let accept = {
            let shared = shared.clone();
            tokio::spawn(crate::http::serve(
                listener,
                "streaming server",
                move |req| {
                    let shared = shared.clone();
                    async move { route(req, shared) }
                },
            ))
        };
        tracing::info!("streaming server listening on {bound}");
        Ok(StreamingServer {
            addr: bound,
            shared,
            accept,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Validates an `Exec` request (as kubelet does) and returns its single-use URL.
    pub fn exec_url(&self, req: &ExecRequest) -> Result<String, StreamingError> {
        check_io(
            &req.container_id,
            [req.stdin, req.stdout, req.stderr],
            req.tty,
        )?;
        if req.cmd.is_empty() {
            return Err(StreamingError::InvalidArgument("missing required cmd"));
        }
        self.url("exec", CachedRequest::Exec(req.clone()))
    }

    /// Validates an `Attach` request and returns its single-use URL.
    pub fn attach_url(&self, req: &AttachRequest) -> Result<String, StreamingError> {
        check_io(
            &req.container_id,
            [req.stdin, req.stdout, req.stderr],
            req.tty,
        )?;
        self.url("attach", CachedRequest::Attach(req.clone()))
    }

    /// Validates a `PortForward` request and returns its single-use URL.
    pub fn port_forward_url(&self, req: &PortForwardRequest) -> Result<String, StreamingError> {
        if req.pod_sandbox_id.is_empty() {
            return Err(StreamingError::InvalidArgument(
                "missing required pod_sandbox_id",
            ));
        }
        self.url("portforward", CachedRequest::PortForward(req.clone()))
    }

    fn url(&self, kind: &str, req: CachedRequest) -> Result<String, StreamingError> {
        let token = self.shared.cache.insert(req)?;
        Ok(format!("http://{}/{kind}/{token}", self.addr))
    }
}

impl Drop for StreamingServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Checks the streams an exec or attach asks for (`[stdin, stdout, stderr]`), as kubelet does.
fn check_io(container_id: &str, streams: [bool; 3], tty: bool) -> Result<(), StreamingError> {
    let [stdin, stdout, stderr] = streams;
    if container_id.is_empty() {
        return Err(StreamingError::InvalidArgument(
            "missing required container_id",
        ));
    }
    if tty && stderr {
        return Err(StreamingError::InvalidArgument(
            "tty and stderr cannot both be true",
        ));
    }
    if !stdin && !stdout && !stderr {
        return Err(StreamingError::InvalidArgument(
            "one of stdin, stdout, or stderr must be set",
        ));
    }
    Ok(())
}

pub(crate) use crate::http::plain;

fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let not_found = || plain(StatusCode::NOT_FOUND, "404 page not found\n");
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(kind), Some(token)) = (parts.next(), parts.next()) else {
        return not_found();
    };
    if !matches!(kind, "exec" | "attach" | "portforward") || token.is_empty() {
        return not_found();
    }
    if req.method() != Method::GET && req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "405: Method Not Allowed");
    }
    match (kind, shared.cache.consume(token)) {
        ("exec", Some(CachedRequest::Exec(r))) => {
            let opts = remotecommand::Options::new([r.stdin, r.stdout, r.stderr], r.tty);
            let target = remotecommand::Target::Exec {
                container_id: r.container_id,
                cmd: r.cmd,
            };
            remotecommand::serve(req, target, opts, shared)
        }
        ("attach", Some(CachedRequest::Attach(r))) => {
            let opts = remotecommand::Options::new([r.stdin, r.stdout, r.stderr], r.tty);
            let target = remotecommand::Target::Attach {
                container_id: r.container_id,
            };
            remotecommand::serve(req, target, opts, shared)
        }
        ("portforward", Some(CachedRequest::PortForward(r))) => portforward::serve(req, r, shared),
        _ => not_found(),
    }
}

/// A `101 Switching Protocols` response carrying `headers`.
pub(crate) fn switching_protocols(headers: hyper::HeaderMap) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = headers;
    resp
}

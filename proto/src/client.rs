//! Host side: reach the guest agent through the VMM's hybrid-vsock unix socket.
//!
//! The VMM exposes the guest's vsock device as a unix socket speaking the Firecracker "hybrid vsock"
//! convention: the host connects, writes `CONNECT <port>\n` and reads `OK <hostport>\n`; from then on the
//! stream is a byte pipe to the guest's listener on `<port>`, here HTTP/2 for tonic.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::AgentClient;

/// Interval of HTTP/2 keepalive pings to the agent.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an unanswered keepalive ping may take before the connection is considered dead (generous:
/// the guest kernel is emulated on PVM hosts).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long the VMM may take to answer `CONNECT <port>`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response the client decodes: a full 4 MiB `ReadFile` chunk plus framing (tonic's default is 4 MiB).
pub const MAX_RESPONSE_BYTES: usize = crate::MAX_READ_BYTES as usize + 64 * 1024;

/// Longest reply line accepted (`OK 4294967295` is 13 bytes).
const MAX_REPLY_LEN: usize = 64;

/// Errors of the hybrid-vsock client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The unix socket could not be connected.
    #[error("connecting to hybrid vsock socket {path}: {source}")]
    Connect {
        /// The unix socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Reading or writing the handshake failed.
    #[error("hybrid vsock handshake I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The VMM closed the connection instead of replying (typically: nothing listens on the guest port yet).
    #[error("hybrid vsock connection closed before the reply to CONNECT {port}")]
    Closed {
        /// The guest port asked for.
        port: u32,
    },
    /// The reply line was not `OK <hostport>`.
    #[error("unexpected hybrid vsock reply to CONNECT {port}: {reply:?}")]
    BadReply {
        /// The guest port asked for.
        port: u32,
        /// The reply received (lossy UTF-8, without the newline).
        reply: String,
    },
    /// No reply line within the handshake timeout.
    #[error("no hybrid vsock reply to CONNECT {port} within {timeout:?}")]
    Timeout {
        /// The guest port asked for.
        port: u32,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The HTTP/2 channel could not be set up over the connected stream.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Connects to `port` in the guest through the hybrid-vsock unix socket `uds`.
///
/// Returns the connected stream (positioned right after the handshake) and the host port from `OK <hostport>`.
pub async fn hybrid_vsock_connect(uds: &Path, port: u32) -> Result<(UnixStream, u32), ClientError> {
    hybrid_vsock_connect_timeout(uds, port, HANDSHAKE_TIMEOUT).await
}

/// [`hybrid_vsock_connect`] with an explicit handshake timeout.
pub async fn hybrid_vsock_connect_timeout(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(UnixStream, u32), ClientError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| ClientError::Connect {
            path: uds.to_path_buf(),
            source,
        })?;
    let host_port = tokio::time::timeout(timeout, handshake(&mut stream, port))
        .await
        .map_err(|_| ClientError::Timeout { port, timeout })??;
    Ok((stream, host_port))
}

/// Writes `CONNECT <port>\n` and reads the reply line byte by byte, so that no byte after the newline (the
/// start of the guest's data) is consumed.
async fn handshake(stream: &mut UnixStream, port: u32) -> Result<u32, ClientError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(ClientError::Closed { port });
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY_LEN {
            return Err(bad_reply(port, &line));
        }
    }
    parse_reply(port, &line)
}

/// Parses `OK <hostport>` (without the newline).
fn parse_reply(port: u32, line: &[u8]) -> Result<u32, ClientError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|text| text.strip_prefix("OK "))
        .and_then(|num| num.parse::<u32>().ok())
        .ok_or_else(|| bad_reply(port, line))
}

fn bad_reply(port: u32, line: &[u8]) -> ClientError {
    ClientError::BadReply {
        port,
        reply: String::from_utf8_lossy(line).into_owned(),
    }
}

/// Opens an [`AgentClient`] to the agent on `port` through the hybrid-vsock unix socket `uds`.
///
/// The first connection is made (and its handshake checked) before returning, so errors such as
/// [`ClientError::Closed`] (the agent is not listening yet) come back as such; callers retry. If the channel
/// later reconnects, it does a new handshake.
pub async fn connect_hybrid_vsock(
    uds: &Path,
    port: u32,
) -> Result<AgentClient<Channel>, ClientError> {
    let uds = uds.to_path_buf();
    channel_over(move || {
        let uds = uds.clone();
        async move { Ok(hybrid_vsock_connect(&uds, port).await?.0) }
    })
    .await
}

/// Why [`wait_for_agent`] gave up: the agent did not answer Health within the timeout. The variant is the
/// last attempt's failure, kept as the error's source.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No attempt could be made within the timeout.
    #[error("agent not ready after {timeout:?}: never tried")]
    Timeout {
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The last attempt could not open a client (typically [`ClientError::Closed`]: the agent does not
    /// listen yet).
    #[error("agent not ready after {timeout:?}: {source}")]
    Connect {
        /// The timeout that expired.
        timeout: Duration,
        /// The last attempt's failure.
        source: ClientError,
    },
    /// The last attempt connected but the agent's Health call failed.
    #[error("agent not ready after {timeout:?}: health: {source}")]
    Health {
        /// The timeout that expired.
        timeout: Duration,
        /// The Health call's status (boxed: a `Status` is large).
        source: Box<tonic::Status>,
    },
}

/// Pause between two attempts of [`wait_for_agent`] (a VM boots for seconds).
const RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// Pause between two attempts of [`wait_for_node_agent`] (a process on the node is up in milliseconds).
const NODE_RETRY_INTERVAL: Duration = Duration::from_millis(5);

/// Connects to the agent ([`crate::AGENT_VSOCK_PORT`]) through `uds`, retrying until it answers Health or
/// `timeout` passes.
pub async fn wait_for_agent(
    uds: &Path,
    timeout: Duration,
) -> Result<AgentClient<Channel>, ConnectError> {
    wait_until_healthy(timeout, RETRY_INTERVAL, || {
        connect_hybrid_vsock(uds, crate::AGENT_VSOCK_PORT)
    })
    .await
}

/// Connects to an agent serving on the node (a native pod's) at the unix socket `path`, retrying until it
/// answers Health or `timeout` passes.
pub async fn wait_for_node_agent(
    path: &Path,
    timeout: Duration,
) -> Result<AgentClient<Channel>, ConnectError> {
    wait_until_healthy(timeout, NODE_RETRY_INTERVAL, || connect_unix(path)).await
}

/// Retries `connect` and Health every `interval` until both succeed or `timeout` passes.
async fn wait_until_healthy<F, Fut>(
    timeout: Duration,
    interval: Duration,
    connect: F,
) -> Result<AgentClient<Channel>, ConnectError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<AgentClient<Channel>, ClientError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = ConnectError::Timeout { timeout };
    while tokio::time::Instant::now() < deadline {
        match connect().await {
            Ok(mut client) => match client.health(crate::HealthRequest {}).await {
                Ok(_) => return Ok(client),
                Err(status) => {
                    last = ConnectError::Health {
                        timeout,
                        source: Box::new(status),
                    }
                }
            },
            Err(source) => last = ConnectError::Connect { timeout, source },
        }
        tokio::time::sleep(interval).await;
    }
    Err(last)
}

/// Opens an [`AgentClient`] to an agent listening on the unix socket `path` (a native pod's agent on the
/// node). The first connection is made before returning; reconnects open the socket again.
pub async fn connect_unix(path: &Path) -> Result<AgentClient<Channel>, ClientError> {
    let path = path.to_path_buf();
    channel_over(move || {
        let path = path.clone();
        async move {
            UnixStream::connect(&path)
                .await
                .map_err(|source| ClientError::Connect { path, source })
        }
    })
    .await
}

/// The agent channel whose connections `open` makes: the first one before returning (so that its
/// error comes back to the caller), later ones when the channel reconnects.
async fn channel_over<F, Fut>(open: F) -> Result<AgentClient<Channel>, ClientError>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<UnixStream, ClientError>> + Send + 'static,
{
    let first = Arc::new(Mutex::new(Some(open().await?)));
    let open = Arc::new(open);
    let connector = tower::service_fn(move |_: Uri| {
        let (first, open) = (first.clone(), open.clone());
        async move {
            let ready = first.lock().unwrap_or_else(|e| e.into_inner()).take();
            let stream = match ready {
                Some(stream) => stream,
                None => open().await?,
            };
            Ok::<_, ClientError>(TokioIo::new(stream))
        }
    });
    channel(connector).await
}

/// The agent channel over `connector`'s streams, with HTTP/2 keepalive: an agent that stopped answering
/// (hung, or gone with the connection half-open) fails the calls waiting on it instead of leaving them
/// pending forever.
async fn channel<C>(connector: C) -> Result<AgentClient<Channel>, ClientError>
where
    C: tower::Service<Uri, Response = TokioIo<UnixStream>, Error = ClientError> + Send + 'static,
    C::Future: Send + 'static,
{
    // The URI is only used for the HTTP/2 :authority; the connector ignores it.
    let channel = Endpoint::from_static("http://[::]:50051")
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await?;
    Ok(AgentClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Agent, AgentServer, HealthRequest, HealthResponse, ReadFileRequest, ReadFileResponse,
        ServingStatus,
    };
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// Accepts one connection, checks the CONNECT line, answers `reply`, then hands the stream to `then`.
    async fn fake_vmm<F, Fut>(listener: UnixListener, reply: &'static [u8], then: F)
    where
        F: FnOnce(UnixStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut line = Vec::new();
        let mut reader = tokio::io::BufReader::new(&mut stream);
        reader.read_until(b'\n', &mut line).await.unwrap();
        assert_eq!(line, b"CONNECT 1024\n");
        stream.write_all(reply).await.unwrap();
        then(stream).await;
    }

    fn socket() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    #[tokio::test]
    async fn ok_reply_keeps_following_bytes() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(fake_vmm(listener, b"OK 1073741824\nhello", |_s| async {}));
        let (mut stream, host_port) = hybrid_vsock_connect(&path, 1024).await.unwrap();
        assert_eq!(host_port, 1_073_741_824);
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn garbage_reply_is_rejected() {
        for reply in [&b"NOPE\n"[..], b"OK\n", b"OK x\n", b"ok 5\n", b"OK 5 6\n"] {
            let (_dir, path, listener) = socket();
            let server = tokio::spawn(fake_vmm(listener, reply, |_s| async {}));
            let err = hybrid_vsock_connect(&path, 1024).await.unwrap_err();
            assert!(
                matches!(err, ClientError::BadReply { port: 1024, .. }),
                "{err}"
            );
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn overlong_reply_is_rejected() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(fake_vmm(listener, &[b'O'; 200], |_s| async {}));
        let err = hybrid_vsock_connect(&path, 1024).await.unwrap_err();
        assert!(matches!(err, ClientError::BadReply { .. }), "{err}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn closed_connection_is_reported() {
        let (_dir, path, listener) = socket();
        // Closes mid-line: a partial reply is not a reply.
        let server = tokio::spawn(fake_vmm(listener, b"OK 12", |_s| async {}));
        let err = hybrid_vsock_connect(&path, 1024).await.unwrap_err();
        assert!(matches!(err, ClientError::Closed { port: 1024 }), "{err}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = hybrid_vsock_connect(&dir.path().join("none"), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn silent_vmm_times_out() {
        let (_dir, path, listener) = socket();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(stream);
        });
        let err = hybrid_vsock_connect_timeout(&path, 1024, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn wait_for_agent_keeps_the_last_cause() {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("none");
        let err = wait_for_agent(&none, Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
        let err = wait_for_agent(&none, Duration::from_millis(300))
            .await
            .unwrap_err();
        match &err {
            ConnectError::Connect {
                source: ClientError::Connect { path, .. },
                ..
            } => assert_eq!(path, &none),
            other => panic!("{other}"),
        }
        let source = std::error::Error::source(&err).expect("a source");
        assert!(source.to_string().contains("none"), "{source}");
        assert!(
            err.to_string().starts_with("agent not ready after 300ms: "),
            "{err}"
        );
    }

    /// An agent whose Health always fails.
    struct SickAgent;

    #[tonic::async_trait]
    impl Agent for SickAgent {
        async fn health(
            &self,
            _: tonic::Request<HealthRequest>,
        ) -> Result<tonic::Response<HealthResponse>, tonic::Status> {
            Err(tonic::Status::unavailable("still starting"))
        }
    }

    #[tokio::test]
    async fn wait_for_agent_reports_a_failing_health() {
        let (_dir, path, listener) = socket();
        // Every retry is a new connection: serve each one.
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut line = Vec::new();
                let mut reader = tokio::io::BufReader::new(&mut stream);
                reader.read_until(b'\n', &mut line).await.unwrap();
                stream.write_all(b"OK 7\n").await.unwrap();
                let incoming = tokio_stream::iter([Ok::<_, std::io::Error>(stream)]);
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .serve_with_incoming(AgentServer::new(SickAgent), incoming),
                );
            }
        });
        let err = wait_for_agent(&path, Duration::from_millis(500))
            .await
            .unwrap_err();
        match &err {
            ConnectError::Health { source, .. } => {
                assert_eq!(source.code(), tonic::Code::Unavailable)
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("still starting"), "{err}");
    }

    struct FakeAgent;

    #[tonic::async_trait]
    impl Agent for FakeAgent {
        async fn health(
            &self,
            _: tonic::Request<HealthRequest>,
        ) -> Result<tonic::Response<HealthResponse>, tonic::Status> {
            Ok(tonic::Response::new(HealthResponse {
                status: ServingStatus::Serving.into(),
            }))
        }

        async fn read_file(
            &self,
            _: tonic::Request<ReadFileRequest>,
        ) -> Result<tonic::Response<ReadFileResponse>, tonic::Status> {
            Ok(tonic::Response::new(ReadFileResponse {
                data: vec![1; crate::MAX_READ_BYTES as usize],
                eof: true,
            }))
        }
    }

    #[tokio::test]
    async fn grpc_over_hybrid_vsock() {
        let (_dir, path, listener) = socket();
        tokio::spawn(fake_vmm(listener, b"OK 7\n", |stream| async move {
            let incoming = tokio_stream::iter([Ok::<_, std::io::Error>(stream)]);
            tonic::transport::Server::builder()
                .serve_with_incoming(AgentServer::new(FakeAgent), incoming)
                .await
                .unwrap();
        }));
        let mut client = connect_hybrid_vsock(&path, 1024).await.unwrap();
        let health = client.health(HealthRequest {}).await.unwrap().into_inner();
        assert_eq!(health.status(), ServingStatus::Serving);
        // A maximal ReadFile chunk fits the client's decoding limit.
        let chunk = client
            .read_file(ReadFileRequest {
                path: "/x".into(),
                offset: 0,
                max_bytes: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(chunk.data.len(), crate::MAX_READ_BYTES as usize);
        // Methods the fake does not implement answer Unimplemented (default stubs).
        let err = client.version(crate::VersionRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
    }

    #[tokio::test]
    async fn node_agent_over_a_plain_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        // Nothing listens yet: the wait keeps the connect error as its cause.
        let err = wait_for_node_agent(&path, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Connect { .. }), "{err}");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
            AgentServer::new(FakeAgent),
            tokio_stream::wrappers::UnixListenerStream::new(listener),
        ));
        let mut client = wait_for_node_agent(&path, Duration::from_secs(5))
            .await
            .unwrap();
        // Every call works, and a second client opens its own connection.
        let chunk = client
            .read_file(ReadFileRequest {
                path: "/x".into(),
                offset: 0,
                max_bytes: 0,
            })
            .await
            .unwrap();
        assert!(chunk.into_inner().eof);
        let mut other = connect_unix(&path).await.unwrap();
        other.health(HealthRequest {}).await.unwrap();
    }
}

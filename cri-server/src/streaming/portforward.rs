//! Port-forward sessions: Kubernetes' portforward protocol over SPDY or WebSocket.
//!
//! SPDY (`portforward.k8s.io`): each forwarded connection is a pair of client-opened streams,
//! `streamType` data and error, with the same `requestID` and a `port` header. WebSocket
//! (`v4.channel.k8s.io`, `v4.base64.channel.k8s.io`): ports come from the `port` query
//! parameters; port *i* gets data channel 2*i* and error channel 2*i*+1, and the first message
//! the server sends on each is the port as 2 little-endian bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::PortForwardRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::spdy::RST_CANCEL;
use super::spdy_conn::{self, IncomingStream};
use super::websocket::{self, ChannelConn, ChannelWriter};
use super::{plain, switching_protocols, Shared};

/// The SPDY port-forward protocol.
const SPDY_PROTOCOLS: &[&str] = &["portforward.k8s.io"];
/// WebSocket subprotocols kubelet accepts for port forwarding.
const WS_PROTOCOLS: &[&str] = &[websocket::V4_CHANNEL, websocket::V4_BASE64_CHANNEL, ""];
/// Buffer between the protocol side and the backend's end of the duplex pipe.
const PIPE: usize = 64 * 1024;

/// Why a port-forward request or stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    /// `port` query parameter / header missing.
    #[error("{0:?} is required")]
    MissingPort(&'static str),
    /// A port that is not 1..=65535.
    #[error("unable to parse {0:?} as a port")]
    BadPort(String),
    /// A stream whose `streamType` is neither data nor error.
    #[error("invalid stream type {0:?}")]
    BadStreamType(String),
}

/// Answers the upgrade request and runs the session on the upgraded connection.
pub fn serve(
    req: Request<Incoming>,
    pf: PortForwardRequest,
    shared: Arc<Shared>,
) -> Response<Full<Bytes>> {
    let sandbox = pf.pod_sandbox_id.clone();
    if websocket::is_websocket_request(req.headers()) {
        let ports = match query_ports(req.uri().query().unwrap_or("")) {
            Ok(p) if p.is_empty() => pf
                .port
                .iter()
                .filter_map(|p| u16::try_from(*p).ok())
                .collect(),
            Ok(p) => p,
            Err(e) => return plain(StatusCode::BAD_REQUEST, e.to_string()),
        };
        if ports.is_empty() || ports.contains(&0) {
            let e = PortForwardError::MissingPort("port");
            return plain(StatusCode::BAD_REQUEST, format!("query parameter {e}"));
        }
        let (protocol, headers) = match websocket::accept(req.headers(), WS_PROTOCOLS) {
            Ok(ok) => ok,
            Err(e) => return plain(e.status, e.message),
        };
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => run_ws(up, &protocol, ports, sandbox, shared).await,
                Err(e) => tracing::warn!("port-forward: upgrade failed: {e}"),
            }
        });
        return switching_protocols(headers);
    }
    let (_, headers) = match spdy_conn::handshake(req.headers(), SPDY_PROTOCOLS) {
        Ok(ok) => ok,
        Err(resp) => return *resp,
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(up) => run_spdy(up, sandbox, shared).await,
            Err(e) => tracing::warn!("port-forward: upgrade failed: {e}"),
        }
    });
    switching_protocols(headers)
}

/// `port` query values, each possibly comma-separated (kubelet's `NewV4Options`).
fn query_ports(query: &str) -> Result<Vec<u16>, PortForwardError> {
    let mut ports = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        // `port` is kubelet's name; `ports` (the API server's) is accepted too.
        if key != "port" && key != "ports" {
            continue;
        }
        for p in value.split(',') {
            match p.parse::<u16>() {
                Ok(port) if port > 0 => ports.push(port),
                _ => return Err(PortForwardError::BadPort(value.to_string())),
            }
        }
    }
    Ok(ports)
}

/// The data and error streams of one forwarded connection, as they arrive.
#[derive(Default)]
struct Pair {
    data: Option<IncomingStream>,
    error: Option<IncomingStream>,
    since: Option<Instant>,
}

fn check_stream(s: &IncomingStream) -> Result<(u16, bool), PortForwardError> {
    let port = s
        .header("port")
        .ok_or(PortForwardError::MissingPort("port"))?;
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(PortForwardError::BadPort(port.to_string())),
    };
    match s.header("streamtype") {
        Some("data") => Ok((port, true)),
        Some("error") => Ok((port, false)),
        other => Err(PortForwardError::BadStreamType(
            other.unwrap_or("").to_string(),
        )),
    }
}

async fn run_spdy(up: hyper::upgrade::Upgraded, sandbox: String, shared: Arc<Shared>) {
    let (mut incoming, ctl) = spdy_conn::start(TokioIo::new(up));
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut running = JoinSet::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            stream = incoming.recv() => {
                let Some(stream) = stream else { break };
                let (port, is_data) = match check_stream(&stream) {
                    Ok(ok) => ok,
                    Err(e) => {
                        tracing::warn!("port-forward: rejecting stream {}: {e}", stream.id);
                        let _ = stream.out.reset(RST_CANCEL).await;
                        continue;
                    }
                };
                // Old clients send no requestID: pair error stream N with data stream N-2.
                let id = match stream.header("requestid") {
                    Some(id) if !id.is_empty() => id.to_string(),
                    _ if is_data => (stream.id + 2).to_string(),
                    _ => stream.id.to_string(),
                };
                let pair = pairs.entry(id.clone()).or_default();
                pair.since.get_or_insert_with(Instant::now);
                if is_data {
                    pair.data = Some(stream);
                } else {
                    pair.error = Some(stream);
                }
                if pair.data.is_some() && pair.error.is_some() {
                    let Some(Pair { data: Some(data), error: Some(error), .. }) = pairs.remove(&id)
                    else { continue };
                    let (sandbox, shared) = (sandbox.clone(), shared.clone());
                    running.spawn(async move {
                        forward_spdy(port, data, error, &sandbox, &shared).await;
                    });
                }
            }
            _ = tick.tick() => {
                let timeout = shared.stream_creation_timeout;
                let stale: Vec<String> = pairs
                    .iter()
                    .filter(|(_, p)| p.since.is_some_and(|t| t.elapsed() > timeout))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in stale {
                    let Some(pair) = pairs.remove(&id) else { continue };
                    if let Some(err) = pair.error {
                        let msg = format!("(request={id}) timed out waiting for streams");
                        let _ = err.out.write(Bytes::from(msg)).await;
                        let _ = err.out.close().await;
                    }
                    if let Some(data) = pair.data {
                        let _ = data.out.close().await;
                    }
                }
            }
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    // The client is gone: abort what still runs (the backend sees its pipe close).
    running.shutdown().await;
    ctl.close().await;
}

async fn forward_spdy(
    port: u16,
    data: IncomingStream,
    error: IncomingStream,
    sandbox: &str,
    shared: &Shared,
) {
    let out = data.out.clone();
    let result = pump(port, data.data, sandbox, shared, |chunk| {
        let out = out.clone();
        async move { out.write(chunk).await.is_ok() }
    })
    .await;
    let _ = data.out.close().await;
    if let Err(msg) = result {
        let _ = error.out.write(Bytes::from(msg)).await;
    }
    let _ = error.out.close().await;
}

/// Runs the backend on one end of a duplex pipe, feeding it `inbound` and sending what it
/// writes through `send`; returns kubelet's error text if the backend failed.
async fn pump<F, Fut>(
    port: u16,
    mut inbound: mpsc::Receiver<Bytes>,
    sandbox: &str,
    shared: &Shared,
    send: F,
) -> Result<(), String>
where
    F: Fn(Bytes) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let (mut rd, mut wr) = tokio::io::split(ours);
    let up = tokio::spawn(async move {
        while let Some(chunk) = inbound.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !send(Bytes::copy_from_slice(&buf[..n])).await {
                        break;
                    }
                }
            }
        }
    };
    let (result, ()) = tokio::join!(shared.backend.port_forward(sandbox, port, theirs), down);
    up.abort();
    result.map_err(|e| format!("error forwarding port {port} to pod {sandbox}, uid : {e}"))
}

async fn run_ws(
    up: hyper::upgrade::Upgraded,
    protocol: &str,
    ports: Vec<u16>,
    sandbox: String,
    shared: Arc<Shared>,
) {
    let readable: Vec<u8> = (0..ports.len()).map(|i| (i * 2) as u8).collect();
    let mut conn = ChannelConn::start(up, protocol, ports.len() * 2, &readable).await;
    let mut sessions = JoinSet::new();
    for (i, port) in ports.into_iter().enumerate() {
        let data = conn.writer((i * 2) as u8);
        let error = conn.writer((i * 2 + 1) as u8);
        let prefix = Bytes::copy_from_slice(&port.to_le_bytes());
        let _ = data.write(prefix.clone()).await;
        let _ = error.write(prefix).await;
        let inbound = conn.inbound[i * 2]
            .take()
            .unwrap_or_else(|| mpsc::channel(1).1);
        let (sandbox, shared) = (sandbox.clone(), shared.clone());
        sessions.spawn(async move {
            forward_ws(port, inbound, data, error, &sandbox, &shared).await;
        });
    }
    while sessions.join_next().await.is_some() {}
    conn.close().await;
}

async fn forward_ws(
    port: u16,
    inbound: mpsc::Receiver<Bytes>,
    data: ChannelWriter,
    error: ChannelWriter,
    sandbox: &str,
    shared: &Shared,
) {
    let result = pump(port, inbound, sandbox, shared, |chunk| {
        let data = data.clone();
        async move { data.write(chunk).await.is_ok() }
    })
    .await;
    if let Err(msg) = result {
        let _ = error.write(Bytes::from(msg)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_from_query() {
        assert_eq!(
            query_ports("port=80&port=8080,9090").unwrap(),
            vec![80, 8080, 9090]
        );
        assert_eq!(query_ports("x=1").unwrap(), Vec::<u16>::new());
        assert!(query_ports("port=0").is_err());
        assert!(query_ports("port=").is_err());
        assert!(query_ports("port=70000").is_err());
    }
}

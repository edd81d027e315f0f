//! Kubernetes' channel protocol over WebSocket (apiserver `wsstream` semantics).
//!
//! Every message carries one channel: binary protocols prefix the payload with the channel
//! byte; the `base64.` protocols send text whose first character is `'0' + channel` followed by
//! the payload in base64. `v5.channel.k8s.io` adds the message `[255, channel]`, which closes
//! that channel's inbound direction (stdin EOF).

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use hyper::{HeaderMap, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// `channel.k8s.io`: binary, status on the error channel as plain text.
pub const CHANNEL: &str = "channel.k8s.io";
/// `base64.channel.k8s.io`.
pub const BASE64_CHANNEL: &str = "base64.channel.k8s.io";
/// `v4.channel.k8s.io`: binary, JSON `metav1.Status` on the error channel.
pub const V4_CHANNEL: &str = "v4.channel.k8s.io";
/// `v4.base64.channel.k8s.io`.
pub const V4_BASE64_CHANNEL: &str = "v4.base64.channel.k8s.io";
/// `v5.channel.k8s.io`: v4 plus the close-channel message.
pub const V5_CHANNEL: &str = "v5.channel.k8s.io";
/// Channel number of the v5 close signal.
const CLOSE_CHANNEL: u8 = 255;

/// A rejected WebSocket handshake, answered with `status` and `message`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandshakeError {
    /// 400 for a malformed handshake, 403 when no subprotocol matches (as x/net/websocket).
    pub status: StatusCode,
    /// Body text.
    pub message: String,
}

/// True when the request asks for a WebSocket upgrade (`Upgrade: websocket`, `Connection: upgrade`).
pub fn is_websocket_request(headers: &HeaderMap) -> bool {
    let upgrade = headers.get(UPGRADE).and_then(|v| v.to_str().ok());
    upgrade.is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        && headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// Validates the handshake and picks the first client-offered subprotocol in `allowed`
/// (`""` in `allowed` accepts a client that offers none). Returns the protocol and the 101 headers.
pub fn accept(
    headers: &HeaderMap,
    allowed: &[&str],
) -> Result<(String, HeaderMap), HandshakeError> {
    let bad = |m: &str| HandshakeError {
        status: StatusCode::BAD_REQUEST,
        message: m.to_string(),
    };
    if headers.get("sec-websocket-version").map(|v| v.as_bytes()) != Some(b"13") {
        return Err(bad("unsupported or missing Sec-WebSocket-Version"));
    }
    let key = headers
        .get("sec-websocket-key")
        .ok_or_else(|| bad("missing Sec-WebSocket-Key"))?;
    let offered: Vec<String> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let offered = if offered.is_empty() {
        vec![String::new()]
    } else {
        offered
    };
    let protocol = offered
        .iter()
        .find(|p| allowed.contains(&p.as_str()))
        .ok_or_else(|| HandshakeError {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "requested protocol(s) are not supported: {offered:?}; supports {allowed:?}"
            ),
        })?
        .clone();
    let mut out = HeaderMap::new();
    out.insert(UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = derive_accept_key(key.as_bytes());
    out.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).map_err(|_| bad("bad key"))?,
    );
    if !protocol.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&protocol) {
            out.insert("sec-websocket-protocol", v);
        }
    }
    Ok((protocol, out))
}

enum Out {
    Data(u8, Bytes),
    Close,
}

/// An open channel connection: inbound receivers for readable channels, writers for the rest.
pub struct ChannelConn {
    /// Inbound data per channel (index = channel); `Some` only for readable channels.
    pub inbound: Vec<Option<mpsc::Receiver<Bytes>>>,
    tx: mpsc::Sender<Out>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

/// Writes messages on one channel; cheap to clone.
#[derive(Clone)]
pub struct ChannelWriter {
    channel: u8,
    tx: mpsc::Sender<Out>,
}

/// Why a channel write failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The WebSocket is closed.
    #[error("websocket closed")]
    Closed,
}

impl ChannelWriter {
    /// Sends `data` as one message on this channel (an empty one is just the channel prefix).
    pub async fn write(&self, data: Bytes) -> Result<(), WsError> {
        self.tx
            .send(Out::Data(self.channel, data))
            .await
            .map_err(|_| WsError::Closed)
    }
}

impl ChannelConn {
    /// Wraps an upgraded connection. `channels` is the channel count, `readable` those whose
    /// inbound messages are delivered; `protocol` picks the codec (binary/base64, v5 close).
    pub async fn start(
        upgraded: hyper::upgrade::Upgraded,
        protocol: &str,
        channels: usize,
        readable: &[u8],
    ) -> ChannelConn {
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let (sink, stream) = ws.split();
        let base64 = protocol.contains("base64");
        let v5 = protocol == V5_CHANNEL;
        let mut inbound = Vec::with_capacity(channels);
        let mut senders = Vec::with_capacity(channels);
        for ch in 0..channels {
            if readable.contains(&(ch as u8)) {
                let (tx, rx) = mpsc::channel(32);
                inbound.push(Some(rx));
                senders.push(Some(tx));
            } else {
                inbound.push(None);
                senders.push(None);
            }
        }
        let (tx, rx) = mpsc::channel(64);
        ChannelConn {
            inbound,
            tx,
            reader: tokio::spawn(read_loop(stream, senders, base64, v5)),
            writer: Some(tokio::spawn(write_loop(sink, rx, base64))),
        }
    }

    /// A writer for `channel`.
    pub fn writer(&self, channel: u8) -> ChannelWriter {
        ChannelWriter {
            channel,
            tx: self.tx.clone(),
        }
    }

    /// Sends everything queued, then a normal Close frame; waits briefly for the peer's Close.
    pub async fn close(mut self) {
        let _ = self.tx.send(Out::Close).await;
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut self.reader).await;
        self.reader.abort();
    }
}

impl Drop for ChannelConn {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }
}

type WsSink =
    futures_util::stream::SplitSink<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, Message>;
type WsStream =
    futures_util::stream::SplitStream<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>>;

async fn write_loop(mut sink: WsSink, mut rx: mpsc::Receiver<Out>, base64: bool) {
    while let Some(out) = rx.recv().await {
        let msg = match out {
            Out::Data(ch, data) if base64 => {
                let mut s = String::with_capacity(1 + data.len() * 4 / 3 + 4);
                s.push((b'0' + ch) as char);
                base64::engine::general_purpose::STANDARD.encode_string(&data, &mut s);
                Message::text(s)
            }
            Out::Data(ch, data) => {
                let mut v = Vec::with_capacity(1 + data.len());
                v.push(ch);
                v.extend_from_slice(&data);
                Message::binary(v)
            }
            Out::Close => {
                let frame = CloseFrame {
                    code:
                        tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                    reason: "".into(),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
                return;
            }
        };
        if sink.send(msg).await.is_err() {
            return;
        }
    }
}

async fn read_loop(
    mut stream: WsStream,
    mut senders: Vec<Option<mpsc::Sender<Bytes>>>,
    base64: bool,
    v5: bool,
) {
    while let Some(msg) = stream.next().await {
        let raw: Bytes = match msg {
            Ok(Message::Binary(b)) => b,
            // Clients (the Python one among them) may send text frames on binary protocols.
            Ok(Message::Text(t)) => Bytes::copy_from_slice(t.as_bytes()),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let Some((&first, rest)) = raw.split_first() else {
            continue;
        };
        let (channel, data) = if base64 {
            let Some(ch) = first.checked_sub(b'0') else {
                continue;
            };
            match base64::engine::general_purpose::STANDARD.decode(rest) {
                Ok(d) => (ch, Bytes::from(d)),
                Err(_) => continue,
            }
        } else {
            (first, raw.slice(1..))
        };
        if v5 && channel == CLOSE_CHANNEL {
            if let Some(&target) = data.first() {
                if let Some(slot) = senders.get_mut(target as usize) {
                    *slot = None;
                }
            }
            continue;
        }
        let Some(Some(sink)) = senders.get(channel as usize) else {
            continue;
        };
        if !data.is_empty() && sink.send(data).await.is_err() {
            senders[channel as usize] = None;
        }
    }
}

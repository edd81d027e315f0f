//! A server-side SPDY/3.1 connection: peer-opened streams in, per-stream writers out.
//!
//! Like spdystream's server, it replies to every SYN_STREAM at once, echoes client PINGs, ignores
//! SETTINGS / WINDOW_UPDATE (spdystream does no flow control) and stops reading at GOAWAY. One
//! writer task owns the socket's write half, so frames leave in the order they were queued.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use http_body_util::Full;
use hyper::header::{HeaderValue, CONNECTION, UPGRADE};
use hyper::{HeaderMap, Response, StatusCode};

use super::plain;
use super::spdy::{self, Frame, HeaderCompressor, HeaderDecompressor, Headers};

/// `Upgrade` token for SPDY/3.1.
pub const SPDY_31: &str = "SPDY/3.1";
/// Header carrying the offered / negotiated stream protocol.
pub const PROTOCOL_VERSION: &str = "x-stream-protocol-version";
/// Header listing the server's protocols when negotiation fails.
pub const ACCEPTED_PROTOCOL_VERSIONS: &str = "x-accepted-stream-protocol-versions";

/// Largest DATA payload we send in one frame.
const CHUNK: usize = 32 * 1024;

/// Why a stream write failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The connection's writer is gone (peer closed, or the connection was shut down).
    #[error("spdy connection closed")]
    Closed,
}

enum Cmd {
    Frame(Frame),
    Shutdown,
}

/// A stream the peer opened: its headers, its inbound bytes and a writer for our side.
pub struct IncomingStream {
    /// Stream id (odd: client-initiated).
    pub id: u32,
    /// SYN_STREAM headers, names lowercase.
    pub headers: Headers,
    /// Inbound payload; ends (returns `None`) at the peer's FIN, a reset, or connection close.
    pub data: mpsc::Receiver<Bytes>,
    /// Our half of the stream.
    pub out: StreamWriter,
}

impl IncomingStream {
    /// First value of header `name` (case-insensitive; NUL-joined values are split).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or(""))
    }
}

/// Sends DATA (and FIN / RST) on one stream; cheap to clone.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    tx: mpsc::Sender<Cmd>,
}

impl StreamWriter {
    /// Queues `data` as one or more DATA frames.
    pub async fn write(&self, mut data: Bytes) -> Result<(), ConnError> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(CHUNK));
            self.send(Frame::Data {
                stream_id: self.id,
                flags: 0,
                data: chunk,
            })
            .await?;
        }
        Ok(())
    }

    /// Half-closes our side (empty DATA frame with FIN), as spdystream's `Close` does.
    pub async fn close(&self) -> Result<(), ConnError> {
        self.send(Frame::Data {
            stream_id: self.id,
            flags: spdy::FLAG_FIN,
            data: Bytes::new(),
        })
        .await
    }

    /// Aborts the stream with RST_STREAM `status`.
    pub async fn reset(&self, status: u32) -> Result<(), ConnError> {
        self.send(Frame::RstStream {
            stream_id: self.id,
            status,
        })
        .await
    }

    async fn send(&self, frame: Frame) -> Result<(), ConnError> {
        self.tx
            .send(Cmd::Frame(frame))
            .await
            .map_err(|_| ConnError::Closed)
    }
}

/// Shuts the connection down; dropping it without [`ConnControl::close`] aborts the tasks.
pub struct ConnControl {
    tx: mpsc::Sender<Cmd>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl ConnControl {
    /// Sends GOAWAY, flushes everything queued before it, and closes the socket.
    pub async fn close(mut self) {
        let _ = self
            .tx
            .send(Cmd::Frame(Frame::GoAway {
                last_good_stream_id: 0,
                status: 0,
            }))
            .await;
        let _ = self.tx.send(Cmd::Shutdown).await;
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
        self.reader.abort();
    }
}

impl Drop for ConnControl {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }
}

/// Starts serving SPDY on `io`; returns the peer-opened streams and the connection's control.
pub fn start<IO>(io: IO) -> (mpsc::Receiver<IncomingStream>, ConnControl)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel(64);
    let (streams_tx, streams_rx) = mpsc::channel(16);
    let writer = tokio::spawn(write_loop(wr, rx));
    let reader = tokio::spawn(read_loop(rd, tx.clone(), streams_tx));
    (
        streams_rx,
        ConnControl {
            tx,
            reader,
            writer: Some(writer),
        },
    )
}

async fn write_loop<W: AsyncWrite>(mut wr: WriteHalf<W>, mut rx: mpsc::Receiver<Cmd>) {
    let mut z = HeaderCompressor::default();
    let mut buf = BytesMut::new();
    while let Some(cmd) = rx.recv().await {
        let mut next = Some(cmd);
        // Batch whatever is already queued into one write.
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Frame(frame) => {
                    if let Err(e) = spdy::encode(&frame, &mut z, &mut buf) {
                        tracing::warn!("spdy: dropping frame: {e}");
                    }
                }
                Cmd::Shutdown => {
                    let _ = wr.write_all(&buf).await;
                    let _ = wr.shutdown().await;
                    return;
                }
            }
            if buf.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        buf.clear();
    }
}

async fn read_loop<R: AsyncRead>(
    mut rd: ReadHalf<R>,
    tx: mpsc::Sender<Cmd>,
    streams: mpsc::Sender<IncomingStream>,
) {
    let mut z = HeaderDecompressor::default();
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut last_id = 0u32;
    loop {
        let frame = match spdy::read_frame(&mut rd, &mut z).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("spdy: read: {e}");
                break;
            }
        };
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => {
                if stream_id % 2 == 0 || stream_id <= last_id {
                    let reset = Frame::RstStream {
                        stream_id,
                        status: spdy::RST_PROTOCOL_ERROR,
                    };
                    let _ = tx.send(Cmd::Frame(reset)).await;
                    continue;
                }
                last_id = stream_id;
                let (data_tx, data_rx) = mpsc::channel(32);
                if flags & spdy::FLAG_FIN == 0 {
                    open.insert(stream_id, data_tx);
                }
                let reply = Frame::SynReply {
                    stream_id,
                    flags: 0,
                    headers: Vec::new(),
                };
                if tx.send(Cmd::Frame(reply)).await.is_err() {
                    break;
                }
                let stream = IncomingStream {
                    id: stream_id,
                    headers,
                    data: data_rx,
                    out: StreamWriter {
                        id: stream_id,
                        tx: tx.clone(),
                    },
                };
                // Nobody accepting any more: the stream is dropped, its data discarded.
                let _ = streams.send(stream).await;
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if let Some(sink) = open.get(&stream_id) {
                    if !data.is_empty() && sink.send(data).await.is_err() {
                        open.remove(&stream_id);
                    }
                }
                if flags & spdy::FLAG_FIN != 0 {
                    open.remove(&stream_id);
                }
            }
            Frame::Headers {
                stream_id, flags, ..
            } if flags & spdy::FLAG_FIN != 0 => {
                open.remove(&stream_id);
            }
            Frame::RstStream { stream_id, .. } => {
                open.remove(&stream_id);
            }
            Frame::Ping { id } if id % 2 == 1 => {
                let echoed = tx.send(Cmd::Frame(Frame::Ping { id })).await;
                if echoed.is_err() {
                    break;
                }
            }
            Frame::GoAway { .. } => break,
            // Server PING echoes (we send none), SETTINGS, WINDOW_UPDATE, SYN_REPLY, unknown types.
            _ => {}
        }
    }
}

/// Kubernetes' SPDY upgrade handshake (`httpstream.Handshake`, then the SPDY response upgrader):
/// picks the first client-offered `X-Stream-Protocol-Version` the server supports and returns it
/// with the 101 response headers, or the error response kubelet would send (400 / 403).
pub fn handshake(
    headers: &HeaderMap,
    server_protocols: &[&'static str],
) -> Result<(String, HeaderMap), Box<Response<Full<Bytes>>>> {
    let offered: Vec<&str> = headers
        .get_all(PROTOCOL_VERSION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Err(Box::new(plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: X-Stream-Protocol-Version is required",
        )));
    }
    // The client's order wins, as in `httpstream.Handshake`.
    let chosen = offered
        .iter()
        .find_map(|p| server_protocols.iter().find(|s| *s == p).copied());
    let Some(protocol) = chosen else {
        let mut resp = plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{}]",
                offered.join(" "),
                server_protocols.join(" ")
            ),
        );
        for p in server_protocols {
            resp.headers_mut()
                .append(ACCEPTED_PROTOCOL_VERSIONS, HeaderValue::from_static(p));
        }
        return Err(Box::new(resp));
    };
    let connection_upgrade = headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .to_ascii_lowercase()
            .contains("upgrade")
    });
    let spdy_upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("spdy/3.1"));
    if !connection_upgrade || !spdy_upgrade {
        return Err(Box::new(plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request",
        )));
    }
    let mut out = HeaderMap::new();
    out.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    out.insert(UPGRADE, HeaderValue::from_static(SPDY_31));
    // Only values from `server_protocols` get here, and those are static tokens.
    let value = HeaderValue::from_static(protocol);
    out.insert(PROTOCOL_VERSION, value);
    Ok((protocol.to_string(), out))
}

//! A minimal SPDY/3.1 client (what kubectl's spdystream does), built on the module's framing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::super::spdy::{self, Frame, HeaderCompressor, HeaderDecompressor};

/// An upgraded SPDY client connection.
pub struct SpdyClient {
    tcp: TcpStream,
    z_out: HeaderCompressor,
    z_in: HeaderDecompressor,
    next_id: u32,
    /// The negotiated `X-Stream-Protocol-Version`.
    pub protocol: String,
}

/// A failed upgrade: status code, headers (lowercase names) and body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// What came back on each stream by the time the server closed the connection.
#[derive(Debug, Default)]
pub struct Transcript {
    pub data: HashMap<u32, Vec<u8>>,
    pub fin: HashSet<u32>,
    pub replied: HashSet<u32>,
    pub reset: HashSet<u32>,
    pub pings: Vec<u32>,
    pub goaway: bool,
    /// (stream, payload) in arrival order, FIN frames as empty payloads.
    pub order: Vec<(u32, Vec<u8>)>,
}

impl Transcript {
    /// Payload received on `id`, as UTF-8.
    pub fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.data.get(&id).map(Vec::as_slice).unwrap_or(b"")).into_owned()
    }
}

impl SpdyClient {
    /// Upgrades `url` with `Upgrade: SPDY/3.1` offering `protocols`; `upgrade: false` omits the
    /// upgrade headers.
    pub async fn connect(url: &str, protocols: &[&str], upgrade: bool) -> Result<Self, Refused> {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let mut tcp = TcpStream::connect(host).await.unwrap();
        let mut req = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n");
        if upgrade {
            req.push_str("Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n");
        }
        for p in protocols {
            req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        // Read the response head byte by byte so no frame bytes are swallowed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if tcp.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        if status != 101 {
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            tcp.read_exact(&mut body).await.unwrap();
            return Err(Refused {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let protocol = headers
            .iter()
            .find(|(k, _)| k == "x-stream-protocol-version")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Ok(SpdyClient {
            tcp,
            z_out: HeaderCompressor::default(),
            z_in: HeaderDecompressor::default(),
            next_id: 1,
            protocol,
        })
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: Frame) {
        let mut buf = BytesMut::new();
        spdy::encode(&frame, &mut self.z_out, &mut buf).unwrap();
        self.tcp.write_all(&buf).await.unwrap();
    }

    /// Opens a stream with `headers` (lowercase names) and returns its id.
    pub async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.send(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers,
        })
        .await;
        id
    }

    /// Sends `data` on stream `id`, with FIN if `fin`.
    pub async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
        let flags = if fin { spdy::FLAG_FIN } else { 0 };
        self.send(Frame::Data {
            stream_id: id,
            flags,
            data: Bytes::copy_from_slice(data),
        })
        .await;
    }

    /// Reads the next frame (None at EOF), failing the test after 10 s.
    pub async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(
            Duration::from_secs(10),
            spdy::read_frame(&mut self.tcp, &mut self.z_in),
        )
        .await
        .expect("timed out waiting for a frame")
        .unwrap()
    }

    /// Reads frames until the server sends GOAWAY or closes the connection.
    pub async fn transcript(&mut self) -> Transcript {
        let mut t = Transcript::default();
        while let Some(frame) = self.next().await {
            record(&mut t, frame);
            if t.goaway {
                break;
            }
        }
        t
    }

    /// Reads frames until `done` holds for the transcript so far.
    pub async fn until(&mut self, t: &mut Transcript, done: impl Fn(&Transcript) -> bool) {
        while !done(t) {
            let frame = self.next().await.expect("connection closed early");
            record(t, frame);
        }
    }
}

fn record(t: &mut Transcript, frame: Frame) {
    match frame {
        Frame::SynReply { stream_id, .. } => {
            t.replied.insert(stream_id);
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            t.data
                .entry(stream_id)
                .or_default()
                .extend_from_slice(&data);
            t.order.push((stream_id, data.to_vec()));
            if flags & spdy::FLAG_FIN != 0 {
                t.fin.insert(stream_id);
            }
        }
        Frame::RstStream { stream_id, .. } => {
            t.reset.insert(stream_id);
        }
        Frame::Ping { id } => t.pings.push(id),
        Frame::GoAway { .. } => t.goaway = true,
        _ => {}
    }
}

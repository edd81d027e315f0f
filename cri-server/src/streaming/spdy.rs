//! SPDY/3.1 framing: the subset Kubernetes' `httpstream/spdy` (moby/spdystream) speaks.
//!
//! [`encode`] and [`read_frame`] convert between [`Frame`] values and wire bytes. Header blocks
//! are zlib streams seeded with the SPDY/3 dictionary; each direction of a connection has one
//! long-lived stream ([`HeaderCompressor`], [`HeaderDecompressor`]) that spans all its frames,
//! every block ending on a sync flush.

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The protocol version every control frame carries.
pub const VERSION: u16 = 3;
/// `FLAG_FIN`: the sender will send nothing more on this stream.
pub const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status PROTOCOL_ERROR.
pub const RST_PROTOCOL_ERROR: u32 = 1;
/// RST_STREAM status CANCEL (what spdystream sends when a stream is rejected).
pub const RST_CANCEL: u32 = 5;
/// Largest payload the 24-bit length field can carry.
pub const MAX_PAYLOAD: usize = 0xFF_FFFF;
/// Upper bound on a decompressed header block (guards against zlib bombs).
const MAX_HEADER_BLOCK: usize = 1 << 20;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// The underlying connection failed.
    #[error("spdy i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The zlib header stream is corrupt (or a dictionary could not be set).
    #[error("spdy header compression: {0}")]
    Zlib(String),
    /// A frame or header block does not follow SPDY/3.
    #[error("malformed spdy frame: {0}")]
    Malformed(&'static str),
    /// A control frame announced a version other than 3.
    #[error("unsupported spdy version {0}")]
    Version(u16),
}

/// Header name/value pairs; names are lowercase on the wire, several values join with NUL.
pub type Headers = Vec<(String, String)>;

/// One SPDY/3 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// New stream's id (odd when the client opens it).
        stream_id: u32,
        /// Stream this one is associated to (0: none).
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        /// FIN / UNIDIRECTIONAL.
        flags: u8,
        /// Decoded headers.
        headers: Headers,
    },
    /// Accepts a stream opened by the peer.
    SynReply {
        /// Stream being accepted.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// Decoded headers.
        headers: Headers,
    },
    /// Aborts a stream.
    RstStream {
        /// Stream being reset.
        stream_id: u32,
        /// Status code (1 PROTOCOL_ERROR … 5 CANCEL …).
        status: u32,
    },
    /// Connection settings; each entry is (flags, id, value).
    Settings {
        /// Frame flags (0x1 clear persisted settings).
        flags: u8,
        /// (flags, id, value) triples.
        entries: Vec<(u8, u32, u32)>,
    },
    /// Liveness probe; the receiver echoes peer-initiated ids.
    Ping {
        /// Odd from the client, even from the server.
        id: u32,
    },
    /// The sender will open no more streams.
    GoAway {
        /// Last stream id the sender processed.
        last_good_stream_id: u32,
        /// 0 OK, 1 PROTOCOL_ERROR, 2 INTERNAL_ERROR.
        status: u32,
    },
    /// Extra headers on an open stream.
    Headers {
        /// Stream the headers belong to.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// Decoded headers.
        headers: Headers,
    },
    /// Flow-control credit (spdystream ignores it; so do we).
    WindowUpdate {
        /// Stream credited (0: connection).
        stream_id: u32,
        /// Bytes added to the window.
        delta: u32,
    },
    /// Stream payload.
    Data {
        /// Stream the bytes belong to.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// Payload (may be empty, e.g. a bare FIN).
        data: Bytes,
    },
    /// A control frame of a type this subset does not know (to be ignored, as SPDY/3 says).
    Unknown {
        /// Its type field.
        kind: u16,
    },
}

/// The SPDY/3 header dictionary: length-prefixed tokens followed by a raw tail (spec §2.6.10.1).
pub fn dictionary() -> &'static [u8] {
    static DICT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICT.get_or_init(|| {
        const TOKENS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
            "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
            "400 Bad Request401 Unauthorized403 Forbidden404 Not Found",
            "500 Internal Server Error501 Not Implemented503 Service Unavailable",
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
            "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,",
            "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
            "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
        );
        let mut d = Vec::with_capacity(1424);
        for t in TOKENS {
            d.extend_from_slice(&(t.len() as u32).to_be_bytes());
            d.extend_from_slice(t.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// One direction's header compressor (the zlib stream lives as long as the connection).
pub struct HeaderCompressor {
    z: Compress,
    primed: bool,
}

impl Default for HeaderCompressor {
    fn default() -> Self {
        HeaderCompressor {
            z: Compress::new(Compression::best(), true),
            primed: false,
        }
    }
}

impl HeaderCompressor {
    /// Compresses one serialized header block, ending on a sync flush.
    pub fn compress(&mut self, raw: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let zerr = |e: flate2::CompressError| SpdyError::Zlib(e.to_string());
        if !self.primed {
            self.z.set_dictionary(dictionary()).map_err(zerr)?;
            self.primed = true;
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut pos = 0;
        loop {
            let before = self.z.total_in();
            self.z
                .compress_vec(&raw[pos..], &mut out, FlushCompress::Sync)
                .map_err(zerr)?;
            pos += (self.z.total_in() - before) as usize;
            if pos >= raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            out.reserve(256);
        }
    }
}

/// One direction's header decompressor.
pub struct HeaderDecompressor {
    z: Decompress,
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        HeaderDecompressor {
            z: Decompress::new(true),
        }
    }
}

impl HeaderDecompressor {
    /// Inflates one frame's compressed header block.
    pub fn decompress(&mut self, block: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(block.len() * 4 + 256);
        let mut pos = 0;
        loop {
            let (in0, out0) = (self.z.total_in(), out.len());
            match self
                .z
                .decompress_vec(&block[pos..], &mut out, FlushDecompress::Sync)
            {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(dictionary())
                        .map_err(|e| SpdyError::Zlib(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Zlib(e.to_string())),
            }
            pos += (self.z.total_in() - in0) as usize;
            let progressed = out.len() > out0 || self.z.total_in() > in0;
            if pos >= block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if out.len() >= MAX_HEADER_BLOCK {
                return Err(SpdyError::Malformed("header block too large"));
            }
            if out.len() == out.capacity() {
                out.reserve(out.len());
            } else if !progressed {
                return Err(SpdyError::Malformed("truncated header block"));
            }
        }
    }
}

/// Serializes headers in the SPDY/3 layout: u32 count, then u32-length-prefixed names and values.
pub fn serialize_headers(headers: &[(String, String)]) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
        raw.extend_from_slice(name.as_bytes());
        raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
        raw.extend_from_slice(value.as_bytes());
    }
    raw
}

/// Parses a decompressed header block (inverse of [`serialize_headers`]).
pub fn parse_headers(raw: &[u8]) -> Result<Headers, SpdyError> {
    fn take<'a>(raw: &mut &'a [u8], n: usize) -> Result<&'a [u8], SpdyError> {
        if raw.len() < n {
            return Err(SpdyError::Malformed("short header block"));
        }
        let (head, rest) = raw.split_at(n);
        *raw = rest;
        Ok(head)
    }
    fn take_u32(raw: &mut &[u8]) -> Result<usize, SpdyError> {
        let b = take(raw, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let mut raw = raw;
    let count = take_u32(&mut raw)?;
    if count > raw.len() / 8 {
        return Err(SpdyError::Malformed("header count exceeds block"));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let n = take_u32(&mut raw)?;
        let name = String::from_utf8_lossy(take(&mut raw, n)?).to_ascii_lowercase();
        let n = take_u32(&mut raw)?;
        let value = String::from_utf8_lossy(take(&mut raw, n)?).into_owned();
        headers.push((name, value));
    }
    Ok(headers)
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, payload: &[u8]) -> Result<(), SpdyError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(SpdyError::Malformed("control frame too large"));
    }
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u32(((flags as u32) << 24) | payload.len() as u32);
    out.put_slice(payload);
    Ok(())
}

/// Appends the wire form of `frame` to `out`, compressing header blocks with `z`.
pub fn encode(
    frame: &Frame,
    z: &mut HeaderCompressor,
    out: &mut BytesMut,
) -> Result<(), SpdyError> {
    let mut p = Vec::new();
    match frame {
        Frame::SynStream {
            stream_id,
            associated_to,
            priority,
            flags,
            headers,
        } => {
            p.put_u32(stream_id & 0x7fff_ffff);
            p.put_u32(associated_to & 0x7fff_ffff);
            p.put_u8((priority & 0x7) << 5);
            p.put_u8(0); // slot
            p.extend(z.compress(&serialize_headers(headers))?);
            control(out, SYN_STREAM, *flags, &p)
        }
        Frame::SynReply {
            stream_id,
            flags,
            headers,
        }
        | Frame::Headers {
            stream_id,
            flags,
            headers,
        } => {
            p.put_u32(stream_id & 0x7fff_ffff);
            p.extend(z.compress(&serialize_headers(headers))?);
            let kind = if matches!(frame, Frame::SynReply { .. }) {
                SYN_REPLY
            } else {
                HEADERS
            };
            control(out, kind, *flags, &p)
        }
        Frame::RstStream { stream_id, status } => {
            p.put_u32(stream_id & 0x7fff_ffff);
            p.put_u32(*status);
            control(out, RST_STREAM, 0, &p)
        }
        Frame::Settings { flags, entries } => {
            p.put_u32(entries.len() as u32);
            for (f, id, value) in entries {
                p.put_u32(((*f as u32) << 24) | (id & 0xff_ffff));
                p.put_u32(*value);
            }
            control(out, SETTINGS, *flags, &p)
        }
        Frame::Ping { id } => control(out, PING, 0, &id.to_be_bytes()),
        Frame::GoAway {
            last_good_stream_id,
            status,
        } => {
            p.put_u32(last_good_stream_id & 0x7fff_ffff);
            p.put_u32(*status);
            control(out, GOAWAY, 0, &p)
        }
        Frame::WindowUpdate { stream_id, delta } => {
            p.put_u32(stream_id & 0x7fff_ffff);
            p.put_u32(delta & 0x7fff_ffff);
            control(out, WINDOW_UPDATE, 0, &p)
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            if data.len() > MAX_PAYLOAD {
                return Err(SpdyError::Malformed("data frame too large"));
            }
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32(((*flags as u32) << 24) | data.len() as u32);
            out.put_slice(data);
            Ok(())
        }
        Frame::Unknown { .. } => Err(SpdyError::Malformed("cannot encode an unknown frame")),
    }
}

fn be32(b: &[u8], at: usize) -> Result<u32, SpdyError> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(SpdyError::Malformed("control frame too short"))
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    z: &mut HeaderDecompressor,
) -> Result<Option<Frame>, SpdyError> {
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(SpdyError::Malformed("truncated frame header"))
            };
        }
        got += n;
    }
    let word0 = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if word0 & 0x8000_0000 == 0 {
        return Ok(Some(Frame::Data {
            stream_id: word0 & 0x7fff_ffff,
            flags,
            data: Bytes::from(payload),
        }));
    }
    let version = ((word0 >> 16) & 0x7fff) as u16;
    if version != VERSION {
        return Err(SpdyError::Version(version));
    }
    let p = &payload;
    let sid = |at| be32(p, at).map(|v| v & 0x7fff_ffff);
    let frame = match (word0 & 0xffff) as u16 {
        SYN_STREAM => {
            let block = p
                .get(10..)
                .ok_or(SpdyError::Malformed("short SYN_STREAM"))?;
            Frame::SynStream {
                stream_id: sid(0)?,
                associated_to: sid(4)?,
                priority: p[8] >> 5,
                flags,
                headers: parse_headers(&z.decompress(block)?)?,
            }
        }
        kind @ (SYN_REPLY | HEADERS) => {
            let block = p.get(4..).ok_or(SpdyError::Malformed("short SYN_REPLY"))?;
            let (stream_id, headers) = (sid(0)?, parse_headers(&z.decompress(block)?)?);
            if kind == SYN_REPLY {
                Frame::SynReply {
                    stream_id,
                    flags,
                    headers,
                }
            } else {
                Frame::Headers {
                    stream_id,
                    flags,
                    headers,
                }
            }
        }
        RST_STREAM => Frame::RstStream {
            stream_id: sid(0)?,
            status: be32(p, 4)?,
        },
        SETTINGS => {
            let n = be32(p, 0)? as usize;
            if n > (p.len() - 4) / 8 {
                return Err(SpdyError::Malformed("SETTINGS count exceeds frame"));
            }
            let entries = (0..n)
                .map(|i| {
                    let w = be32(p, 4 + i * 8)?;
                    Ok(((w >> 24) as u8, w & 0xff_ffff, be32(p, 8 + i * 8)?))
                })
                .collect::<Result<_, SpdyError>>()?;
            Frame::Settings { flags, entries }
        }
        PING => Frame::Ping { id: be32(p, 0)? },
        GOAWAY => Frame::GoAway {
            last_good_stream_id: sid(0)?,
            // SPDY/3 added the status word; tolerate its absence.
            status: be32(p, 4).unwrap_or(0),
        },
        WINDOW_UPDATE => Frame::WindowUpdate {
            stream_id: sid(0)?,
            delta: sid(4)?,
        },
        kind => Frame::Unknown { kind },
    };
    Ok(Some(frame))
}

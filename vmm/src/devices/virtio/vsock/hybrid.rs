//! The unix-socket conventions of Firecracker's "hybrid vsock".
//!
//! - Host to guest: a unix client connects to the device's socket and writes `CONNECT <port>\n`;
//!   once the guest accepts, it reads `OK <local port>\n` and the stream carries the connection.
//! - Guest to host: a guest connection to host port `P` is forwarded to the unix socket `<path>_P`.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Longest `CONNECT` line accepted, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// Why a unix client's handshake was rejected.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client closed before a full line.
    #[error("client closed before sending a CONNECT line")]
    Eof,
    /// No newline within [`MAX_CONNECT_LINE`] bytes.
    #[error("CONNECT line longer than {MAX_CONNECT_LINE} bytes")]
    TooLong,
    /// The line is not `CONNECT <port>`.
    #[error("malformed CONNECT line {0:?}")]
    Malformed(String),
    /// Reading the stream failed.
    #[error("reading the CONNECT line: {0}")]
    Io(#[from] io::Error),
}

/// An accepted unix client that has not finished its `CONNECT` line.
pub struct PendingConnect {
    /// The client stream (non-blocking).
    pub stream: UnixStream,
    /// When the client is dropped if the line is still incomplete.
    pub deadline: Instant,
    line: Vec<u8>,
}

impl PendingConnect {
    /// Starts waiting for the line of `stream` until `deadline`.
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        PendingConnect {
            stream,
            deadline,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
        }
    }

    /// Reads what is available of the line, one byte at a time so that data the client sends right
    /// after it stays in the socket for the guest. `Ok(Some(port))` once the line is complete.
    pub fn read_line(&mut self) -> Result<Option<u32>, HandshakeError> {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line).map(Some),
                Ok(_) => {
                    self.line.push(byte[0]);
                    if self.line.len() >= MAX_CONNECT_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Parses `CONNECT <port>` (newline stripped; keyword case-insensitive, an optional trailing `\r`).
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    let bad = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(cmd), Some(port), None)
            if cmd.eq_ignore_ascii_case("CONNECT") && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            port.parse().map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

/// The unix socket that guest connections to host port `port` are forwarded to: `<uds>_<port>`.
pub fn peer_socket_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024").unwrap(), 1024);
        assert_eq!(parse_connect(b"connect 52\r").unwrap(), 52);
        assert_eq!(parse_connect(b"CONNECT 4294967295").unwrap(), u32::MAX);
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT 4294967296",
            b"CONNECT +5",
            b"CONNECT 5 6",
            b"LISTEN 5",
            b"",
            b"CONNECT \xff",
        ] {
            assert!(parse_connect(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn peer_path_appends_port() {
        assert_eq!(
            peer_socket_path(Path::new("/run/pod/vsock.sock"), 52),
            PathBuf::from("/run/pod/vsock.sock_52")
        );
    }
}

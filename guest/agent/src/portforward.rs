//! CRI port-forward inside the pod VM: a vsock listener ([`PORT_FORWARD_VSOCK_PORT`]) that connects each
//! host connection to a TCP port on the guest's loopback, which every container of the pod shares (the VM
//! is the pod's network namespace).
//!
//! Protocol: the host writes `PORT <n>\n`; the agent answers `OK\n` once connected to 127.0.0.1:n, or
//! `ERR <reason>\n` and closes. After `OK` the connection carries the TCP bytes both ways.

use std::time::Duration;

use podvisor_proto::PORT_FORWARD_VSOCK_PORT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_vsock::VsockListener;

/// Longest request line accepted.
const MAX_LINE: usize = 32;
/// How long the host has to send the request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `PORT <n>` (without the newline).
pub fn parse_request(line: &[u8]) -> Result<u16, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    let port = text
        .strip_prefix("PORT ")
        .ok_or_else(|| format!("expected \"PORT <n>\", got {text:?}"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("bad port {port:?}")),
    }
}

async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, String> {
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(0) => return Err("closed before the request line".into()),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() >= MAX_LINE => return Err("request line too long".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Serves one host connection: request line, connect, then copy both ways until either side closes.
pub async fn forward<S: AsyncRead + AsyncWrite + Unpin>(mut host: S) {
    let port = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut host)).await {
        Ok(Ok(line)) => parse_request(&line),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no request line in time".into()),
    };
    let port = match port {
        Ok(p) => p,
        Err(e) => {
            let _ = host.write_all(format!("ERR {e}\n").as_bytes()).await;
            return;
        }
    };
    let mut tcp = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let _ = host
                .write_all(format!("ERR connecting to 127.0.0.1:{port}: {e}\n").as_bytes())
                .await;
            return;
        }
    };
    if host.write_all(b"OK\n").await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut host, &mut tcp).await;
}

/// Accepts port-forward connections forever (logs and retries on accept errors).
pub async fn serve(listener: VsockListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(forward(stream));
            }
            Err(e) => {
                crate::log(&format!(
                    "port-forward accept on {PORT_FORWARD_VSOCK_PORT}: {e}"
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(parse_request(b"PORT 8080"), Ok(8080));
        for bad in [
            &b"PORT 0"[..],
            b"PORT 70000",
            b"PORT",
            b"port 80",
            b"PORT 80 x",
            b"\xff",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn forwards_to_a_loopback_port_and_reports_errors() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase()))
                .await
                .unwrap();
        });
        let (mut host, agent) = tokio::io::duplex(1024);
        tokio::spawn(forward(agent));
        host.write_all(format!("PORT {port}\nhello").as_bytes())
            .await
            .unwrap();
        let mut reply = [0u8; 8];
        host.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"OK\nHELLO");

        // Nothing listens on the port any more: an ERR line, then the connection closes.
        let (mut host, agent) = tokio::io::duplex(1024);
        tokio::spawn(forward(agent));
        host.write_all(format!("PORT {port}\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        host.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("ERR connecting to 127.0.0.1:"), "{text}");

        let (mut host, agent) = tokio::io::duplex(1024);
        tokio::spawn(forward(agent));
        host.write_all(b"GET / HTTP/1.1\n").await.unwrap();
        let mut text = String::new();
        host.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("ERR expected"), "{text}");
    }
}

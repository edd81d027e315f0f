//! Exec and port-forward over WebSocket, driven by tokio-tungstenite's client.

use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1::PortForwardRequest;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{exec_req, harness};

type Ws = WebSocketStream<TcpStream>;

async fn connect(url: &str, protocol: &str) -> Result<Ws, u16> {
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let host = url
        .strip_prefix("http://")
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let tcp = TcpStream::connect(host).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, resp)) => {
            let got = resp.headers().get("sec-websocket-protocol").unwrap();
            assert_eq!(got.to_str().unwrap(), protocol);
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

/// Reads messages until the server closes; returns (channel → bytes, channel order).
async fn drain(ws: &mut Ws, base64: bool) -> (Vec<Vec<u8>>, Vec<(u8, usize)>) {
    let mut chans = vec![Vec::new(); 8];
    let mut order = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("timed out");
        let data = match msg {
            Some(Ok(Message::Binary(b))) => b.to_vec(),
            Some(Ok(Message::Text(t))) if base64 => {
                let t = t.as_str();
                let mut v = vec![t.as_bytes()[0] - b'0'];
                v.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(&t[1..])
                        .unwrap(),
                );
                v
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        order.push((data[0], data.len() - 1));
        chans[data[0] as usize].extend_from_slice(&data[1..]);
    }
    (chans, order)
}

#[tokio::test]
async fn exec_v5_stdin_close_and_exit_zero() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["echo", "0"], true, true, true, false))
        .unwrap();
    let mut ws = connect(&url, "v5.channel.k8s.io").await.unwrap();
    ws.send(Message::binary(b"\x00abc".to_vec())).await.unwrap();
    ws.send(Message::binary(b"\x00def".to_vec())).await.unwrap();
    ws.send(Message::binary(vec![255, 0])).await.unwrap(); // close stdin
    let (chans, order) = drain(&mut ws, false).await;
    assert_eq!(order[0], (1, 0), "first message: empty on stdout");
    assert_eq!(chans[1], b"abcdef");
    assert_eq!(chans[2], b"stderr-line\n");
    let status: Value = serde_json::from_slice(&chans[3]).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"metadata": {}, "status": "Success"})
    );
}

#[tokio::test]
async fn exec_v4_non_zero_exit() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["echo", "7"], false, true, false, false))
        .unwrap();
    let mut ws = connect(&url, "v4.channel.k8s.io").await.unwrap();
    let (chans, _) = drain(&mut ws, false).await;
    let status: Value = serde_json::from_slice(&chans[3]).unwrap();
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "7");
}

#[tokio::test]
async fn exec_base64_protocol() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["echo", "0"], true, true, true, false))
        .unwrap();
    let mut ws = connect(&url, "v4.base64.channel.k8s.io").await.unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    ws.send(Message::text(format!("0{}", b64.encode("hi"))))
        .await
        .unwrap();
    // v4 has no close signal: read the echo, then hang up (which ends stdin).
    let mut echoed = Vec::new();
    while echoed.is_empty() {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        if let Message::Text(t) = msg.unwrap().unwrap().unwrap() {
            assert!(t.as_str().starts_with(['1', '2']), "{t}");
            if t.as_str().starts_with('1') {
                echoed = b64.decode(&t.as_str()[1..]).unwrap();
            }
        }
    }
    assert_eq!(echoed, b"hi");
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn tty_resize_over_websocket() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["resize"], true, true, false, true))
        .unwrap();
    let mut ws = connect(&url, "v5.channel.k8s.io").await.unwrap();
    ws.send(Message::binary(
        b"\x04{\"Width\":80,\"Height\":24}".to_vec(),
    ))
    .await
    .unwrap();
    let (chans, _) = drain(&mut ws, false).await;
    assert_eq!(chans[1], b"80x24\n");
    assert!(String::from_utf8_lossy(&chans[3]).contains("Success"));
}

#[tokio::test]
async fn unsupported_subprotocol_is_forbidden() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["echo"], false, true, false, false))
        .unwrap();
    assert_eq!(connect(&url, "v9.channel.k8s.io").await.err(), Some(403));
}

#[tokio::test]
async fn port_forward_two_ports() {
    let h = harness().await;
    let req = PortForwardRequest {
        pod_sandbox_id: "pod1".into(),
        port: vec![],
    };
    let url = h.server.port_forward_url(&req).unwrap() + "?port=80&port=81";
    let mut ws = connect(&url, "v4.channel.k8s.io").await.unwrap();
    ws.send(Message::binary(b"\x00one".to_vec())).await.unwrap();
    ws.send(Message::binary(b"\x02two".to_vec())).await.unwrap();
    let mut chans = vec![Vec::new(); 4];
    let mut firsts = vec![None; 4];
    while chans[0].len() < 6 || chans[2].len() < 6 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let data = msg.into_data();
        let ch = data[0] as usize;
        if firsts[ch].is_none() {
            firsts[ch] = Some(data[1..].to_vec());
        } else {
            chans[ch].extend_from_slice(&data[1..]);
        }
    }
    assert_eq!(firsts[0].as_deref(), Some(&80u16.to_le_bytes()[..]));
    assert_eq!(firsts[1].as_deref(), Some(&80u16.to_le_bytes()[..]));
    assert_eq!(firsts[2].as_deref(), Some(&81u16.to_le_bytes()[..]));
    assert_eq!(firsts[3].as_deref(), Some(&81u16.to_le_bytes()[..]));
    assert_eq!(chans[0], b"80:one");
    assert_eq!(chans[2], b"81:two");
    ws.close(None).await.unwrap();
}

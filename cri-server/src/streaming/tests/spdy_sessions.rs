//! Exec, attach and port-forward over SPDY/3.1, driven by the test SPDY client.

use k8s_cri::v1::{AttachRequest, PortForwardRequest};
use serde_json::Value;

use super::super::spdy::Frame;
use super::spdy_client::SpdyClient;
use super::{exec_req, harness};

const V4: &str = "v4.channel.k8s.io";

/// Opens the error stream the way kubectl does (open, then half-close).
async fn error_stream(c: &mut SpdyClient) -> u32 {
    let id = c.open(&[("streamtype", "error")]).await;
    c.data(id, b"", true).await;
    id
}

#[tokio::test]
async fn exec_v4_streams_exit_zero() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["echo", "0"], true, true, true, false))
        .unwrap();
    let mut c = SpdyClient::connect(&url, &["v5.channel.k8s.io", V4, "v3.channel.k8s.io"], true)
        .await
        .unwrap();
    assert_eq!(
        c.protocol, V4,
        "v5 is WebSocket-only; v4 is the best SPDY match"
    );
    let err = error_stream(&mut c).await;
    let stdin = c.open(&[("streamtype", "stdin")]).await;
    let stdout = c.open(&[("streamtype", "stdout")]).await;
    let stderr = c.open(&[("streamtype", "stderr")]).await;
    c.data(stdin, b"hello ", false).await;
    c.data(stdin, b"world", true).await;
    let t = c.transcript().await;
    for id in [err, stdin, stdout, stderr] {
        assert!(t.replied.contains(&id), "SYN_REPLY for stream {id}");
    }
    assert_eq!(t.text(stdout), "hello world");
    assert_eq!(t.text(stderr), "stderr-line\n");
    let status: Value = serde_json::from_str(&t.text(err)).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"metadata": {}, "status": "Success"})
    );
    assert!(t.fin.contains(&stdout) && t.fin.contains(&stderr) && t.fin.contains(&err));
    assert!(t.goaway);
    // kubectl reads the status only after stdout/stderr ended: they must close first.
    let pos = |id| {
        t.order
            .iter()
            .position(|(s, d)| *s == id && d.is_empty())
            .unwrap()
    };
    let status_at = t
        .order
        .iter()
        .position(|(s, d)| *s == err && !d.is_empty())
        .unwrap();
    assert!(pos(stdout) < status_at && pos(stderr) < status_at);
}

#[tokio::test]
async fn exec_v4_non_zero_exit_code() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["echo", "3"], false, true, true, false))
        .unwrap();
    let mut c = SpdyClient::connect(&url, &[V4], true).await.unwrap();
    let err = error_stream(&mut c).await;
    c.open(&[("streamtype", "stdout")]).await;
    let stderr = c.open(&[("streamtype", "stderr")]).await;
    let t = c.transcript().await;
    assert_eq!(t.text(stderr), "stderr-line\n");
    let status: Value = serde_json::from_str(&t.text(err)).unwrap();
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(
        status["details"]["causes"],
        serde_json::json!([{"reason": "ExitCode", "message": "3"}])
    );
}

#[tokio::test]
async fn exec_backend_error_is_an_internal_error_status() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["fail"], false, true, false, false))
        .unwrap();
    let mut c = SpdyClient::connect(&url, &[V4], true).await.unwrap();
    let err = error_stream(&mut c).await;
    c.open(&[("streamtype", "stdout")]).await;
    let t = c.transcript().await;
    let status: Value = serde_json::from_str(&t.text(err)).unwrap();
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "InternalError");
    assert_eq!(status["code"], 500);
    assert!(
        status["message"].as_str().unwrap().contains("boom"),
        "{status}"
    );
}

#[tokio::test]
async fn exec_v3_reports_failures_as_plain_text() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["echo", "2"], false, true, false, false))
        .unwrap();
    let mut c = SpdyClient::connect(&url, &["v3.channel.k8s.io"], true)
        .await
        .unwrap();
    let err = error_stream(&mut c).await;
    c.open(&[("streamtype", "stdout")]).await;
    let t = c.transcript().await;
    assert!(
        t.text(err)
            .starts_with("command terminated with non-zero exit code"),
        "{}",
        t.text(err)
    );
}

#[tokio::test]
async fn tty_resize_reaches_the_backend() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["resize"], true, true, false, true))
        .unwrap();
    let mut c = SpdyClient::connect(&url, &[V4], true).await.unwrap();
    let err = error_stream(&mut c).await;
    let stdin = c.open(&[("streamtype", "stdin")]).await;
    let stdout = c.open(&[("streamtype", "stdout")]).await;
    let resize = c.open(&[("streamtype", "resize")]).await;
    // A JSON object split across frames, as a stream decoder must handle.
    c.data(resize, br#"{"Width":100,"#, false).await;
    c.data(resize, br#""Height":40}"#, false).await;
    let t = c.transcript().await;
    assert_eq!(t.text(stdout), "100x40\n");
    assert!(t.text(err).contains("Success"));
    assert!(t.replied.contains(&stdin));
    let seen = h.backend.resizes.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![super::TerminalSize {
            width: 100,
            height: 40
        }]
    );
}

#[tokio::test]
async fn attach_echoes_and_succeeds() {
    let h = harness().await;
    let req = AttachRequest {
        container_id: "c1".into(),
        stdin: true,
        stdout: true,
        ..Default::default()
    };
    let url = h.server.attach_url(&req).unwrap();
    let mut c = SpdyClient::connect(&url, &[V4], true).await.unwrap();
    let err = error_stream(&mut c).await;
    let stdin = c.open(&[("streamtype", "stdin")]).await;
    let stdout = c.open(&[("streamtype", "stdout")]).await;
    c.data(stdin, b"attached", true).await;
    let t = c.transcript().await;
    assert_eq!(t.text(stdout), "attached");
    assert!(t.text(err).contains("Success"));
}

#[tokio::test]
async fn pings_are_echoed() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["resize"], false, true, false, true))
        .unwrap();
    let mut c = SpdyClient::connect(&url, &[V4], true).await.unwrap();
    c.send(Frame::Ping { id: 1 }).await;
    let mut t = Default::default();
    c.until(&mut t, |t| !t.pings.is_empty()).await;
    assert_eq!(t.pings, vec![1]);
}

#[tokio::test]
async fn handshake_failures_match_kubelet() {
    let h = harness().await;
    let req = exec_req(&["echo"], false, true, false, false);
    let no_protocol = SpdyClient::connect(&h.server.exec_url(&req).unwrap(), &[], true)
        .await
        .err()
        .unwrap();
    assert_eq!(no_protocol.status, 400);
    let unknown = SpdyClient::connect(&h.server.exec_url(&req).unwrap(), &["v9.x"], true)
        .await
        .err()
        .unwrap();
    assert_eq!(unknown.status, 403);
    assert!(
        unknown.body.contains("unable to negotiate protocol"),
        "{}",
        unknown.body
    );
    let accepted: Vec<&str> = unknown
        .headers
        .iter()
        .filter(|(k, _)| k == "x-accepted-stream-protocol-versions")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(accepted.contains(&V4), "{accepted:?}");
    let no_upgrade = SpdyClient::connect(&h.server.exec_url(&req).unwrap(), &[V4], false)
        .await
        .err()
        .unwrap();
    assert_eq!(no_upgrade.status, 400);
    assert!(no_upgrade.body.contains("missing upgrade headers"));
}

#[tokio::test]
async fn missing_streams_time_out_and_close_the_connection() {
    let h = harness().await;
    let url = h
        .server
        .exec_url(&exec_req(&["echo"], true, true, false, false))
        .unwrap();
    let mut c = SpdyClient::connect(&url, &[V4], true).await.unwrap();
    error_stream(&mut c).await; // stdin and stdout never come
    let started = std::time::Instant::now();
    let t = c.transcript().await;
    assert!(t.goaway);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn port_forward_two_ports_and_errors() {
    let h = harness().await;
    let req = PortForwardRequest {
        pod_sandbox_id: "pod1".into(),
        port: vec![],
    };
    let url = h.server.port_forward_url(&req).unwrap();
    let mut c = SpdyClient::connect(&url, &["portforward.k8s.io"], true)
        .await
        .unwrap();
    let pair = |port: &'static str, rid: &'static str| {
        [
            [("streamtype", "error"), ("port", port), ("requestid", rid)],
            [("streamtype", "data"), ("port", port), ("requestid", rid)],
        ]
    };
    let [e80, d80] = pair("80", "0");
    let [e81, d81] = pair("81", "1");
    let [e9, d9] = pair("9", "2");
    let (e80, d80) = (c.open(&e80).await, c.open(&d80).await);
    let (e81, d81) = (c.open(&e81).await, c.open(&d81).await);
    let (e9, d9) = (c.open(&e9).await, c.open(&d9).await);
    let bad = c.open(&[("streamtype", "data")]).await; // no port header
    for id in [e80, e81, e9] {
        c.data(id, b"", true).await;
    }
    c.data(d80, b"to-eighty", true).await;
    c.data(d81, b"to-eighty-one", true).await;
    let mut t = Default::default();
    let done = |t: &super::spdy_client::Transcript| {
        [e80, d80, e81, d81, e9, d9]
            .iter()
            .all(|id| t.fin.contains(id))
            && t.reset.contains(&bad)
    };
    c.until(&mut t, done).await;
    assert_eq!(t.text(d80), "80:to-eighty");
    assert_eq!(t.text(d81), "81:to-eighty-one");
    assert_eq!(t.text(e80), "");
    assert_eq!(
        t.text(e9),
        "error forwarding port 9 to pod pod1, uid : connection refused"
    );
}

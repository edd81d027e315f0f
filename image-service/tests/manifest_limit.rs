//! A hostile registry serving a 256 MiB manifest (a real registry refuses to store one; this one answers the
//! Distribution API with it), once with its `Content-Length` and once chunked without: the pull fails
//! naming the size and containerd's 4 MiB-ish limit, reads at most a few MiB of it, and the process peak RSS
//! does not grow by the body size. Its own test binary, so no other test moves the peak RSS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use image_service::registry::MAX_MANIFEST_BYTES;
use image_service::testing;
use image_service::{Config, Credentials, ErrorKind, ImageService};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BODY: u64 = 256 << 20;
const CHUNK: usize = 64 << 10;

/// Peak resident set size of this process (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}

/// Answers one request: `/v2/` with `{}`, a manifest path with [`BODY`] bytes (chunked when the path
/// says so), anything else 404. Counts the body bytes the client accepted.
async fn answer(mut s: TcpStream, served: Arc<AtomicU64>) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let path = line.split_whitespace().nth(1).unwrap_or("");
    if path == "/v2/" {
        return s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            .await;
    }
    if !path.contains("/manifests/") {
        return s
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    }
    let chunked = path.contains("/chunked/");
    let length = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {BODY}")
    };
    s.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n{length}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let data = vec![b' '; CHUNK];
    let mut sent = 0;
    while sent < BODY {
        if chunked {
            s.write_all(format!("{CHUNK:x}\r\n").as_bytes()).await?;
        }
        s.write_all(&data).await?;
        if chunked {
            s.write_all(b"\r\n").await?;
        }
        sent += CHUNK as u64;
        served.fetch_add(CHUNK as u64, Ordering::Relaxed);
    }
    if chunked {
        s.write_all(b"0\r\n\r\n").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_manifest_fails_fast_without_being_read() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let c = counter.clone();
            tokio::spawn(async move {
                let _ = answer(s, c).await;
            });
        }
    });
    let dir = testing::tempdir();
    let certs = dir.path().join("certs.d");
    testing::write_hosts(&certs, &host, &host).unwrap();
    let mut config = Config::new(dir.path().join("state"));
    config.certs_dir = certs;
    let db = sled::open(dir.path().join("db")).unwrap();
    let svc = ImageService::open(config, &db).unwrap();
    let before = peak_rss();

    for (repo, announced) in [("sized/app", true), ("chunked/app", false)] {
        served.store(0, Ordering::Relaxed);
        let started = Instant::now();
        let err = svc
            .pull(&format!("{host}/{repo}:v1"), &Credentials::default(), None)
            .await
            .unwrap_err();
        let took = started.elapsed();
        let read = served.load(Ordering::Relaxed);
        println!("{repo}: refused in {took:?} after {read} bytes were sent: {err}");
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("over the {MAX_MANIFEST_BYTES}-byte limit")),
            "{msg}"
        );
        if announced {
            assert!(msg.contains(&format!("is {BODY} bytes")), "{msg}");
        } else {
            assert!(msg.contains("is at least "), "{msg}");
        }
        // What the socket buffers took before the client hung up, not the body.
        assert!(read < 32 << 20, "{read} bytes were sent");
    }
    let growth = peak_rss().saturating_sub(before);
    println!("peak RSS grew by {growth} bytes");
    assert!(growth < 64 << 20, "peak RSS grew by {growth} bytes");
    assert!(testing::files_under(&dir.path().join("state/images/content/blobs")).is_empty());
}

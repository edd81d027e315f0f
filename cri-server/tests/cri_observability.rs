//! Operating the real daemon, without VMs: every CRI call is a `cri` span exported over OTLP/gRPC
//! to a collector (opentelemetry-proto's generated TraceService server, here), `/metrics` is scraped
//! and read by the Prometheus project's OpenMetrics parser (PyPI prometheus-client,
//! `e2e/parse_metrics.py`), and `podvisor check` reports this host.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use podvisor_testkit::daemon::{connect, Daemon};
use podvisor_testkit::http::{free_port, http_get};
use podvisor_testkit::python::python;

/// A received span: name, attributes, ids, and its resource's service name.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    attrs: HashMap<String, String>,
    id: Vec<u8>,
    parent: Vec<u8>,
    service: String,
}

fn strings(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = strings(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Span {
                        name: s.name,
                        attrs: strings(&s.attributes),
                        id: s.span_id,
                        parent: s.parent_span_id,
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// One sample as the Prometheus parser gives it.
#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn parse_metrics(python: &Path, text: &str) -> Vec<Sample> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/parse_metrics.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_the_collector_and_metrics_parse() {
    let test = "spans_go_to_the_collector_and_metrics_parse";
    let Some(python) = python(test, "prometheus_client.openmetrics.parser") else {
        return;
    };
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/podvisor.sock");
    let metrics_port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podvisor"));
    cmd.arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--certs-dir")
        .arg(dir.path().join("certs.d"))
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--otlp-endpoint", &format!("http://{otlp}")])
        // The batch exporter's periodic export never comes: only the flush at exit sends spans.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000");
    let mut daemon = Daemon::start(cmd, &socket, dir.path()).await;
    let chan = connect(socket.clone()).await;
    let mut rt = RuntimeServiceClient::new(chan.clone());
    let mut img = ImageServiceClient::new(chan);

    for _ in 0..2 {
        rt.version(VersionRequest::default()).await.unwrap();
    }
    let missing = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: "0123456789abcdef".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let invalid = rt
        .run_pod_sandbox(RunPodSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    // A registry that is not there: a failed pull.
    let refused = img
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: format!("127.0.0.1:{}/nothing/here:v1", free_port()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(refused.code(), tonic::Code::Ok);

    // /metrics: OpenMetrics text the Prometheus parser accepts, with what just happened in it.
    let (status, ctype, text) =
        tokio::task::spawn_blocking(move || http_get(metrics_port, "/metrics"))
            .await
            .unwrap();
    assert!(status.contains(" 200 "), "{status}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let samples = parse_metrics(&python, &text);
    let requests = "podvisor_cri_requests_total";
    assert_eq!(
        value(&samples, requests, &[("method", "Version"), ("code", "OK")]),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            requests,
            &[("method", "PodSandboxStatus"), ("code", "NotFound")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            requests,
            &[("method", "RunPodSandbox"), ("code", "InvalidArgument")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "podvisor_cri_request_duration_seconds_count",
            &[("method", "Version")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            "podvisor_image_pulls_total",
            &[("result", "error")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "podvisor_pods", &[("state", "ready")]),
        Some(0.0)
    );
    assert_eq!(
        value(&samples, "podvisor_containers", &[("state", "running")]),
        Some(0.0)
    );
    let kvm = format!("{:?}", vmm::KvmHost::detect().kind).to_lowercase();
    assert_eq!(
        value(&samples, "podvisor_build_info", &[("kvm", &kvm)]),
        Some(1.0),
        "{text}"
    );
    let (status, _, _) = tokio::task::spawn_blocking(move || http_get(metrics_port, "/other"))
        .await
        .unwrap();
    assert!(status.contains(" 404 "), "{status}");

    // SIGTERM: the daemon flushes its spans to the collector before it exits.
    assert!(collector.0.lock().unwrap().is_empty());
    let ok = Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = daemon.wait_exit(Duration::from_secs(60)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let spans = collector.0.lock().unwrap().clone();
    server.abort();
    let cri: Vec<&Span> = spans.iter().filter(|s| s.name == "cri").collect();
    let find = |rpc: &str, code: &str| {
        cri.iter()
            .filter(|s| s.attrs.get("rpc").map(String::as_str) == Some(rpc))
            .filter(|s| s.attrs.get("code").map(String::as_str) == Some(code))
            .count()
    };
    assert_eq!(find("Version", "OK"), 2, "{spans:#?}");
    assert_eq!(find("PodSandboxStatus", "NotFound"), 1, "{spans:#?}");
    assert_eq!(find("RunPodSandbox", "InvalidArgument"), 1, "{spans:#?}");
    assert!(spans.iter().all(|s| s.service == "podvisor"), "{spans:#?}");
    // The pull is a child of its RPC's span.
    let pull_rpc = cri
        .iter()
        .find(|s| s.attrs.get("rpc").map(String::as_str) == Some("PullImage"))
        .expect("a PullImage span");
    let pull = spans
        .iter()
        .find(|s| s.name == "pull")
        .expect("a pull span");
    assert_eq!(pull.parent, pull_rpc.id);
    drop(daemon);
}

/// `podvisor check` on this host: one line per check, the KVM kind named, exit 0 when the host can
/// run pods with a valid guest and CNI configuration, non-zero with the failing line otherwise.
#[test]
fn check_reports_this_host() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cni = dir.path().join("net.d");
    std::fs::create_dir(&cni).unwrap();
    std::fs::copy(
        root.join("deploy/cni/10-podvisor.conflist"),
        cni.join("10-podvisor.conflist"),
    )
    .unwrap();
    let check = |guest: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .arg("check")
            .arg("--guest-dir")
            .arg(guest)
            .arg("--cni-conf-dir")
            .arg(&cni)
            .args([
                "--cni-bin-dir",
                "/usr/lib/cni",
                "--cni-bin-dir",
                "/opt/cni/bin",
            ])
            .arg("--socket")
            .arg(dir.path().join("podvisor.sock"))
            .arg("--config")
            .arg(dir.path().join("none.toml"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // The explicit config file must exist: that is an error before any check runs.
    let (code, _) = check(dir.path());
    assert_eq!(code, Some(2));
    std::fs::write(dir.path().join("none.toml"), "").unwrap();
    let (code, out) = check(dir.path());
    assert_eq!(code, Some(1), "{out}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in\n{out}"))
            .to_string()
    };
    assert!(line("guest").starts_with("FAIL"), "{out}");
    let host = vmm::KvmHost::detect();
    if host.dev_kvm {
        assert!(line("kvm").starts_with("PASS"), "{out}");
        let kind = format!("{:?}", host.kind).to_uppercase();
        assert!(line("kvm").contains(&kind), "{out}");
    }
    assert!(line("cgroups").starts_with("PASS"), "{out}");
    let guest = root.join("target/guest");
    let plugins = Path::new("/usr/lib/cni/bridge").exists();
    if host.dev_kvm && guest.join("vmlinux").exists() && plugins {
        let (code, out) = check(&guest);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.lines().all(|l| l.starts_with("PASS ")), "{out}");
    } else {
        println!("SKIPPED check_reports_this_host (passing half): no /dev/kvm, guest build or CNI plugins");
    }
}

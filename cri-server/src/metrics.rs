//! Prometheus metrics (OpenMetrics text on `GET /metrics`): CRI requests and their latency by method
//! and gRPC code, pod VM boots, image pulls, and pods and containers by state (read from the state
//! store at scrape time).

use std::convert::Infallible;
use std::sync::LazyLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::state::{ContainerState, PodState, StateStore};

/// The OpenMetrics content type.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RpcLabels, Counter>,
    request_seconds: Family<MethodLabels, Histogram>,
    boots: Family<ResultLabels, Counter>,
    boot_seconds: Histogram,
    pulls: Family<ResultLabels, Counter>,
    pull_seconds: Histogram,
    pods: Family<StateLabels, Gauge>,
    containers: Family<StateLabels, Gauge>,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn ok_or_error<T, E>(r: &Result<T, E>) -> ResultLabels {
    ResultLabels {
        result: if r.is_ok() { "ok" } else { "error" },
    }
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("podvisor");
        let requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "cri_requests",
            "CRI requests by method and gRPC status code",
            requests.clone(),
        );
        // 1 ms .. 16 min: a RunPodSandbox takes tens of seconds under PVM, ~100 ms on VMX/SVM.
        let request_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 11))
        });
        registry.register(
            "cri_request_duration_seconds",
            "CRI request latency by method",
            request_seconds.clone(),
        );
        let boots = Family::<ResultLabels, Counter>::default();
        registry.register("vm_boots", "Pod VM boots by result", boots.clone());
        let boot_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 15));
        registry.register(
            "vm_boot_duration_seconds",
            "Time from starting a pod VM to its agent answering",
            boot_seconds.clone(),
        );
        let pulls = Family::<ResultLabels, Counter>::default();
        registry.register("image_pulls", "Image pulls by result", pulls.clone());
        let pull_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 15));
        registry.register(
            "image_pull_duration_seconds",
            "Image pull time (download, verification, block image)",
            pull_seconds.clone(),
        );
        let pods = Family::<StateLabels, Gauge>::default();
        registry.register("pods", "Pod sandboxes by state", pods.clone());
        let containers = Family::<StateLabels, Gauge>::default();
        registry.register("containers", "Containers by state", containers.clone());
        let kvm = vmm::KvmHost::detect();
        registry.register(
            "build",
            "The daemon's version and the host's KVM kind",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("kvm", format!("{:?}", kvm.kind).to_lowercase()),
            ]),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            boots,
            boot_seconds,
            pulls,
            pull_seconds,
            pods,
            containers,
        }
    }

    /// Records one CRI request: its method, gRPC code name and latency.
    pub fn rpc(&self, method: &str, code: &str, took: Duration) {
        self.requests
            .get_or_create(&RpcLabels {
                method: method.into(),
                code: code.into(),
            })
            .inc();
        self.request_seconds
            .get_or_create(&MethodLabels {
                method: method.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records a pod VM boot (to the agent answering) and how long it took.
    pub fn boot<T, E>(&self, result: &Result<T, E>, took: Duration) {
        self.boots.get_or_create(&ok_or_error(result)).inc();
        if result.is_ok() {
            self.boot_seconds.observe(took.as_secs_f64());
        }
    }

    /// Records an image pull and how long it took.
    pub fn pull<T, E>(&self, result: &Result<T, E>, took: Duration) {
        self.pulls.get_or_create(&ok_or_error(result)).inc();
        if result.is_ok() {
            self.pull_seconds.observe(took.as_secs_f64());
        }
    }

    /// The metrics as OpenMetrics text, with pod and container counts read from `store`.
    pub fn render(&self, store: &StateStore) -> Result<String, String> {
        let pods = store.pods().map_err(|e| e.to_string())?;
        for (state, name) in [
            (PodState::Creating, "creating"),
            (PodState::Ready, "ready"),
            (PodState::NotReady, "notready"),
        ] {
            let n = pods.iter().filter(|p| p.state == state).count();
            self.pods
                .get_or_create(&StateLabels { state: name })
                .set(n as i64);
        }
        let containers = store.containers().map_err(|e| e.to_string())?;
        for (state, name) in [
            (ContainerState::Creating, "creating"),
            (ContainerState::Created, "created"),
            (ContainerState::Running, "running"),
            (ContainerState::Exited, "exited"),
        ] {
            let n = containers.iter().filter(|c| c.state == state).count();
            self.containers
                .get_or_create(&StateLabels { state: name })
                .set(n as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, store: StateStore) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(respond(&req, &store)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond<B>(req: &Request<B>, store: &StateStore) -> Response<Full<Bytes>> {
    let reply = |status, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "see /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".into(),
        );
    }
    match METRICS.render(store) {
        Ok(text) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("reading the state store: {e}\n"),
        ),
    }
}

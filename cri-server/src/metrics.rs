//! Prometheus metrics (OpenMetrics text on `GET /metrics`): CRI requests and their latency by method
//! and gRPC code, pod VM boots, image pulls, and pods and containers by state (read from the state
//! store at scrape time).

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::http::plain;
use crate::state::{ContainerState, PodState, StateStore};

/// The gRPC path prefixes of the CRI services; other paths are counted as method `other`.
const CRI_SERVICES: [&str; 2] = ["/runtime.v1.RuntimeService/", "/runtime.v1.ImageService/"];

/// Distinct `method` label values (CRI v1 has 34 methods): a bound on what clients can add.
const MAX_METHODS: usize = 64;

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
    methods: Mutex<HashSet<String>>,
    requests: Family<RpcLabels, Counter>,
    request_seconds: Family<MethodLabels, Histogram>,
    boots: Family<ResultLabels, Counter>,
    boot_seconds: Histogram,
    pulls: Family<ResultLabels, Counter>,
    pull_seconds: Histogram,
    pods: Family<StateLabels, Gauge>,
    containers: Family<StateLabels, Gauge>,
    pending_releases: Gauge,
    release_failures: Counter,
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
        let pending_releases = Gauge::default();
        registry.register(
            "pending_releases",
            "Pods whose host resources (CNI attachment, namespace, cgroups) are not released yet and are \
             being retried",
            pending_releases.clone(),
        );
        let release_failures = Counter::default();
        registry.register(
            "release_failures",
            "Failed attempts to release a pod's host resources",
            release_failures.clone(),
        );
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
            methods: Mutex::new(HashSet::new()),
            requests,
            request_seconds,
            boots,
            boot_seconds,
            pulls,
            pull_seconds,
            pods,
            containers,
            pending_releases,
            release_failures,
        }
    }

    /// Records a failed attempt to release a pod's host resources.
    pub fn release_failed(&self) {
        self.release_failures.inc();
    }

    /// The `method` label of a gRPC request path: the CRI method name, or `other` for paths outside
    /// the CRI services, malformed names and names beyond the first [`MAX_METHODS`] seen.
    pub fn method_label(&self, path: &str) -> String {
        let Some(name) = CRI_SERVICES.iter().find_map(|p| path.strip_prefix(p)) else {
            return "other".into();
        };
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return "other".into();
        }
        let mut seen = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(name) || seen.len() < MAX_METHODS {
            seen.insert(name.to_string());
            name.to_string()
        } else {
            "other".into()
        }
    }

    /// Records one CRI request: its method label, gRPC code name and latency (None for a stream,
    /// whose length says nothing about the runtime).
    pub fn rpc(&self, method: &str, code: &str, took: Option<Duration>) {
        self.requests
            .get_or_create(&RpcLabels {
                method: method.into(),
                code: code.into(),
            })
            .inc();
        if let Some(took) = took {
            self.request_seconds
                .get_or_create(&MethodLabels {
                    method: method.into(),
                })
                .observe(took.as_secs_f64());
        }
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
        let pending = store.releases().map_err(|e| e.to_string())?;
        self.pending_releases.set(pending.len() as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, store: StateStore) {
    crate::http::serve(
        listener,
        "metrics endpoint",
        move |req: Request<Incoming>| {
            let store = store.clone();
            async move {
                // Reading every record from sled is blocking work.
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                tokio::task::spawn_blocking(move || respond(&method, &path, &store))
                    .await
                    .unwrap_or_else(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))
            }
        },
    )
    .await
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn respond(method: &Method, path: &str, store: &StateStore) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "see /metrics\n");
    }
    if method != Method::GET && method != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    match METRICS.render(store) {
        Ok(text) => reply(StatusCode::OK, text),
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the state store: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        let m = Metrics::new();
        assert_eq!(
            m.method_label("/runtime.v1.RuntimeService/Version"),
            "Version"
        );
        assert_eq!(
            m.method_label("/runtime.v1.ImageService/PullImage"),
            "PullImage"
        );
        for other in [
            "/grpc.health.v1.Health/Check",
            "/runtime.v1.RuntimeService/",
            "/runtime.v1.RuntimeService/a/b",
            "/runtime.v1.RuntimeService/Ver-sion",
            "/",
        ] {
            assert_eq!(m.method_label(other), "other", "{other}");
        }
        for i in 0..200 {
            m.method_label(&format!("/runtime.v1.RuntimeService/Made{i}"));
        }
        assert_eq!(m.methods.lock().unwrap().len(), MAX_METHODS);
        assert_eq!(
            m.method_label("/runtime.v1.RuntimeService/Made199"),
            "other"
        );
        // Names seen before the bound keep their label.
        assert_eq!(
            m.method_label("/runtime.v1.RuntimeService/Version"),
            "Version"
        );
    }
}

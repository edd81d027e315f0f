//! Logs and traces: `tracing` to stderr, spans exported over OTLP/gRPC when `--otlp-endpoint` is set
//! (tracing-opentelemetry), and the tower layer that gives every CRI RPC its span (`cri`, with the
//! method and the gRPC code) and its metrics.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::metrics::METRICS;

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP endpoint is not a plain-text gRPC address (`http://HOST:PORT`).
    #[error("--otlp-endpoint {0:?}: expected http://HOST:PORT (OTLP/gRPC without TLS, e.g. a collector on the node)")]
    Endpoint(String),
    /// The OTLP exporter could not be built (a malformed endpoint).
    #[error("--otlp-endpoint {endpoint:?}: {source}")]
    Otlp {
        /// The endpoint given.
        endpoint: String,
        /// The exporter's complaint.
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes spans not yet exported.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber: stderr logs filtered by `RUST_LOG` (else `default_filter`) and,
/// with `otlp_endpoint`, the same spans exported over OTLP/gRPC in batches. The exporter's gRPC
/// client runs on the Tokio runtime entered by the caller.
pub fn init(
    default_filter: &str,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = match otlp_endpoint.filter(|e| !e.is_empty()) {
        None => None,
        Some(endpoint) => {
            let uri: Option<http::Uri> = endpoint.parse().ok();
            if uri.as_ref().and_then(|u| u.scheme_str()) != Some("http")
                || uri.as_ref().and_then(|u| u.host()).is_none()
            {
                return Err(TelemetryError::Endpoint(endpoint.into()));
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|source| TelemetryError::Otlp {
                    endpoint: endpoint.into(),
                    source,
                })?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("podvisor")
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("podvisor")));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(otel)
        .init();
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("podvisor: flushing OTLP spans: {e}");
            }
        }
    }
}

/// The name Prometheus and tracing get for a gRPC status code (`OK`, `NotFound`, ...).
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".into(),
        c => format!("{c:?}"),
    }
}

/// The gRPC code of a response: `grpc-status` in the headers (tonic's trailers-only error
/// responses), else OK (the status of a successful call comes in the trailers).
fn response_code<B>(response: &http::Response<B>) -> tonic::Code {
    match response.headers().get("grpc-status") {
        None => tonic::Code::Ok,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(tonic::Code::Unknown, tonic::Code::from_i32),
    }
}

/// Tower layer: a `cri` span per RPC (the handlers' spans are its children) and the request metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct CriLayer;

impl<S> tower::Layer<S> for CriLayer {
    type Service = CriService<S>;

    fn layer(&self, inner: S) -> CriService<S> {
        CriService { inner }
    }
}

/// The service [`CriLayer`] wraps around the CRI services.
#[derive(Clone, Debug)]
pub struct CriService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for CriService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = METRICS.method_label(request.uri().path());
        // A stream's response headers go out when it starts: its code is the one it started with.
        let streaming = method == "GetContainerEvents";
        let span = tracing::info_span!("cri", rpc = %method, code = tracing::field::Empty);
        let call = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let start = Instant::now();
        Box::pin(async move {
            let result = call.instrument(span.clone()).await;
            let code = match &result {
                Ok(response) => code_name(response_code(response)),
                Err(_) => code_name(tonic::Code::Unknown),
            };
            span.record("code", code.as_str());
            METRICS.rpc(&method, &code, (!streaming).then(|| start.elapsed()));
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_endpoints_must_be_plain_grpc_addresses() {
        for bad in [
            "https://collector:4317",
            "collector:4317",
            "http://",
            "not a url",
        ] {
            assert!(
                matches!(init("info", Some(bad)), Err(TelemetryError::Endpoint(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn codes_come_from_trailers_only_responses() {
        let ok = http::Response::new(());
        assert_eq!(code_name(response_code(&ok)), "OK");
        let not_found = http::Response::builder()
            .header("grpc-status", "5")
            .body(())
            .unwrap();
        assert_eq!(code_name(response_code(&not_found)), "NotFound");
        let bad = http::Response::builder()
            .header("grpc-status", "x")
            .body(())
            .unwrap();
        assert_eq!(code_name(response_code(&bad)), "Unknown");
    }
}

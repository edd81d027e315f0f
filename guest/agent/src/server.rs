//! A minimal gRPC server: hyper's HTTP/2 server directly on vsock connections.
//!
//! tonic's `transport::Server` would add HTTP/1, protocol auto-detection and tower layers the agent does not
//! need; every byte of the agent costs boot time (it is unpacked from the initramfs by an emulated kernel).

use std::convert::Infallible;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use podvisor_proto::AgentServer;
use tokio_vsock::VsockListener;
use tower_service::Service;

use crate::service::AgentService;

/// Consecutive accept errors after which the listener is considered broken.
const MAX_ACCEPT_ERRORS: u32 = 100;

/// Errors of the server loop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// accept(2) kept failing.
    #[error("accept failed {count} times in a row, last error: {source}")]
    Accept {
        /// Consecutive failures.
        count: u32,
        /// The last error.
        source: std::io::Error,
    },
}

/// Where the agent listens: vsock in a pod VM, a unix socket on the node (a native pod's agent).
pub enum Listener {
    /// The guest's vsock port.
    Vsock(VsockListener),
    /// A unix socket on the node.
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Accepts one connection and serves it on its own task.
    async fn accept_one(&self, grpc: &AgentServer<AgentService>) -> std::io::Result<()> {
        match self {
            Listener::Vsock(l) => {
                let (stream, _) = l.accept().await?;
                tokio::spawn(serve_connection(TokioIo::new(stream), grpc.clone()));
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                tokio::spawn(serve_connection(TokioIo::new(stream), grpc.clone()));
            }
        }
        Ok(())
    }
}

/// Accepts connections forever, serving each on its own task; returns only if accepting keeps failing.
pub async fn serve(listener: &Listener, service: AgentService) -> ServerError {
    let grpc = AgentServer::new(service);
    let mut errors = 0;
    loop {
        match listener.accept_one(&grpc).await {
            Ok(()) => errors = 0,
            Err(source) => {
                errors += 1;
                if errors >= MAX_ACCEPT_ERRORS {
                    return ServerError::Accept {
                        count: errors,
                        source,
                    };
                }
                if errors == 1 {
                    crate::log(&format!("accept: {source}; retrying"));
                }
                // EMFILE, ENOMEM and the like: give the guest a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one HTTP/2 connection until the peer closes it.
pub async fn serve_connection<IO>(io: IO, grpc: AgentServer<AgentService>)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let mut grpc = grpc.clone();
        async move {
            // The generated server is always ready and never fails at the HTTP level.
            let response = grpc.call(req).await;
            Ok::<_, Infallible>(response.unwrap_or_else(|never| match never {}))
        }
    });
    // Peers closing or resetting connections is normal (health probes): nothing to log.
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(io, service)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::Fixture;
    use podvisor_proto::{AgentClient, HealthRequest, ReadFileRequest, ServingStatus};

    /// A real tonic client talks to `serve_connection` over an in-memory pipe.
    #[tokio::test]
    async fn grpc_round_trip() {
        let fx = Fixture::new();
        let service = crate::service::tests::service(&fx).0;
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve_connection(
            TokioIo::new(server_io),
            AgentServer::new(service),
        ));
        let mut pipe = Some(client_io);
        let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_| {
                let io = pipe.take().expect("one connection");
                async move { Ok::<_, std::io::Error>(TokioIo::new(io)) }
            }))
            .await
            .unwrap();
        let mut client = AgentClient::new(channel).max_decoding_message_size(8 << 20);
        let health = client.health(HealthRequest {}).await.unwrap().into_inner();
        assert_eq!(health.status(), ServingStatus::Serving);

        let big = fx.dir.path().join("big");
        std::fs::write(&big, vec![7u8; 5 << 20]).unwrap();
        let read = ReadFileRequest {
            path: big.display().to_string(),
            offset: 0,
            max_bytes: 0,
        };
        let chunk = client.read_file(read).await.unwrap().into_inner();
        assert_eq!((chunk.data.len(), chunk.eof), (4 << 20, false));
        let read = ReadFileRequest {
            path: "rel".into(),
            offset: 0,
            max_bytes: 1,
        };
        let err = client.read_file(read).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}

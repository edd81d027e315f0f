//! The streaming server's backend: exec and attach through the guest agent's process RPCs, and
//! port-forward through the agent's vsock port forwarder.

use std::sync::Arc;

use bytes::Bytes;
use pb::AgentClient;
use podvisor_proto as pb;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::{Manager, SandboxError};
use crate::logs::Stream;
use crate::streaming::{Backend, BackendError, ExitInfo, ProcessIo, TerminalSize};

fn backend_err(e: SandboxError) -> BackendError {
    BackendError(e.to_string())
}

/// Forwards client stdin to the process (closing its stdin at EOF) and terminal resizes.
fn pump_input(
    agent: &AgentClient<Channel>,
    container_id: &str,
    exec_id: &str,
    stdin: Option<mpsc::Receiver<Bytes>>,
    close_at_eof: bool,
    mut resize: mpsc::Receiver<TerminalSize>,
) {
    let (mut a, c, e) = (agent.clone(), container_id.to_string(), exec_id.to_string());
    tokio::spawn(async move {
        let ids = || pb::ProcessRequest {
            container_id: c.clone(),
            exec_id: e.clone(),
        };
        if let Some(mut stdin) = stdin {
            while let Some(data) = stdin.recv().await {
                let req = pb::WriteStdinRequest {
                    container_id: c.clone(),
                    exec_id: e.clone(),
                    data: data.to_vec(),
                };
                if a.write_stdin(req).await.is_err() {
                    return;
                }
            }
        }
        if close_at_eof {
            let _ = a.close_stdin(ids()).await;
        }
    });
    let (mut a, c, e) = (agent.clone(), container_id.to_string(), exec_id.to_string());
    tokio::spawn(async move {
        while let Some(size) = resize.recv().await {
            let req = pb::ResizeTtyRequest {
                container_id: c.clone(),
                exec_id: e.clone(),
                rows: size.height.into(),
                cols: size.width.into(),
            };
            if a.resize_tty(req).await.is_err() {
                return;
            }
        }
    });
}

/// Copies one output stream of an exec'd process to the client until EOF.
fn pump_output(
    agent: &AgentClient<Channel>,
    container_id: &str,
    exec_id: &str,
    which: pb::OutputStream,
    to: Option<mpsc::Sender<Bytes>>,
) -> tokio::task::JoinHandle<()> {
    let mut agent = agent.clone();
    let req = pb::ReadOutputRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        stream: which.into(),
    };
    tokio::spawn(async move {
        let Ok(resp) = agent.read_output(req).await else {
            return;
        };
        let mut s = resp.into_inner();
        while let Ok(Some(chunk)) = s.message().await {
            if let Some(to) = &to {
                if to.send(Bytes::from(chunk.data)).await.is_err() {
                    // The client is gone; keep draining so the process never blocks on a full pipe.
                    continue;
                }
            }
        }
    })
}

#[async_trait::async_trait]
impl Backend for Manager {
    async fn exec(
        &self,
        container_id: &str,
        cmd: &[String],
        io: ProcessIo,
    ) -> Result<ExitInfo, BackendError> {
        let (record, live, _) = self
            .running_process(container_id)
            .await
            .map_err(backend_err)?;
        super::exec::check_command(cmd).map_err(backend_err)?;
        let exec_id = super::new_id().map_err(backend_err)?[..16].to_string();
        let mut agent = live.agent();
        agent
            .exec_process(super::exec::exec_request(&record.id, &exec_id, cmd, io.tty))
            .await
            .map_err(|s| BackendError(format!("exec: {}", s.message())))?;
        let out = pump_output(
            &agent,
            &record.id,
            &exec_id,
            pb::OutputStream::Stdout,
            io.stdout,
        );
        let err = (!io.tty).then(|| {
            pump_output(
                &agent,
                &record.id,
                &exec_id,
                pb::OutputStream::Stderr,
                io.stderr,
            )
        });
        pump_input(&agent, &record.id, &exec_id, io.stdin, true, io.resize);
        let exit = agent
            .wait_process(pb::ProcessRequest {
                container_id: record.id.clone(),
                exec_id,
            })
            .await
            .map_err(|s| BackendError(format!("wait: {}", s.message())))?
            .into_inner();
        let _ = out.await;
        if let Some(err) = err {
            let _ = err.await;
        }
        Ok(ExitInfo {
            exit_code: exit.exit_code,
        })
    }

    async fn attach(&self, container_id: &str, io: ProcessIo) -> Result<(), BackendError> {
        let (record, live, lc) = self
            .running_process(container_id)
            .await
            .map_err(backend_err)?;
        let config = record.cri_config();
        let stdin = if config.stdin { io.stdin } else { None };
        // stdin_once: the container's stdin closes when the first session that wrote to it ends.
        let close = config.stdin_once && stdin.is_some();
        pump_input(&live.agent(), &record.id, "", stdin, close, io.resize);
        let mut output = lc.subscribe_output();
        loop {
            let chunk = tokio::select! {
                chunk = output.recv() => chunk,
                // Exited: the copiers have forwarded the last output.
                _ = async { while !lc.has_exited() { tokio::time::sleep(std::time::Duration::from_millis(200)).await } } => break,
            };
            let (stream, data) = match chunk {
                Ok(c) => c,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(container = %record.id, "attach client lagged; {n} chunks dropped");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            let to = match stream {
                Stream::Stdout => &io.stdout,
                Stream::Stderr => &io.stderr,
            };
            if let Some(to) = to {
                if to.send(data).await.is_err() {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
        mut stream: tokio::io::DuplexStream,
    ) -> Result<(), BackendError> {
        let id = self
            .resolve_pod("pod_sandbox_id", pod_sandbox_id)
            .map_err(backend_err)?;
        let (_, live) = self.ready_pod(&id).map_err(backend_err)?;
        let (vsock, _) = pb::client::hybrid_vsock_connect(&live.vsock, pb::PORT_FORWARD_VSOCK_PORT)
            .await
            .map_err(|e| BackendError(format!("reaching the pod VM: {e}")))?;
        let mut vsock = tokio::io::BufStream::new(vsock);
        vsock
            .write_all(format!("PORT {port}\n").as_bytes())
            .await
            .and(vsock.flush().await)
            .map_err(|e| BackendError(format!("port forward request: {e}")))?;
        let mut reply = String::new();
        vsock
            .read_line(&mut reply)
            .await
            .map_err(|e| BackendError(format!("port forward reply: {e}")))?;
        match reply.trim_end().strip_prefix("ERR ") {
            Some(why) => return Err(BackendError(format!("port {port}: {why}"))),
            None if reply.trim_end() != "OK" => {
                return Err(BackendError(format!(
                    "port {port}: unexpected reply {reply:?}"
                )))
            }
            None => {}
        }
        tokio::io::copy_bidirectional(&mut stream, &mut vsock)
            .await
            .map_err(|e| BackendError(format!("port {port}: {e}")))?;
        Ok(())
    }
}

/// The streaming server's view of the manager.
pub fn backend(manager: &Manager) -> Arc<dyn Backend> {
    Arc::new(manager.clone())
}

//! The streaming server's backend: exec and attach through the pod layer's one process path, and
//! port-forward through the pod.

use std::sync::Arc;

use super::{Manager, SandboxError};
use crate::pod::process;
use crate::streaming::{Backend, ExitInfo, ProcessIo};

#[async_trait::async_trait]
impl Backend for Manager {
    async fn exec(
        &self,
        container_id: &str,
        cmd: &[String],
        io: ProcessIo,
    ) -> Result<ExitInfo, SandboxError> {
        let (record, live, _) = self.running_process(container_id).await?;
        super::exec::check_command(cmd)?;
        let exec_id = super::new_id()?[..16].to_string();
        let exit_code = process::run_attached(&*live, &record.id, &exec_id, cmd, io).await?;
        Ok(ExitInfo { exit_code })
    }

    async fn attach(&self, container_id: &str, io: ProcessIo) -> Result<(), SandboxError> {
        let (record, live, lc) = self.running_process(container_id).await?;
        let config = record.cri_config();
        // stdin_once: the container's stdin closes when the first session that wrote to it ends.
        process::attach(&*live, &record.id, &lc, config.stdin, config.stdin_once, io).await;
        Ok(())
    }

    async fn port_forward(
        &self,
        pod_sandbox_id: &str,
        port: u16,
        mut stream: tokio::io::DuplexStream,
    ) -> Result<(), SandboxError> {
        let id = self.resolve_pod("pod_sandbox_id", pod_sandbox_id)?;
        let (_, live) = self.ready_pod(&id)?;
        let mut to_pod = live.port_forward(port).await?;
        tokio::io::copy_bidirectional(&mut stream, &mut to_pod)
            .await
            .map_err(|e| crate::pod::PodError::PortForward {
                port,
                why: e.to_string(),
            })?;
        Ok(())
    }
}

/// The streaming server's view of the manager.
pub fn backend(manager: &Manager) -> Arc<dyn Backend> {
    Arc::new(manager.clone())
}

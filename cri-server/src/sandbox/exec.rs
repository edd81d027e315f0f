//! ExecSync: a command in a running container, its output collected, its deadline enforced.

use std::time::Duration;

use podvisor_proto as pb;

use super::{agent_err, Manager, SandboxError};
use crate::text::echo;

/// How long ExecSync keeps reading output after the command exited.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(5);
/// Output ExecSync keeps per stream.
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;

/// Output of an ExecSync.
#[derive(Debug, Default)]
pub struct ExecOutput {
    /// Standard output (capped at [`MAX_EXEC_OUTPUT`]).
    pub stdout: Vec<u8>,
    /// Standard error (capped likewise).
    pub stderr: Vec<u8>,
    /// Exit code (128 + signal for a signalled process).
    pub exit_code: i32,
}

impl Manager {
    /// ExecSync: runs `cmd` in the container, collects its output, and kills it after `timeout`
    /// seconds answering DeadlineExceeded (0 or negative: no timeout, as in containerd).
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: i64,
    ) -> Result<ExecOutput, SandboxError> {
        if cmd.is_empty() {
            return Err(SandboxError::InvalidArgument("cmd: empty".into()));
        }
        let (record, live, _) = self.running_process(id).await?;
        let process = crate::spec::exec_process(&record.spec_json, cmd, false)?;
        let exec_id = super::new_id()?[..16].to_string();
        let read = |stream: pb::OutputStream| {
            let mut agent = live.agent();
            let req = pb::ReadOutputRequest {
                container_id: record.id.clone(),
                exec_id: exec_id.clone(),
                stream: stream.into(),
            };
            tokio::spawn(async move {
                let mut out = Vec::new();
                if let Ok(resp) = agent.read_output(req).await {
                    let mut s = resp.into_inner();
                    while let Ok(Some(chunk)) = s.message().await {
                        let room = MAX_EXEC_OUTPUT.saturating_sub(out.len());
                        out.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
                    }
                }
                out
            })
        };
        let ids = || pb::ProcessRequest {
            container_id: record.id.clone(),
            exec_id: exec_id.clone(),
        };
        // The deadline covers starting the process too, so a guest slow to start it still answers in
        // time. Starting is never cancelled (it runs in its own task): a process started after the
        // deadline is killed as soon as it exists.
        let mut started = tokio::spawn({
            let mut agent = live.agent();
            let req = pb::ExecProcessRequest {
                container_id: record.id.clone(),
                exec_id: exec_id.clone(),
                process_json: process,
            };
            async move { agent.exec_process(req).await }
        });
        let run = async {
            let mut agent = live.agent();
            (&mut started)
                .await
                .map_err(|e| SandboxError::Vm(format!("exec task: {e}")))?
                .map_err(agent_err("ExecProcess"))?;
            // ExecSync has no stdin: the command reads EOF.
            let _ = agent.close_stdin(ids()).await;
            let readers = [
                read(pb::OutputStream::Stdout),
                read(pb::OutputStream::Stderr),
            ];
            let exit = agent
                .wait_process(ids())
                .await
                .map_err(agent_err("WaitProcess"))?
                .into_inner();
            Ok::<_, SandboxError>((exit, readers))
        };
        let (exit, readers) = if timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(timeout as u64), run).await {
                Ok(done) => done?,
                Err(_) => {
                    // Killing the process ends its output streams, and with them the readers.
                    let mut agent = live.agent();
                    let kill = pb::SignalProcessRequest {
                        container_id: record.id.clone(),
                        exec_id: exec_id.clone(),
                        signal: super::SIGKILL as u32,
                        all: false,
                    };
                    tokio::spawn(async move {
                        if let Ok(Ok(_)) = started.await {
                            let _ = agent.signal_process(kill).await;
                        }
                    });
                    return Err(SandboxError::DeadlineExceeded(format!(
                        "command {} timed out after {timeout}s",
                        echo(&cmd.join(" "))
                    )));
                }
            }
        } else {
            run.await?
        };
        // A background child may keep the output open after the command exited: do not wait for it.
        let mut output = Vec::new();
        for mut reader in readers {
            match tokio::time::timeout(OUTPUT_AFTER_EXIT, &mut reader).await {
                Ok(out) => output.push(out.unwrap_or_default()),
                Err(_) => {
                    reader.abort();
                    output.push(Vec::new());
                }
            }
        }
        let stderr = output.pop().unwrap_or_default();
        let stdout = output.pop().unwrap_or_default();
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code: exit.exit_code,
        })
    }
}

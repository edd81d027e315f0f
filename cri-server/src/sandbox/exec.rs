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

/// Checks an exec command (CRI `cmd`): not empty, a program name first, no NUL bytes.
pub(super) fn check_command(cmd: &[String]) -> Result<(), SandboxError> {
    if cmd.first().is_none_or(|c| c.is_empty()) {
        return Err(SandboxError::InvalidArgument(
            "cmd: no command specified".into(),
        ));
    }
    if let Some(i) = cmd.iter().position(|a| a.contains('\0')) {
        return Err(SandboxError::InvalidArgument(format!(
            "cmd[{i}]: contains a NUL byte"
        )));
    }
    Ok(())
}

/// The agent request running `cmd` (checked by [`check_command`]) as exec `exec_id`. Only what differs
/// from the container's own process travels: the agent derives the rest (resolved user and groups, env,
/// capabilities, no_new_privileges, seccomp...) from the container's process, as containerd does. ExecSync
/// and the streaming Exec both use it.
pub(super) fn exec_request(
    container_id: &str,
    exec_id: &str,
    cmd: &[String],
    tty: bool,
) -> pb::ExecProcessRequest {
    pb::ExecProcessRequest {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
        args: cmd.to_vec(),
        terminal: tty,
    }
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
        check_command(cmd)?;
        let (record, live, _) = self.running_process(id).await?;
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
            let req = exec_request(&record.id, &exec_id, cmd, false);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exec_requests_carry_only_the_command_and_terminal() {
        let cmd = strings(&["sh", "-c", "id"]);
        check_command(&cmd).unwrap();
        let req = exec_request("c1", "e1", &cmd, true);
        assert_eq!(
            req,
            pb::ExecProcessRequest {
                container_id: "c1".into(),
                exec_id: "e1".into(),
                args: cmd,
                terminal: true,
            }
        );
        for (bad, field) in [
            (strings(&[]), "cmd:"),
            (strings(&[""]), "cmd:"),
            (strings(&["sh", "a\0b"]), "cmd[1]:"),
        ] {
            assert!(
                matches!(check_command(&bad), Err(SandboxError::InvalidArgument(m)) if m.starts_with(field)),
                "{bad:?}"
            );
        }
    }
}

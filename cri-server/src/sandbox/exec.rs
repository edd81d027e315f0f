//! ExecSync: a command in a running container, its output collected, its deadline enforced.

use std::time::Duration;

use super::{Manager, SandboxError};
use crate::pod::process::{run_to_completion, Completion};
use crate::text::echo;

/// Output ExecSync keeps per stream.
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;

pub use crate::pod::process::ExecOutput;

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
        let deadline = (timeout > 0).then(|| Duration::from_secs(timeout as u64));
        let done =
            run_to_completion(&*live, &record.id, &exec_id, cmd, deadline, MAX_EXEC_OUTPUT).await?;
        match done {
            Completion::Exited(output) => Ok(output),
            Completion::TimedOut => Err(SandboxError::DeadlineExceeded(format!(
                "command {} timed out after {timeout}s",
                echo(&cmd.join(" "))
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn commands_need_a_program_and_no_nul() {
        check_command(&strings(&["sh", "-c", "id"])).unwrap();
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

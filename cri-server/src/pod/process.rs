//! The one path that runs a process in a container: ExecSync and the streaming server's exec both start
//! a [`Process`] the same way (only what differs from the container's own process travels: the agent
//! derives user, groups, env, capabilities, no_new_privileges and seccomp from it, as containerd does),
//! and attach reaches the container's main process through the same type.

use std::time::Duration;

use bytes::Bytes;
use pb::AgentClient;
use podvisor_proto as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::container::LiveContainer;
use super::{agent_err, Pod, PodError};
use crate::logs::Stream;

/// SIGKILL.
pub const SIGKILL: i32 = 9;
/// How long ExecSync keeps reading output after the command exited.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(5);

/// A terminal size sent by the client (JSON `{"Width":..,"Height":..}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TerminalSize {
    /// Columns.
    #[serde(rename = "Width", alias = "width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height", alias = "height")]
    pub height: u16,
}

/// The process end of an exec/attach session; the server does all protocol framing.
pub struct ProcessIo {
    /// Client input; `None` when stdin was not requested, the channel closing means EOF.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Process output; `None` when not requested. A send error means the client is gone.
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// Process error output; always `None` with a tty.
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Whether the client asked for a terminal.
    pub tty: bool,
    /// Terminal resizes (only ever sent with a tty; ends when the client stops sending them).
    pub resize: mpsc::Receiver<TerminalSize>,
}

/// A byte stream to a port in the pod (port forwarding).
pub trait PortIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> PortIo for T {}
/// A connection to a port in the pod.
pub type PortStream = Box<dyn PortIo>;

/// How a process ended (the agent's answer).
pub type ProcessExit = pb::WaitProcessResponse;

/// Names a process: a container's main process (empty `exec_id`) or one of its execs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessRef {
    /// The container.
    pub container_id: String,
    /// The exec; empty for the main process.
    pub exec_id: String,
}

impl ProcessRef {
    /// The main process of container `id`.
    pub fn main(id: &str) -> ProcessRef {
        ProcessRef {
            container_id: id.into(),
            exec_id: String::new(),
        }
    }

    /// The agent's name for it.
    pub fn request(&self) -> pb::ProcessRequest {
        pb::ProcessRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
        }
    }
}

/// The agent request running `cmd` as exec `exec_id` of container `container_id`.
pub fn exec_request(
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

/// A process in a container of a pod, driven through the pod's agent.
#[derive(Clone)]
pub struct Process {
    agent: AgentClient<Channel>,
    id: ProcessRef,
}

impl Process {
    /// The main process of container `container_id` of `pod`.
    pub fn main(pod: &dyn Pod, container_id: &str) -> Process {
        Process {
            agent: pod.agent(),
            id: ProcessRef::main(container_id),
        }
    }

    /// Starts `cmd` (checked by the caller) as exec `exec_id` of the container.
    pub async fn exec(
        pod: &dyn Pod,
        container_id: &str,
        exec_id: &str,
        cmd: &[String],
        tty: bool,
    ) -> Result<Process, PodError> {
        let id = ProcessRef {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        };
        Process::start(pod.agent(), id, cmd.to_vec(), tty).await
    }

    async fn start(
        mut agent: AgentClient<Channel>,
        id: ProcessRef,
        cmd: Vec<String>,
        tty: bool,
    ) -> Result<Process, PodError> {
        agent
            .exec_process(exec_request(&id.container_id, &id.exec_id, &cmd, tty))
            .await
            .map_err(agent_err("ExecProcess"))?;
        Ok(Process { agent, id })
    }

    /// Waits for the process's exit.
    pub async fn wait(&self) -> Result<ProcessExit, PodError> {
        Ok(self
            .agent
            .clone()
            .wait_process(self.id.request())
            .await
            .map_err(agent_err("WaitProcess"))?
            .into_inner())
    }

    /// Sends `signal` to the process, or to every process of the container with `all`.
    pub async fn signal(&self, signal: i32, all: bool) -> Result<(), PodError> {
        self.agent
            .clone()
            .signal_process(pb::SignalProcessRequest {
                container_id: self.id.container_id.clone(),
                exec_id: self.id.exec_id.clone(),
                signal: signal as u32,
                all,
            })
            .await
            .map_err(agent_err("SignalProcess"))?;
        Ok(())
    }

    /// Closes the process's stdin (it reads EOF).
    pub async fn close_stdin(&self) -> Result<(), PodError> {
        self.agent
            .clone()
            .close_stdin(self.id.request())
            .await
            .map_err(agent_err("CloseStdin"))?;
        Ok(())
    }

    /// Calls `each` with every chunk of one output stream until EOF, or until `each` returns false
    /// (the stream is then drained without calling it, so the process never blocks on a full pipe).
    pub async fn read_output<F, Fut>(
        &self,
        which: pb::OutputStream,
        mut each: F,
    ) -> Result<(), PodError>
    where
        F: FnMut(Bytes) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let req = pb::ReadOutputRequest {
            container_id: self.id.container_id.clone(),
            exec_id: self.id.exec_id.clone(),
            stream: which.into(),
        };
        let mut s = self
            .agent
            .clone()
            .read_output(req)
            .await
            .map_err(agent_err("ReadOutput"))?
            .into_inner();
        let mut wanted = true;
        loop {
            match s.message().await {
                Ok(Some(chunk)) if wanted => wanted = each(Bytes::from(chunk.data)).await,
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(status) => return Err(agent_err("ReadOutput")(status)),
            }
        }
    }

    /// Copies one output stream to `to` (None: discarded) until EOF, in a task.
    fn pump_output(
        &self,
        which: pb::OutputStream,
        to: Option<mpsc::Sender<Bytes>>,
    ) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me
                .read_output(which, |data| {
                    let to = to.clone();
                    async move {
                        match to {
                            Some(to) => to.send(data).await.is_ok(),
                            None => true,
                        }
                    }
                })
                .await;
        })
    }

    /// Collects one output stream, keeping at most `cap` bytes, in a task.
    fn collect_output(&self, which: pb::OutputStream, cap: usize) -> JoinHandle<Vec<u8>> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = me
                .read_output(which, |data| {
                    let room = cap.saturating_sub(out.len());
                    out.extend_from_slice(&data[..data.len().min(room)]);
                    std::future::ready(true)
                })
                .await;
            out
        })
    }

    /// Forwards client input to the process (closing its stdin at EOF with `close_at_eof`) and
    /// terminal resizes, in tasks.
    pub fn pump_input(
        &self,
        stdin: Option<mpsc::Receiver<Bytes>>,
        close_at_eof: bool,
        mut resize: mpsc::Receiver<TerminalSize>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(mut stdin) = stdin {
                while let Some(data) = stdin.recv().await {
                    let req = pb::WriteStdinRequest {
                        container_id: me.id.container_id.clone(),
                        exec_id: me.id.exec_id.clone(),
                        data: data.to_vec(),
                    };
                    if me.agent.clone().write_stdin(req).await.is_err() {
                        return;
                    }
                }
            }
            if close_at_eof {
                let _ = me.close_stdin().await;
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(size) = resize.recv().await {
                let req = pb::ResizeTtyRequest {
                    container_id: me.id.container_id.clone(),
                    exec_id: me.id.exec_id.clone(),
                    rows: size.height.into(),
                    cols: size.width.into(),
                };
                if me.agent.clone().resize_tty(req).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Output of a command run to completion.
#[derive(Debug, Default)]
pub struct ExecOutput {
    /// Standard output (capped).
    pub stdout: Vec<u8>,
    /// Standard error (capped likewise).
    pub stderr: Vec<u8>,
    /// Exit code (128 + signal for a signalled process).
    pub exit_code: i32,
}

/// How a command run to completion ended.
#[derive(Debug)]
pub enum Completion {
    /// It exited (possibly with a failure code).
    Exited(ExecOutput),
    /// The deadline passed first; the process is killed as soon as it exists.
    TimedOut,
}

/// Runs `cmd` as exec `exec_id` of `container_id` without stdin, collects up to `cap` bytes of each
/// output, and kills it when `deadline` (if any) passes. The deadline covers starting the process too,
/// so a guest slow to start it still answers in time; starting runs in its own task and is never
/// cancelled, so a process started after the deadline is killed as soon as it exists.
pub async fn run_to_completion(
    pod: &dyn Pod,
    container_id: &str,
    exec_id: &str,
    cmd: &[String],
    deadline: Option<Duration>,
    cap: usize,
) -> Result<Completion, PodError> {
    let id = ProcessRef {
        container_id: container_id.into(),
        exec_id: exec_id.into(),
    };
    let mut started = tokio::spawn(Process::start(pod.agent(), id, cmd.to_vec(), false));
    let run = async {
        let process = (&mut started).await.map_err(|source| PodError::Task {
            what: "exec",
            source,
        })??;
        // No stdin: the command reads EOF.
        let _ = process.close_stdin().await;
        let readers = [
            process.collect_output(pb::OutputStream::Stdout, cap),
            process.collect_output(pb::OutputStream::Stderr, cap),
        ];
        let exit = process.wait().await?;
        Ok::<_, PodError>((exit, readers))
    };
    let (exit, readers) = match deadline {
        None => run.await?,
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(done) => done?,
            Err(_) => {
                // Killing the process ends its output streams, and with them the readers.
                tokio::spawn(async move {
                    if let Ok(Ok(process)) = started.await {
                        let _ = process.signal(SIGKILL, false).await;
                    }
                });
                return Ok(Completion::TimedOut);
            }
        },
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
    Ok(Completion::Exited(ExecOutput {
        stdout,
        stderr,
        exit_code: exit.exit_code,
    }))
}

/// Runs `cmd` as exec `exec_id` of `container_id` wired to a client's `io`; returns its exit code once
/// it exited and its output was sent into `io`.
pub async fn run_attached(
    pod: &dyn Pod,
    container_id: &str,
    exec_id: &str,
    cmd: &[String],
    io: ProcessIo,
) -> Result<i32, PodError> {
    let process = Process::exec(pod, container_id, exec_id, cmd, io.tty).await?;
    let out = process.pump_output(pb::OutputStream::Stdout, io.stdout);
    let err = (!io.tty).then(|| process.pump_output(pb::OutputStream::Stderr, io.stderr));
    process.pump_input(io.stdin, true, io.resize);
    let exit = process.wait().await?;
    let _ = out.await;
    if let Some(err) = err {
        let _ = err.await;
    }
    Ok(exit.exit_code)
}

/// Attaches a client's `io` to the main process of container `container_id` until the client or the
/// process is done. Its output comes from `live`'s copiers (which also feed the log file); input goes
/// to the process only when `stdin` is allowed, and closes its stdin at the session's end with
/// `stdin_once`.
pub async fn attach(
    pod: &dyn Pod,
    container_id: &str,
    live: &LiveContainer,
    stdin: bool,
    stdin_once: bool,
    io: ProcessIo,
) {
    let input = if stdin { io.stdin } else { None };
    let close = stdin_once && input.is_some();
    // Subscribed before any input goes in: the answer to it must not go out before this client listens
    // (a native pod's process answers within microseconds).
    let mut output = live.subscribe_output();
    Process::main(pod, container_id).pump_input(input, close, io.resize);
    loop {
        let chunk = tokio::select! {
            chunk = output.recv() => chunk,
            // Exited: the copiers have forwarded the last output.
            _ = live.exited() => break,
        };
        let (stream, data) = match chunk {
            Ok(c) => c,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(container = %container_id, "attach client lagged; {n} chunks dropped");
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_requests_carry_only_the_command_and_terminal() {
        let cmd: Vec<String> = ["sh", "-c", "id"].iter().map(|s| s.to_string()).collect();
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
        assert_eq!(ProcessRef::main("c1").request().exec_id, "");
    }
}

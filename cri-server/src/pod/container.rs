//! What lives only while the daemon runs for a container: its exit signal, its log file and the output of
//! its main process for attach clients. The state store has the durable half.

use std::sync::Mutex;
use std::time::Duration;

use podvisor_proto as pb;
use tokio::sync::watch;

use super::process::Process;
use super::{lock, Pod};
use crate::logs::{LogWriter, Stream};

/// Output chunks of a container's main process kept for late attach subscribers.
const OUTPUT_BACKLOG: usize = 256;

/// A container known to the running daemon: its exit watch, its log and its output for attach.
pub struct LiveContainer {
    exited: watch::Sender<bool>,
    /// The CRI log file, if kubelet asked for one.
    pub log: Option<LogWriter>,
    output: tokio::sync::broadcast::Sender<(Stream, bytes::Bytes)>,
    copiers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl LiveContainer {
    /// A container not yet exited.
    pub fn new(log: Option<LogWriter>) -> LiveContainer {
        LiveContainer {
            exited: watch::channel(false).0,
            log,
            output: tokio::sync::broadcast::channel(OUTPUT_BACKLOG).0,
            copiers: Mutex::default(),
        }
    }

    /// Marks the container exited and wakes every waiter.
    pub fn set_exited(&self) {
        self.exited.send_replace(true);
    }

    /// Waits up to `timeout` for the exit; returns whether it happened.
    pub async fn wait_exited(&self, timeout: Duration) -> bool {
        let mut rx = self.exited.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|e| *e)).await;
        waited.is_ok()
    }

    /// Waits for the exit, however long it takes.
    pub async fn exited(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// A receiver of the main process's output from now on (CRI Attach).
    pub fn subscribe_output(&self) -> tokio::sync::broadcast::Receiver<(Stream, bytes::Bytes)> {
        self.output.subscribe()
    }

    /// Copies the main process's output streams from the pod into the log file (if any) and to
    /// attached clients, until they end.
    pub fn start_log_copiers(&self, pod: &dyn Pod, container_id: &str, tty: bool) {
        let streams: &[(pb::OutputStream, Stream)] = if tty {
            &[(pb::OutputStream::Stdout, Stream::Stdout)]
        } else {
            &[
                (pb::OutputStream::Stdout, Stream::Stdout),
                (pb::OutputStream::Stderr, Stream::Stderr),
            ]
        };
        let mut copiers = lock(&self.copiers);
        for &(which, stream) in streams {
            let process = Process::main(pod, container_id);
            let log = self.log.clone();
            let output = self.output.clone();
            let id = container_id.to_string();
            copiers.push(tokio::spawn(async move {
                let copied = process
                    .read_output(which, |data| {
                        if let Some(Err(e)) = log.as_ref().map(|l| l.write(stream, &data)) {
                            tracing::warn!(container = %id, "log write: {e}");
                        }
                        let _ = output.send((stream, data));
                        std::future::ready(true)
                    })
                    .await;
                if let Err(e) = copied {
                    tracing::info!(container = %id, "output stream ended: {e}");
                }
                if let Some(Err(e)) = log.as_ref().map(|l| l.finish(stream)) {
                    tracing::warn!(container = %id, "log finish: {e}");
                }
            }));
        }
    }

    /// Waits up to `timeout` for the log copiers to drain the streams (they end at the process exit).
    pub async fn drain_logs(&self, timeout: Duration) {
        let copiers: Vec<_> = std::mem::take(&mut *lock(&self.copiers));
        for mut c in copiers {
            if tokio::time::timeout(timeout, &mut c).await.is_err() {
                c.abort();
            }
        }
    }
}

impl Drop for LiveContainer {
    fn drop(&mut self) {
        for c in lock(&self.copiers).iter() {
            c.abort();
        }
    }
}

//! One process the agent tracks (a container's init or an exec): its stdio and how it ended.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podvisor_proto as pb;
use tokio::sync::watch;

use super::cgroup::Cgroup;
use super::io::{Fd, Output, Stdio};
use crate::events::Events;
use crate::exits::Exit;

/// How a process ended, as reported to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Exit status or 128 + signal.
    pub code: i32,
    /// Killing signal or 0.
    pub signal: i32,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
    /// When it was reaped.
    pub at: SystemTime,
}

/// A tracked process.
pub struct Process {
    /// Guest PID.
    pub pid: i32,
    /// When it was created.
    pub started: SystemTime,
    stdin: Mutex<Option<Arc<Fd>>>,
    /// Stdout (the tty for a terminal process).
    pub stdout: Arc<Output>,
    /// Stderr.
    pub stderr: Arc<Output>,
    /// The pty master of a terminal process.
    pub tty: Option<Arc<Fd>>,
    ended: watch::Receiver<Option<Ended>>,
}

/// Nanoseconds since the epoch.
pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Context for the exit watcher.
#[derive(Clone)]
pub struct Watch {
    /// Container id (for events).
    pub container_id: String,
    /// The container's cgroup (OOM kill count).
    pub cgroup: Cgroup,
    /// OOM kills already seen when the process started.
    pub oom_baseline: u64,
    /// Where exit and OOM events go.
    pub events: Arc<Events>,
    /// OOM kills already reported as events for this container.
    pub oom_reported: Arc<Mutex<u64>>,
}

impl Process {
    /// Tracks `pid`, whose exit arrives on `exit`; spawns the watcher that records the end and sends the
    /// events. `on_exit` runs once the end is recorded.
    pub fn track(
        pid: i32,
        exec_id: &str,
        stdio: Stdio,
        mut exit: watch::Receiver<Option<Exit>>,
        watch: Watch,
        on_exit: impl FnOnce() + Send + 'static,
    ) -> Arc<Self> {
        let (tx, ended) = watch::channel(None);
        let process = Arc::new(Self {
            pid,
            started: SystemTime::now(),
            stdin: Mutex::new(stdio.stdin),
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            tty: stdio.tty,
            ended,
        });
        let exec_id = exec_id.to_string();
        tokio::spawn(async move {
            let exit = match exit.wait_for(Option::is_some).await {
                Ok(e) => e.expect("waited for Some"),
                // The registry went away: the agent is shutting down.
                Err(_) => return,
            };
            let kills = watch.cgroup.oom_kills();
            let oom_killed = exit.signal == nix::libc::SIGKILL && kills > watch.oom_baseline;
            report_oom(&watch, kills);
            let ended = Ended {
                code: exit.code,
                signal: exit.signal,
                oom_killed,
                at: exit.at,
            };
            let _ = tx.send(Some(ended));
            on_exit();
            watch.events.push(pb::Event {
                kind: pb::EventKind::Exit.into(),
                container_id: watch.container_id.clone(),
                exec_id,
                pid: pid as u32,
                exit_code: ended.code,
                oom_killed,
                timestamp_unix_ns: unix_ns(ended.at),
            });
        });
        process
    }

    /// The end, if it happened.
    pub fn ended(&self) -> Option<Ended> {
        *self.ended.borrow()
    }

    /// Waits for the end.
    pub async fn wait(&self) -> Option<Ended> {
        let mut rx = self.ended.clone();
        let ended = rx.wait_for(Option::is_some).await.ok()?;
        *ended
    }

    /// Waits for the end up to `deadline`.
    pub async fn wait_until(&self, deadline: Instant) -> Option<Ended> {
        tokio::time::timeout_at(deadline.into(), self.wait())
            .await
            .ok()
            .flatten()
    }

    /// The stdin writer, unless closed.
    pub fn stdin(&self) -> Option<Arc<Fd>> {
        self.stdin.lock().expect("stdin lock").clone()
    }

    /// Closes stdin (a terminal gets ^D instead: its master is also the output).
    pub async fn close_stdin(&self) {
        let stdin = self.stdin.lock().expect("stdin lock").take();
        if let (Some(fd), Some(_)) = (stdin, &self.tty) {
            let _ = fd.write_all(&[4]).await;
        }
    }

    /// The WaitProcess answer for an ended process.
    pub fn wait_response(&self, ended: Ended) -> pb::WaitProcessResponse {
        pb::WaitProcessResponse {
            exit_code: ended.code,
            signal: ended.signal,
            oom_killed: ended.oom_killed,
            started_unix_ns: unix_ns(self.started),
            exited_unix_ns: unix_ns(ended.at),
        }
    }
}

/// Sends an OOM event for every OOM kill of the container not reported yet.
pub fn report_oom(watch: &Watch, kills: u64) {
    let mut reported = watch.oom_reported.lock().expect("oom lock");
    if kills > *reported {
        *reported = kills;
        watch.events.push(pb::Event {
            kind: pb::EventKind::Oom.into(),
            container_id: watch.container_id.clone(),
            timestamp_unix_ns: unix_ns(SystemTime::now()),
            ..Default::default()
        });
    }
}

/// Watches the container's memory.events (v2, inotify) or polls its OOM kill count every 250 ms (v1, whose
/// memory.oom_control changes raise no inotify event) and reports OOM kills while its init lives.
pub async fn monitor_oom(watch: Watch, init: std::sync::Weak<Process>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let file = watch.cgroup.memory_events_path();
    /// Inotify as a raw-fd object for tokio.
    struct Watcher(Inotify);
    impl std::os::fd::AsRawFd for Watcher {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            std::os::fd::AsFd::as_fd(&self.0).as_raw_fd()
        }
    }
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .ok()
        .filter(|i| {
            file.as_deref()
                .is_some_and(|f| i.add_watch(f, AddWatchFlags::IN_MODIFY).is_ok())
        })
        // SAFETY: the Inotify is moved in and keeps its descriptor open for the AsyncFd's lifetime.
        .and_then(|i| unsafe { tokio::io::unix::AsyncFd::register(Watcher(i)) }.ok());
    loop {
        match &inotify {
            Some(fd) => {
                let Ok(Ok(mut guard)) =
                    tokio::time::timeout(Duration::from_secs(5), fd.readable()).await
                else {
                    if init.upgrade().is_none_or(|p| p.ended().is_some()) {
                        return;
                    }
                    continue;
                };
                let _ = fd.get_ref().0.read_events();
                guard.clear_ready();
            }
            None => tokio::time::sleep(Duration::from_millis(250)).await,
        }
        report_oom(&watch, watch.cgroup.oom_kills());
        if init.upgrade().is_none_or(|p| p.ended().is_some()) {
            return;
        }
    }
}

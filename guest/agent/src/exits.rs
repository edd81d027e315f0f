//! Child reaping for PID 1, with exit statuses kept for the processes the agent tracks.
//!
//! Container processes are children of the agent (the engine builds them as siblings), so every exit arrives
//! here. A process can exit before the agent learns its PID from the engine: such exits wait in a bounded
//! "unclaimed" table and are matched when the PID is claimed, provided they happened after the claim's
//! `since` instant (PIDs get reused).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How many exits of unknown PIDs are remembered.
const UNCLAIMED_LIMIT: usize = 1024;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status, or 128 + signal.
    pub code: i32,
    /// Killing signal, 0 for a normal exit.
    pub signal: i32,
    /// When it was reaped.
    pub at: SystemTime,
    /// Monotonic reap time, to match claims.
    reaped: Instant,
}

impl Exit {
    /// Decodes a wait status; `None` for stop/continue notifications.
    fn from_status(status: WaitStatus) -> Option<(Pid, Self)> {
        let (pid, code, signal) = match status {
            WaitStatus::Exited(pid, code) => (pid, code, 0),
            WaitStatus::Signaled(pid, sig, _) => (pid, 128 + sig as i32, sig as i32),
            _ => return None,
        };
        Some((
            pid,
            Self {
                code,
                signal,
                at: SystemTime::now(),
                reaped: Instant::now(),
            },
        ))
    }
}

#[derive(Default)]
struct Table {
    watched: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: VecDeque<(i32, Exit)>,
}

/// The exit registry.
#[derive(Default)]
pub struct Exits {
    table: Mutex<Table>,
}

impl Exits {
    /// Watches `pid`, which was created after `since`; the receiver gets `Some(exit)` once it is reaped.
    pub fn claim(&self, pid: i32, since: Instant) -> watch::Receiver<Option<Exit>> {
        let mut table = self.table.lock().expect("exit table lock");
        let early = table
            .unclaimed
            .iter()
            .position(|(p, exit)| *p == pid && exit.reaped >= since);
        let exit = early
            .and_then(|i| table.unclaimed.remove(i))
            .map(|(_, e)| e);
        let (tx, rx) = watch::channel(exit);
        if exit.is_none() {
            table.watched.insert(pid, tx);
        }
        rx
    }

    /// Records one reaped child.
    fn record(&self, pid: Pid, exit: Exit) {
        let mut table = self.table.lock().expect("exit table lock");
        match table.watched.remove(&pid.as_raw()) {
            Some(tx) => {
                let _ = tx.send(Some(exit));
            }
            None => {
                if table.unclaimed.len() >= UNCLAIMED_LIMIT {
                    table.unclaimed.pop_front();
                }
                table.unclaimed.push_back((pid.as_raw(), exit));
            }
        }
    }

    /// Reaps every exited child now.
    pub fn reap(&self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    if let Some((pid, exit)) = Exit::from_status(status) {
                        self.record(pid, exit);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }

    /// Reaps on every SIGCHLD, forever.
    pub async fn run(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = signal(SignalKind::child())?;
        loop {
            self.reap();
            if sigchld.recv().await.is_none() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exits_before_and_after_the_claim() {
        let exits = Exits::default();
        let since = Instant::now();
        // Exit recorded before the claim (the engine had not answered yet).
        let early = Exit::from_status(WaitStatus::Exited(Pid::from_raw(41), 3)).unwrap();
        exits.record(early.0, early.1);
        assert_eq!(exits.claim(41, since).borrow().unwrap().code, 3);
        // A stale exit of a reused PID is not matched.
        let stale = Exit::from_status(WaitStatus::Exited(Pid::from_raw(42), 1)).unwrap();
        exits.record(stale.0, stale.1);
        let mut rx = exits.claim(42, Instant::now());
        assert!(rx.borrow().is_none());
        let killed = Exit::from_status(WaitStatus::Signaled(
            Pid::from_raw(42),
            nix::sys::signal::Signal::SIGKILL,
            false,
        ))
        .unwrap();
        exits.record(killed.0, killed.1);
        rx.changed().await.unwrap();
        let exit = rx.borrow().unwrap();
        assert_eq!((exit.code, exit.signal), (137, 9));
    }

    #[test]
    fn unclaimed_table_is_bounded() {
        let exits = Exits::default();
        for pid in 1..=(UNCLAIMED_LIMIT as i32 + 10) {
            let (p, e) = Exit::from_status(WaitStatus::Exited(Pid::from_raw(pid), 0)).unwrap();
            exits.record(p, e);
        }
        assert_eq!(exits.table.lock().unwrap().unclaimed.len(), UNCLAIMED_LIMIT);
    }
}

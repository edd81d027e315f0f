//! VM threads and their kernel thread ids (for host cgroup placement by the embedder).

use std::thread::JoinHandle;

/// What a VM thread does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU (guest code, and on PVM hosts the emulation of the guest kernel).
    Vcpu,
    /// Runs a virtio device's queues (VMM overhead).
    Device,
}

/// One thread of a running VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmThread {
    /// The thread name (`vcpu0`, `virtio-blk1`, ...).
    pub name: String,
    /// The kernel thread id (`/proc/<pid>/task/<tid>`).
    pub tid: i32,
    /// What it runs.
    pub kind: ThreadKind,
}

/// Spawns a named thread and waits until it has reported its kernel thread id.
pub(crate) fn spawn<T: Send + 'static>(
    name: String,
    kind: ThreadKind,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<(JoinHandle<T>, VmThread)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let _ = tx.send(nix::unistd::gettid().as_raw());
            f()
        })?;
    let tid = rx
        .recv()
        .map_err(|_| std::io::Error::other(format!("thread {name} ended before it started")))?;
    Ok((handle, VmThread { name, tid, kind }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reported_tid_is_the_threads_own() {
        let (handle, t) = spawn("tid-test".into(), ThreadKind::Device, || {
            nix::unistd::gettid().as_raw()
        })
        .unwrap();
        assert_eq!(handle.join().unwrap(), t.tid);
        assert_ne!(t.tid, nix::unistd::gettid().as_raw());
        assert_eq!(t.name, "tid-test");
    }
}

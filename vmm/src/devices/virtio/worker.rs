//! One event-loop thread per virtio device: waits on the device's queue ioeventfds, its extra fd and a
//! stop eventfd, and runs the device's handlers under the transport lock.

use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::thread::{self, ThreadKind, VmThread};

const TOKEN_STOP: u64 = u64::MAX;
const TOKEN_EXTRA: u64 = u64::MAX - 1;

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// epoll setup failed.
    #[error("epoll: {0}")]
    Epoll(#[from] std::io::Error),
}

/// Called once if the worker dies of a panic, with the panic message.
pub type FailureHook = Box<dyn FnOnce(String) + Send>;

/// Starts the worker thread of `transport` (returned with its thread id). It returns when `stop`
/// is signalled.
pub fn spawn<D: VirtioDevice + 'static>(
    name: String,
    transport: Arc<Mutex<MmioTransport<D>>>,
    queue_evts: Vec<EventFd>,
    stop: EventFd,
    on_failure: FailureHook,
) -> Result<(JoinHandle<()>, VmThread), WorkerError> {
    let epoll = Epoll::new()?;
    for (i, evt) in queue_evts.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
    }
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, TOKEN_STOP),
    )?;
    let extra = lock(&transport).device().extra_fd();
    if let Some(fd) = extra {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, TOKEN_EXTRA),
        )?;
    }
    let spawned = thread::spawn(name, ThreadKind::Device, move || {
        let result = catch_unwind(AssertUnwindSafe(|| run(&epoll, &transport, &queue_evts)));
        drop(stop);
        if let Err(panic) = result {
            let msg = panic_message(&panic);
            tracing::error!("virtio worker panicked: {msg}");
            on_failure(msg);
        }
    })?;
    Ok(spawned)
}

/// Locks a transport, recovering from poisoning (a panicked worker already reported the failure).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The text of a caught panic.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn run<D: VirtioDevice>(
    epoll: &Epoll,
    transport: &Mutex<MmioTransport<D>>,
    queue_evts: &[EventFd],
) {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio worker epoll_wait failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return,
                // The device handles its own fds even before activation (e.g. parks connections).
                TOKEN_EXTRA => lock(transport).device_mut().process_extra(),
                i => {
                    let i = i as usize;
                    if let Some(evt) = queue_evts.get(i) {
                        let _ = evt.read();
                    }
                    let mut t = lock(transport);
                    if t.is_active() {
                        t.device_mut().process_queue(i);
                    }
                }
            }
        }
    }
}

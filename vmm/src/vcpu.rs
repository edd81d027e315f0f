//! vCPU threads: the KVM_RUN loop, port and MMIO dispatch, and the kick that stops a running vCPU.
//!
//! A vCPU is stopped by setting the VM's `stopping` flag and sending the thread `SIGRTMIN`: the
//! signal handler sets `kvm_run.immediate_exit` through a thread-local pointer, so KVM_RUN returns
//! EINTR even if the signal lands just before the thread enters the guest.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::layout::{MMIO_BASE, MMIO_WINDOW};
use crate::devices::serial::{SerialConsole, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use crate::devices::virtio::worker::{lock, panic_message};
use crate::devices::BusDevice;
use crate::exit::ExitReason;

/// i8042 command port; writing 0xfe to it pulses the CPU reset line.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_CMD: u8 = 0xfe;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own vCPU's kvm_run mapping, which
            // outlives the registration (it is cleared before the VcpuFd is dropped); writing one
            // byte is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the process-wide kick handler (once).
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// State shared by a VM's threads and its owner.
pub(crate) struct Shared {
    stopping: AtomicBool,
    exit: Mutex<Option<ExitReason>>,
    exited: Condvar,
    /// pthread ids of the vCPU threads still joinable; taken (set to empty) before they are joined.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        Shared {
            stopping: AtomicBool::new(false),
            exit: Mutex::new(None),
            exited: Condvar::new(),
            vcpu_threads: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn set_vcpu_threads(&self, threads: Vec<libc::pthread_t>) {
        *lock(&self.vcpu_threads) = threads;
    }

    pub(crate) fn take_vcpu_threads(&self) -> Vec<libc::pthread_t> {
        std::mem::take(&mut *lock(&self.vcpu_threads))
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Records the VM's exit reason (the first one wins) and stops every vCPU.
    pub(crate) fn finish(&self, reason: ExitReason) {
        {
            let mut exit = lock(&self.exit);
            if exit.is_none() {
                tracing::info!("VM exit: {reason}");
                *exit = Some(reason);
            }
            self.exited.notify_all();
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.kick_all();
    }

    /// Interrupts every vCPU thread still registered.
    pub(crate) fn kick_all(&self) {
        let threads = lock(&self.vcpu_threads);
        for tid in threads.iter() {
            // SAFETY: `tid` belongs to a thread that has not been joined yet (ids are removed from
            // this list, under this lock, before joining), so it is a valid pthread_t.
            unsafe { libc::pthread_kill(*tid, kick_signal()) };
        }
    }

    pub(crate) fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.exit).clone()
    }

    /// Waits up to `timeout` for an exit reason.
    pub(crate) fn wait_exit(&self, timeout: Duration) -> Option<ExitReason> {
        let exit = lock(&self.exit);
        let (exit, _) = self
            .exited
            .wait_timeout_while(exit, timeout, |e| e.is_none())
            .unwrap_or_else(|e| e.into_inner());
        exit.clone()
    }
}

/// Port and MMIO devices as the vCPUs see them.
pub(crate) struct IoBus {
    pub(crate) serial: Mutex<SerialConsole>,
    pub(crate) mmio: Vec<Arc<Mutex<dyn BusDevice>>>,
}

impl IoBus {
    fn mmio_device(&self, addr: u64) -> Option<(&Arc<Mutex<dyn BusDevice>>, u64)> {
        let rel = addr.checked_sub(MMIO_BASE)?;
        let dev = self.mmio.get(usize::try_from(rel / MMIO_WINDOW).ok()?)?;
        Some((dev, rel % MMIO_WINDOW))
    }

    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port.checked_sub(SERIAL_PORT_BASE) {
            Some(off) if off < SERIAL_PORT_LEN => lock(&self.serial).pio_read(off, data),
            // No device: the bus floats high.
            _ => data.fill(0xff),
        }
    }

    /// Returns true if the guest asked for a reset.
    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port.checked_sub(SERIAL_PORT_BASE) {
            Some(off) if off < SERIAL_PORT_LEN => lock(&self.serial).pio_write(off, data),
            _ => return port == I8042_COMMAND_PORT && data.first() == Some(&I8042_RESET_CMD),
        }
        false
    }
}

/// What one KVM_RUN produced, detached from the borrow of the vCPU.
enum Step {
    Continue,
    Exit(ExitReason),
    InternalError,
    /// An exit the loop does not handle; reported with `kvm_run.exit_reason`.
    Unhandled,
}

/// Runs vCPU `id` until the VM stops; never panics out of the thread.
pub(crate) fn run_vcpu(id: u8, mut vcpu: VcpuFd, shared: Arc<Shared>, io: Arc<IoBus>) {
    let result = catch_unwind(AssertUnwindSafe(|| {
        KVM_RUN.with(|run| run.set(vcpu.get_kvm_run() as *mut kvm_run));
        let reason = run_loop(&mut vcpu, &shared, &io);
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
        reason
    }));
    KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    match result {
        Ok(Some(reason)) => shared.finish(reason),
        Ok(None) => {}
        Err(panic) => shared.finish(ExitReason::VmmPanic(format!(
            "vCPU {id}: {}",
            panic_message(&panic)
        ))),
    }
    lock(&io.serial).flush();
}

/// Returns the exit reason, or `None` when the host stopped the VM.
fn run_loop(vcpu: &mut VcpuFd, shared: &Shared, io: &IoBus) -> Option<ExitReason> {
    loop {
        if shared.is_stopping() {
            return None;
        }
        let step = match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    io.pio_read(port, data);
                    Step::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    if io.pio_write(port, data) {
                        Step::Exit(ExitReason::GuestReset)
                    } else {
                        Step::Continue
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    match io.mmio_device(addr) {
                        Some((dev, off)) => lock(dev).read(off, data),
                        None => data.fill(0xff),
                    }
                    Step::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if let Some((dev, off)) = io.mmio_device(addr) {
                        lock(dev).write(off, data);
                    }
                    Step::Continue
                }
                VcpuExit::Shutdown => Step::Exit(ExitReason::GuestReset),
                VcpuExit::SystemEvent(kind, _) => Step::Exit(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::GuestShutdown,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
                    KVM_SYSTEM_EVENT_CRASH => ExitReason::GuestPanic,
                    kind => ExitReason::UnknownSystemEvent { kind },
                }),
                VcpuExit::InternalError => Step::InternalError,
                VcpuExit::FailEntry(reason, _) => Step::Exit(ExitReason::EntryFailure { reason }),
                VcpuExit::Hlt => Step::Exit(ExitReason::GuestShutdown),
                _ => Step::Unhandled,
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Exit(ExitReason::KvmError(e)),
        };
        match step {
            Step::Continue => {}
            Step::Exit(reason) => return Some(reason),
            Step::InternalError => {
                // SAFETY: reading the `internal` member of the kvm_run union is valid after a
                // KVM_EXIT_INTERNAL_ERROR exit, which is what produced this step.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                return Some(ExitReason::InternalError { suberror });
            }
            Step::Unhandled => {
                let exit_reason = vcpu.get_kvm_run().exit_reason;
                return Some(ExitReason::Unhandled { exit_reason });
            }
        }
    }
}

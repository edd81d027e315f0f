//! Why a VM stopped: what the vCPU loop reports and what [`crate::Vm`]'s owners see (its own module, so
//! the vCPU loop and the VM do not import each other for it).

use std::fmt;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The host stopped it ([`crate::Vm::stop`]).
    Stopped,
    /// The guest rebooted or triple-faulted (guests boot with `reboot=t`, so a reboot ends the VM).
    GuestReset,
    /// The guest powered off.
    GuestShutdown,
    /// The guest reported a crash (pvpanic-style system event).
    GuestPanic,
    /// KVM could not emulate a guest instruction. Under PVM a guest poweroff ends this way.
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// KVM refused to enter the guest.
    EntryFailure {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM_RUN failed.
    KvmError(kvm_ioctls::Error),
    /// A vCPU or device thread panicked (the panic message); only this VM is affected.
    VmmPanic(String),
    /// A `KVM_EXIT_SYSTEM_EVENT` of a type the VMM does not know.
    UnknownSystemEvent {
        /// `kvm_run.system_event.type`.
        kind: u32,
    },
    /// An exit the VMM does not handle.
    Unhandled {
        /// `kvm_run.exit_reason` (a `KVM_EXIT_*` value).
        exit_reason: u32,
    },
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Stopped => write!(f, "stopped by the host"),
            ExitReason::GuestReset => write!(f, "guest reset (reboot or triple fault)"),
            ExitReason::GuestShutdown => write!(f, "guest powered off"),
            ExitReason::GuestPanic => write!(f, "guest crashed"),
            ExitReason::InternalError { suberror } => {
                write!(f, "KVM internal error (suberror {suberror})")
            }
            ExitReason::EntryFailure { reason } => {
                write!(f, "KVM entry failure (reason {reason:#x})")
            }
            ExitReason::KvmError(e) => write!(f, "KVM_RUN failed: {e}"),
            ExitReason::VmmPanic(e) => write!(f, "VMM thread panicked: {e}"),
            ExitReason::UnknownSystemEvent { kind } => {
                write!(f, "unhandled VM exit: system event {kind}")
            }
            ExitReason::Unhandled { exit_reason } => {
                write!(f, "unhandled VM exit: KVM exit reason {exit_reason}")
            }
        }
    }
}

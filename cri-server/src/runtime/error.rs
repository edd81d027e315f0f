//! The one place manager errors become gRPC statuses: each [`SandboxError`] class has its code, a pod
//! failure is Unavailable when the guest agent could not be reached (kubelet retries) and Internal
//! otherwise.

use tonic::Status;

use crate::sandbox::SandboxError;

/// Maps a manager error to the gRPC status the CRI client gets (message bounded, see [`crate::text`]).
pub fn to_status(e: SandboxError) -> Status {
    crate::text::bounded_status(status_of(e))
}

fn status_of(e: SandboxError) -> Status {
    match e {
        SandboxError::InvalidArgument(m) => Status::invalid_argument(m),
        SandboxError::NotFound(m) => Status::not_found(m),
        SandboxError::AlreadyExists(m) => Status::already_exists(m),
        SandboxError::FailedPrecondition(m) => Status::failed_precondition(m),
        SandboxError::Unimplemented(m) => Status::unimplemented(m),
        SandboxError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        SandboxError::ResourceExhausted(m) => Status::resource_exhausted(m),
        SandboxError::Image(e) => crate::images::status_of(&e),
        SandboxError::Pod(e) => match e.agent_status() {
            // An unreachable agent is a transient condition kubelet retries.
            Some(status) => {
                let code = match status.code() {
                    tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
                        tonic::Code::Unavailable
                    }
                    _ => tonic::Code::Internal,
                };
                Status::new(code, e.to_string())
            }
            None => Status::internal(e.to_string()),
        },
        e @ (SandboxError::State(_)
        | SandboxError::Io { .. }
        | SandboxError::Spec(_)
        | SandboxError::Log { .. }) => Status::internal(e.to_string()),
    }
}

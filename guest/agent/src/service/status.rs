//! The agent's errors as gRPC statuses: the code each error class gets, and a bounded message.

use tonic::Status;

use crate::container::ContainerError;
use crate::files::FileError;
use crate::network::NetworkError;
use crate::storage::StorageError;

/// Most bytes of an error message sent to the host.
pub const MAX_STATUS_MESSAGE: usize = 4096;

/// An error message fit for a gRPC status: control characters dropped (libcontainer pads the errors of
/// exec'd processes with NUL bytes) except newlines and tabs, surrounding whitespace trimmed, at most
/// [`MAX_STATUS_MESSAGE`] bytes.
pub fn status_message(e: &dyn std::fmt::Display) -> String {
    let raw = e.to_string();
    let mut msg: String = raw
        .chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect();
    msg.truncate(msg.trim_end().len());
    let msg = msg.trim_start();
    if msg.len() <= MAX_STATUS_MESSAGE {
        return msg.to_string();
    }
    let mut end = MAX_STATUS_MESSAGE - '…'.len_utf8();
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &msg[..end])
}

impl From<NetworkError> for Status {
    fn from(e: NetworkError) -> Self {
        let msg = status_message(&e);
        match e {
            NetworkError::InvalidArgument(_) => Status::invalid_argument(msg),
            NetworkError::NotFound(_) => Status::not_found(msg),
            NetworkError::Netlink(_) => Status::internal(msg),
        }
    }
}

impl From<ContainerError> for Status {
    fn from(e: ContainerError) -> Self {
        let msg = status_message(&e);
        match e {
            ContainerError::InvalidArgument(_) => Status::invalid_argument(msg),
            ContainerError::NotFound(_) => Status::not_found(msg),
            ContainerError::AlreadyExists(_) => Status::already_exists(msg),
            ContainerError::FailedPrecondition(_) => Status::failed_precondition(msg),
            // libcontainer refusing a spec (bad entry point, missing cwd...) is the caller's problem; its
            // message says what.
            ContainerError::Engine(crate::engine::EngineError::Failed(_)) => {
                Status::failed_precondition(msg)
            }
            ContainerError::Engine(_)
            | ContainerError::Io(_)
            | ContainerError::Sys(_)
            | ContainerError::Encode(_)
            | ContainerError::Internal(_) => Status::internal(msg),
        }
    }
}

impl From<FileError> for Status {
    fn from(e: FileError) -> Self {
        let msg = status_message(&e);
        match e {
            FileError::InvalidArgument { .. } => Status::invalid_argument(msg),
            FileError::NotFound(_) => Status::not_found(msg),
            FileError::PermissionDenied(_) => Status::permission_denied(msg),
            FileError::NotRegular(_) => Status::failed_precondition(msg),
            FileError::Io { .. } => Status::internal(msg),
        }
    }
}

impl From<StorageError> for Status {
    fn from(e: StorageError) -> Self {
        let msg = status_message(&e);
        match e {
            StorageError::InvalidArgument { .. } => Status::invalid_argument(msg),
            StorageError::AlreadyExists(_) => Status::already_exists(msg),
            StorageError::SlotNotFound(_) => Status::not_found(msg),
            StorageError::Timeout { .. } => Status::deadline_exceeded(msg),
            StorageError::FailedPrecondition(_) => Status::failed_precondition(msg),
            // The kernel lacks the filesystem, or the image is not one of that type.
            StorageError::Mount {
                errno: nix::errno::Errno::ENODEV,
                ..
            }
            | StorageError::Mount {
                errno: nix::errno::Errno::EINVAL,
                ..
            } => Status::failed_precondition(msg),
            StorageError::Mount { .. } | StorageError::Unmount { .. } | StorageError::Io { .. } => {
                Status::internal(msg)
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::cgroups::CgroupError;
    use crate::network::NetworkError;
    use crate::pod::PodError;

    fn code_of(e: PodError) -> (Code, String) {
        let status = to_status(e.into());
        (status.code(), status.message().to_string())
    }

    #[test]
    fn pod_errors_get_the_code_of_their_cause() {
        let agent = |code| PodError::Agent {
            call: "StartContainer",
            status: tonic::Status::new(code, "no"),
        };
        assert_eq!(code_of(agent(Code::Unavailable)).0, Code::Unavailable);
        assert_eq!(code_of(agent(Code::Internal)).0, Code::Internal);
        let (code, msg) = code_of(agent(Code::Unknown));
        assert_eq!(code, Code::Unavailable);
        assert!(msg.starts_with("guest agent StartContainer: "), "{msg}");
        let bad = PodError::Network(NetworkError::InvalidArgument("port_mappings[0]: x".into()));
        assert_eq!(code_of(bad).0, Code::InvalidArgument);
        let unready = PodError::Network(NetworkError::NotConfigured("no conflist".into()));
        assert_eq!(code_of(unready).0, Code::FailedPrecondition);
        let parent = PodError::Cgroup(CgroupError::InvalidParent {
            parent: "x/../y".into(),
            why: "not a cgroup path",
        });
        let (code, msg) = code_of(parent);
        assert_eq!(code, Code::InvalidArgument);
        assert!(msg.starts_with("linux.cgroup_parent"), "{msg}");
        let missing = PodError::MountSource {
            field: "config.mounts[1]".into(),
            path: "/nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let (code, msg) = code_of(missing);
        assert_eq!(code, Code::FailedPrecondition);
        assert!(
            msg.starts_with("config.mounts[1].host_path: /nope: "),
            "{msg}"
        );
        let big = PodError::MountTooBig {
            field: "config.mounts[0]".into(),
            limit: 1,
        };
        assert_eq!(code_of(big).0, Code::ResourceExhausted);
        assert_eq!(code_of(PodError::Stopped).0, Code::FailedPrecondition);
        let stuck = PodError::KillTimeout {
            container: "c1".into(),
            waited: std::time::Duration::from_secs(60),
        };
        assert_eq!(code_of(stuck).0, Code::Internal);
    }
}

//! The runtime handlers the daemon serves: `""` and `podvisor` (a VM unless the pod needs the node),
//! and `native` where native pods are allowed.

use k8s_cri::v1::{RuntimeHandler, RuntimeHandlerFeatures};
use tonic::Status;

use super::{NATIVE_HANDLER, RUNTIME_NAME};

/// `Status.runtime_handlers`. A pod VM has no user namespaces and its mounts are copies (no
/// submounts to make read-only recursively); native pods offer neither yet.
pub fn list(native: bool) -> Vec<RuntimeHandler> {
    let handler = |name: &str| RuntimeHandler {
        name: name.into(),
        features: Some(RuntimeHandlerFeatures {
            recursive_read_only_mounts: false,
            user_namespaces: false,
        }),
    };
    let mut handlers = vec![handler(""), handler(RUNTIME_NAME)];
    if native {
        handlers.push(handler(NATIVE_HANDLER));
    }
    handlers
}

/// Refuses a RunPodSandbox handler the daemon does not serve: NotFound naming `runtime_handler`.
pub fn check(name: &str, native: bool) -> Result<(), Status> {
    if list(native).iter().any(|h| h.name == name) {
        return Ok(());
    }
    let served = if native {
        format!("\"\", \"{RUNTIME_NAME}\" and \"{NATIVE_HANDLER}\"")
    } else {
        format!("\"\" and \"{RUNTIME_NAME}\"; native pods are refused on this node")
    };
    Err(Status::not_found(format!(
        "runtime_handler: {} is not configured (podvisor serves {served})",
        crate::text::echo(name)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_is_served_only_where_allowed() {
        let names = |native| list(native).into_iter().map(|h| h.name).collect::<Vec<_>>();
        assert_eq!(names(true), ["", "podvisor", "native"]);
        assert_eq!(names(false), ["", "podvisor"]);
        for h in ["", "podvisor", "native"] {
            check(h, true).unwrap();
        }
        let e = check("native", false).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(
            e.message().contains("refused on this node"),
            "{}",
            e.message()
        );
        let e = check("runc", true).unwrap_err();
        assert!(
            e.message().starts_with("runtime_handler: "),
            "{}",
            e.message()
        );
    }
}

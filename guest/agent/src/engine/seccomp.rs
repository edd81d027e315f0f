//! The container's seccomp profile for exec'd processes, installed in runc's order.
//!
//! libcontainer 0.7's tenant builder drops `linux.seccomp` from the spec it execs with, so the engine installs
//! the profile from the executor, which runs after the tenant init switched user and dropped capabilities.
//! Loading a filter needs `no_new_privs` or CAP_SYS_ADMIN (the profile is loaded without setting
//! `no_new_privs` itself, as the OCI spec wants):
//! - with `no_new_privileges`, the init set `no_new_privs`: the filter is loaded last, right before exec
//!   (runc: after `finalizeNamespace`);
//! - without it, the init is told to keep CAP_SYS_ADMIN effective and permitted (never in the bounding set),
//!   the filter is loaded with it, and the process's own effective and permitted sets are restored (capset
//!   only) before exec. runc loads the filter before dropping capabilities in that case too, so the same
//!   profiles work (they must allow `capset`).

use caps::{CapSet, CapsHashSet};
use libcontainer::capabilities::CapabilityExt;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities, LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

/// Runs an exec'd process under its container's seccomp profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompExec {
    profile: LinuxSeccomp,
    /// The process's own effective and permitted capabilities, restored after loading the filter with a
    /// borrowed CAP_SYS_ADMIN (None: nothing borrowed).
    restore: Option<(Capabilities, Capabilities)>,
}

/// Prepares `process` (the exec'd process as the tenant init will set it up) for loading `profile` from
/// the executor, and returns that executor.
pub fn prepare(process: &mut Process, profile: LinuxSeccomp) -> SeccompExec {
    let mut restore = None;
    if process.no_new_privileges() != Some(true) {
        if let Some(caps) = process.capabilities().clone() {
            let admin = Capability::SysAdmin;
            let has = |set: &Option<Capabilities>| set.as_ref().is_some_and(|s| s.contains(&admin));
            if !(has(caps.effective()) && has(caps.permitted())) {
                let own = |set: &Option<Capabilities>| set.clone().unwrap_or_default();
                restore = Some((own(caps.effective()), own(caps.permitted())));
                process.set_capabilities(Some(with_admin(caps)));
            }
        }
        // No capabilities in the spec: the init drops none, CAP_SYS_ADMIN stays.
    }
    SeccompExec { profile, restore }
}

fn with_admin(mut caps: LinuxCapabilities) -> LinuxCapabilities {
    let add = |set: &Option<Capabilities>| {
        let mut set = set.clone().unwrap_or_default();
        set.insert(Capability::SysAdmin);
        Some(set)
    };
    let (effective, permitted) = (add(caps.effective()), add(caps.permitted()));
    caps.set_effective(effective).set_permitted(permitted);
    caps
}

fn to_set(set: &Capabilities) -> CapsHashSet {
    set.iter().map(|c| c.to_cap()).collect()
}

impl Executor for SeccompExec {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            ExecutorError::Other(format!("{what} the container's seccomp profile: {e}"))
        };
        match libcontainer::seccomp::initialize_seccomp(&self.profile) {
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(ExecutorError::Other(
                    "seccomp notify actions are not supported for exec".into(),
                ))
            }
            Err(e) => return Err(failed("installing", &e)),
        }
        if let Some((effective, permitted)) = &self.restore {
            caps::set(None, CapSet::Effective, &to_set(effective))
                .and_then(|()| caps::set(None, CapSet::Permitted, &to_set(permitted)))
                .map_err(|e| failed("dropping CAP_SYS_ADMIN after installing", &e))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored(exec: &SeccompExec) -> Option<(Capabilities, Capabilities)> {
        exec.restore.clone()
    }

    fn process(json: serde_json::Value) -> Process {
        serde_json::from_value(json).unwrap()
    }

    fn profile() -> LinuxSeccomp {
        serde_json::from_value(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW"})).unwrap()
    }

    fn base(nnp: Option<bool>) -> Process {
        let caps = serde_json::json!(["CAP_CHOWN", "CAP_KILL"]);
        let mut p = process(serde_json::json!({
            "args": ["id"], "cwd": "/", "user": {"uid": 65534, "gid": 65534},
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
        }));
        p.set_no_new_privileges(nnp);
        p
    }

    #[test]
    fn with_no_new_privileges_nothing_is_borrowed() {
        let mut p = base(Some(true));
        let before = p.clone();
        let exec = prepare(&mut p, profile());
        assert_eq!(p, before);
        assert_eq!(restored(&exec), None);
    }

    #[test]
    fn without_no_new_privileges_cap_sys_admin_is_borrowed_for_the_load() {
        for nnp in [None, Some(false)] {
            let mut p = base(nnp);
            let exec = prepare(&mut p, profile());
            let caps = p.capabilities().clone().unwrap();
            let admin = Capability::SysAdmin;
            assert!(caps.effective().as_ref().unwrap().contains(&admin));
            assert!(caps.permitted().as_ref().unwrap().contains(&admin));
            assert!(
                !caps.bounding().as_ref().unwrap().contains(&admin),
                "never in the bounding set"
            );
            let own: Capabilities = [Capability::Chown, Capability::Kill].into();
            assert_eq!(restored(&exec), Some((own.clone(), own)));
        }
    }

    #[test]
    fn nothing_is_borrowed_when_the_process_keeps_cap_sys_admin() {
        let mut p = base(None);
        let all = serde_json::json!(["CAP_SYS_ADMIN"]);
        p.set_capabilities(Some(
            serde_json::from_value(
                serde_json::json!({"bounding": all, "effective": all, "permitted": all}),
            )
            .unwrap(),
        ));
        let before = p.clone();
        assert_eq!(restored(&prepare(&mut p, profile())), None);
        assert_eq!(p, before);
        // No capabilities at all: libcontainer drops none.
        p.set_capabilities(None);
        assert_eq!(restored(&prepare(&mut p, profile())), None);
        assert_eq!(p.capabilities(), &None);
    }
}

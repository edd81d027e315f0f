//! Security settings of a container spec: capabilities, seccomp, AppArmor and SELinux.

use std::str::FromStr;

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{Capability as CriCapability, LinuxContainerSecurityContext, SecurityProfile};
use oci_spec::runtime::{
    Arch, Capabilities, Capability, LinuxCapabilities, LinuxSeccomp, LinuxSeccompAction,
    LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompOperator, LinuxSyscall,
};

use super::{invalid, unimplemented, SpecError, SC};
use crate::pod::PodKind;

use Capability::*;

/// Every capability the OCI runtime spec knows; what "ALL" and privileged mean.
pub(super) const ALL_CAPS: [Capability; 41] = [
    AuditControl,
    AuditRead,
    AuditWrite,
    BlockSuspend,
    Bpf,
    CheckpointRestore,
    Chown,
    DacOverride,
    DacReadSearch,
    Fowner,
    Fsetid,
    IpcLock,
    IpcOwner,
    Kill,
    Lease,
    LinuxImmutable,
    MacAdmin,
    MacOverride,
    Mknod,
    NetAdmin,
    NetBindService,
    NetBroadcast,
    NetRaw,
    Perfmon,
    Setgid,
    Setfcap,
    Setpcap,
    Setuid,
    SysAdmin,
    SysBoot,
    SysChroot,
    SysModule,
    SysNice,
    SysPacct,
    SysPtrace,
    SysRawio,
    SysResource,
    SysTime,
    SysTtyConfig,
    Syslog,
    WakeAlarm,
];

/// containerd's (and Docker's) default capability set of an unprivileged container.
pub(super) const DEFAULT_CAPS: [Capability; 14] = [
    Chown,
    DacOverride,
    Fsetid,
    Fowner,
    Mknod,
    NetRaw,
    Setgid,
    Setuid,
    Setfcap,
    Setpcap,
    NetBindService,
    SysChroot,
    Kill,
    AuditWrite,
];

/// Parses "CAP_SYS_ADMIN", "SYS_ADMIN" or "sys_admin".
fn parse_cap(field: &str, name: &str) -> Result<Capability, SpecError> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    Capability::from_str(bare).map_err(|_| invalid(field, format!("unknown capability {name:?}")))
}

fn is_all(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case("ALL")
}

/// Every capability a privileged container gets: all of them in a pod VM; on the node, those this
/// daemon may give (its bounding set), as containerd's `WithAllCurrentCapabilities`.
pub(super) fn privileged_set(kind: PodKind) -> Vec<Capability> {
    match kind {
        PodKind::Vm => ALL_CAPS.to_vec(),
        PodKind::Native => {
            let node = caps::read(None, caps::CapSet::Bounding).unwrap_or_default();
            ALL_CAPS
                .iter()
                .copied()
                .filter(|c| {
                    let name = format!("CAP_{c}").to_ascii_uppercase();
                    caps::Capability::from_str(&name).is_ok_and(|n| node.contains(&n))
                })
                .collect()
        }
    }
}

/// The process capabilities (containerd order: ALL add, ALL drop, single adds, single drops).
/// Bounding, effective and permitted are the same set; inheritable and ambient hold only the
/// ambient capabilities asked for. Privileged containers get `privileged_set`.
pub(super) fn capabilities(
    privileged: bool,
    caps: Option<&CriCapability>,
    privileged_set: &[Capability],
) -> Result<LinuxCapabilities, SpecError> {
    let add_field = format!("{SC}.capabilities.add_capabilities");
    let drop_field = format!("{SC}.capabilities.drop_capabilities");
    let ambient_field = format!("{SC}.capabilities.add_ambient_capabilities");
    let mut set: Vec<Capability> = DEFAULT_CAPS.to_vec();
    let empty = CriCapability::default();
    let caps = caps.unwrap_or(&empty);
    if caps.add_capabilities.iter().any(|c| is_all(c)) {
        set = ALL_CAPS.to_vec();
    }
    if caps.drop_capabilities.iter().any(|c| is_all(c)) {
        set.clear();
    }
    for name in caps.add_capabilities.iter().filter(|c| !is_all(c)) {
        let cap = parse_cap(&add_field, name)?;
        if !set.contains(&cap) {
            set.push(cap);
        }
    }
    for name in caps.drop_capabilities.iter().filter(|c| !is_all(c)) {
        let cap = parse_cap(&drop_field, name)?;
        set.retain(|c| *c != cap);
    }
    if privileged {
        set = privileged_set.to_vec();
    }
    let mut ambient = Capabilities::new();
    for name in &caps.add_ambient_capabilities {
        let cap = parse_cap(&ambient_field, name)?;
        if !set.contains(&cap) {
            return Err(invalid(
                &ambient_field,
                format!("{name:?} is not in the container's capability set"),
            ));
        }
        ambient.insert(cap);
    }
    let set: Capabilities = set.into_iter().collect();
    let mut out = LinuxCapabilities::default();
    out.set_bounding(Some(set.clone()))
        .set_effective(Some(set.clone()))
        .set_permitted(Some(set))
        .set_inheritable(Some(ambient.clone()))
        .set_ambient(Some(ambient));
    Ok(out)
}

/// Which seccomp profile a container asked for.
enum Seccomp {
    Unconfined,
    RuntimeDefault,
    Localhost(String),
}

/// The seccomp filter of the container: none when privileged or unconfined (the CRI default
/// when nothing is set, as in containerd), the runtime default deny-list, or a host file.
pub(super) fn seccomp(
    sc: &LinuxContainerSecurityContext,
    caps: &LinuxCapabilities,
) -> Result<Option<LinuxSeccomp>, SpecError> {
    if sc.privileged {
        return Ok(None);
    }
    let (choice, field) = match &sc.seccomp {
        Some(p) => (
            profile(p, &format!("{SC}.seccomp"))?,
            format!("{SC}.seccomp.localhost_ref"),
        ),
        None => {
            let field = format!("{SC}.seccomp_profile_path");
            // Deprecated, but kubelets before 1.22 still send it (containerd honours it too).
            #[allow(deprecated)]
            let path = sc.seccomp_profile_path.as_str();
            let choice = match path {
                "" | "unconfined" => Seccomp::Unconfined,
                "runtime/default" | "docker/default" => Seccomp::RuntimeDefault,
                _ => match path.strip_prefix("localhost/") {
                    Some(p) => Seccomp::Localhost(p.to_string()),
                    None => return Err(invalid(&field, format!("unknown profile {path:?}"))),
                },
            };
            (choice, field)
        }
    };
    match choice {
        Seccomp::Unconfined => Ok(None),
        Seccomp::RuntimeDefault => {
            let effective = caps.effective().clone().unwrap_or_default();
            Ok(Some(default_profile(&effective)))
        }
        Seccomp::Localhost(path) => {
            if !path.starts_with('/') {
                return Err(invalid(&field, format!("{path:?} is not an absolute path")));
            }
            let text = std::fs::read_to_string(&path)
                .map_err(|e| invalid(&field, format!("reading {path}: {e}")))?;
            let profile = serde_json::from_str::<LinuxSeccomp>(&text).map_err(|e| {
                invalid(&field, format!("{path} is not an OCI seccomp profile: {e}"))
            })?;
            Ok(Some(profile))
        }
    }
}

fn profile(p: &SecurityProfile, field: &str) -> Result<Seccomp, SpecError> {
    match ProfileType::try_from(p.profile_type) {
        Ok(ProfileType::RuntimeDefault) => Ok(Seccomp::RuntimeDefault),
        Ok(ProfileType::Unconfined) => Ok(Seccomp::Unconfined),
        Ok(ProfileType::Localhost) => Ok(Seccomp::Localhost(p.localhost_ref.clone())),
        Err(_) => Err(invalid(
            format!("{field}.profile_type"),
            format!("unknown profile type {}", p.profile_type),
        )),
    }
}

/// The guest kernel has no LSM: accept "no profile" requests, refuse named profiles/labels.
pub(super) fn check_lsm(sc: &LinuxContainerSecurityContext) -> Result<(), SpecError> {
    match &sc.apparmor {
        Some(p) => {
            let field = format!("{SC}.apparmor");
            if let Seccomp::Localhost(name) = profile(p, &field)? {
                return Err(unimplemented(
                    &field,
                    format!("AppArmor profile {name:?}: the pod VM has no AppArmor"),
                ));
            }
        }
        None => {
            #[allow(deprecated)] // older kubelets send only this
            let name = sc.apparmor_profile.as_str();
            if !matches!(name, "" | "runtime/default" | "unconfined") {
                return Err(unimplemented(
                    format!("{SC}.apparmor_profile"),
                    format!("AppArmor profile {name:?}: the pod VM has no AppArmor"),
                ));
            }
        }
    }
    if let Some(se) = &sc.selinux_options {
        if !(se.user.is_empty()
            && se.role.is_empty()
            && se.r#type.is_empty()
            && se.level.is_empty())
        {
            return Err(unimplemented(
                format!("{SC}.selinux_options"),
                "the pod VM has no SELinux",
            ));
        }
    }
    Ok(())
}

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;
/// AF_VSOCK: vsock is not network-namespaced, it reaches the host from every container.
const AF_VSOCK: u64 = 40;
/// CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET.
const CLONE_NS_FLAGS: [u64; 7] = [
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

/// Syscalls Docker's default profile refuses, with the capabilities that let them through.
const DENIED: &[(&[&str], &[Capability])] = &[
    (&["acct"], &[SysPacct]),
    (&["add_key", "keyctl", "request_key"], &[]),
    (&["bpf"], &[SysAdmin, Bpf]),
    (
        &["clock_adjtime", "clock_settime", "settimeofday", "stime"],
        &[SysTime],
    ),
    (
        &[
            "create_module",
            "get_kernel_syms",
            "kexec_file_load",
            "kexec_load",
            "nfsservctl",
            "query_module",
            "swapoff",
            "swapon",
            "_sysctl",
            "sysfs",
            "uselib",
            "ustat",
            "vm86",
            "vm86old",
        ],
        &[],
    ),
    (
        &["delete_module", "finit_module", "init_module"],
        &[SysModule],
    ),
    (
        &["get_mempolicy", "mbind", "move_pages", "set_mempolicy"],
        &[SysNice],
    ),
    (&["ioperm", "iopl"], &[SysRawio]),
    (
        &["kcmp", "pidfd_getfd", "process_madvise", "userfaultfd"],
        &[SysPtrace],
    ),
    (
        &[
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "pivot_root",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "umount",
            "umount2",
            "unshare",
        ],
        &[SysAdmin],
    ),
    (&["open_by_handle_at"], &[DacReadSearch]),
    (&["perf_event_open"], &[SysAdmin, Perfmon]),
    (&["reboot"], &[SysBoot]),
    (&["syslog"], &[SysAdmin, Syslog]),
    (&["vhangup"], &[SysTtyConfig]),
];

fn rule(names: Vec<String>, errno: u32, args: Option<Vec<LinuxSeccompArg>>) -> LinuxSyscall {
    let mut s = LinuxSyscall::default();
    s.set_names(names)
        .set_action(LinuxSeccompAction::ScmpActErrno)
        .set_errno_ret(Some(errno))
        .set_args(args);
    s
}

fn arg(value: u64, value_two: Option<u64>, op: LinuxSeccompOperator) -> LinuxSeccompArg {
    let mut b = LinuxSeccompArgBuilder::default()
        .index(0usize)
        .value(value)
        .op(op);
    if let Some(v) = value_two {
        b = b.value_two(v);
    }
    b.build().expect("every field has a default")
}

/// The RuntimeDefault profile: allow everything except what Docker's default profile refuses
/// an unprivileged container, relaxed for the capabilities the container holds (as Docker).
pub(super) fn default_profile(caps: &Capabilities) -> LinuxSeccomp {
    let mut syscalls = Vec::new();
    let denied: Vec<String> = DENIED
        .iter()
        .filter(|(_, lifted_by)| !lifted_by.iter().any(|c| caps.contains(c)))
        .flat_map(|(names, _)| names.iter().map(|n| n.to_string()))
        .collect();
    syscalls.push(rule(denied, EPERM, None));
    if !caps.contains(&SysAdmin) {
        // One rule per flag with mask == datum: youki and runc read the MASKED_EQ operands in
        // opposite order, and `(flags & F) == F` means the same under both.
        for flag in CLONE_NS_FLAGS {
            let cond = arg(flag, Some(flag), LinuxSeccompOperator::ScmpCmpMaskedEq);
            syscalls.push(rule(vec!["clone".into()], EPERM, Some(vec![cond])));
        }
        // clone3 passes its flags in memory seccomp cannot read: ENOSYS makes libc fall back
        // to clone, as in Docker.
        syscalls.push(rule(vec!["clone3".into()], ENOSYS, None));
    }
    let vsock = arg(AF_VSOCK, None, LinuxSeccompOperator::ScmpCmpEq);
    syscalls.push(rule(vec!["socket".into()], EPERM, Some(vec![vsock])));
    let mut profile = LinuxSeccomp::default();
    profile
        .set_default_action(LinuxSeccompAction::ScmpActAllow)
        .set_architectures(Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ]))
        .set_syscalls(Some(syscalls));
    profile
}

//! Capabilities, privileged mode, no_new_privs, read-only rootfs, masked paths and seccomp.

use super::*;

fn caps_of(c: &ContainerConfig) -> Vec<Capability> {
    let mut v: Vec<_> = process(c)
        .capabilities()
        .clone()
        .unwrap()
        .effective()
        .clone()
        .unwrap()
        .into_iter()
        .collect();
    v.sort_by_key(|c| c.to_string());
    v
}

fn sorted(caps: &[Capability]) -> Vec<Capability> {
    let mut v = caps.to_vec();
    v.sort_by_key(|c| c.to_string());
    v
}

#[test]
fn capabilities_default_add_drop_all() {
    assert_eq!(
        caps_of(&ContainerConfig::default()),
        sorted(&security::DEFAULT_CAPS)
    );
    let capab = |add: &[&str], drop: &[&str]| {
        with_sc(LinuxContainerSecurityContext {
            capabilities: Some(CriCapability {
                add_capabilities: strings(add),
                drop_capabilities: strings(drop),
                add_ambient_capabilities: vec![],
            }),
            ..Default::default()
        })
    };
    let caps = caps_of(&capab(
        &["NET_ADMIN", "CAP_SYS_TIME"],
        &["cap_chown", "KILL"],
    ));
    assert!(caps.contains(&Capability::NetAdmin) && caps.contains(&Capability::SysTime));
    assert!(!caps.contains(&Capability::Chown) && !caps.contains(&Capability::Kill));
    assert_eq!(caps_of(&capab(&["ALL"], &[])), sorted(&security::ALL_CAPS));
    assert_eq!(
        caps_of(&capab(&["NET_RAW"], &["ALL"])),
        vec![Capability::NetRaw]
    );
    invalid_field(
        &capab(&["CAP_FLY"], &[]),
        "config.linux.security_context.capabilities.add_capabilities",
    );
    invalid_field(
        &capab(&[], &["NOPE"]),
        "config.linux.security_context.capabilities.drop_capabilities",
    );
}

#[test]
fn every_capability_name_parses_and_serializes() {
    for cap in security::ALL_CAPS {
        let json = serde_json::to_value(cap).unwrap();
        let name = json.as_str().unwrap();
        assert!(name.starts_with("CAP_"), "{name}");
        let c = with_sc(LinuxContainerSecurityContext {
            capabilities: Some(CriCapability {
                add_capabilities: vec![name.to_string()],
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(caps_of(&c).contains(&cap), "{name}");
    }
}

#[test]
fn ambient_capabilities() {
    let c = with_sc(LinuxContainerSecurityContext {
        capabilities: Some(CriCapability {
            add_ambient_capabilities: strings(&["NET_BIND_SERVICE"]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let caps = process(&c).capabilities().clone().unwrap();
    assert!(caps
        .ambient()
        .clone()
        .unwrap()
        .contains(&Capability::NetBindService));
    assert!(caps
        .inheritable()
        .clone()
        .unwrap()
        .contains(&Capability::NetBindService));
    let c = with_sc(LinuxContainerSecurityContext {
        capabilities: Some(CriCapability {
            add_ambient_capabilities: strings(&["SYS_ADMIN"]),
            ..Default::default()
        }),
        ..Default::default()
    });
    invalid_field(
        &c,
        "config.linux.security_context.capabilities.add_ambient_capabilities",
    );
}

#[test]
fn privileged_drops_confinement() {
    let c = with_sc(LinuxContainerSecurityContext {
        privileged: true,
        seccomp: Some(SecurityProfile::default()),
        ..Default::default()
    });
    let (spec, _) = build(&c);
    assert_eq!(caps_of(&c), sorted(&security::ALL_CAPS));
    let l = spec.linux().clone().unwrap();
    assert!(l.seccomp().is_none() && l.masked_paths().is_none() && l.readonly_paths().is_none());
    let sys = spec.mounts().clone().unwrap();
    let sys = sys
        .iter()
        .find(|m| m.destination() == Path::new("/sys"))
        .unwrap();
    assert!(sys.options().clone().unwrap().contains(&"rw".to_string()));
    let devices = l.resources().clone().unwrap().devices().clone().unwrap();
    assert!(devices[0].allow());
}

#[test]
fn unprivileged_defaults() {
    let (spec, _) = build(&ContainerConfig::default());
    let l = spec.linux().clone().unwrap();
    assert!(
        l.seccomp().is_none(),
        "no seccomp unless asked, as containerd"
    );
    assert_eq!(l.masked_paths().clone().unwrap(), strings(DEFAULT_MASKED));
    assert_eq!(
        l.readonly_paths().clone().unwrap(),
        strings(DEFAULT_READONLY)
    );
    assert!(!l.resources().clone().unwrap().devices().clone().unwrap()[0].allow());
    let p = spec.process().clone().unwrap();
    assert_eq!(p.no_new_privileges(), None);
    assert_eq!(spec.root().clone().unwrap().readonly(), Some(false));
    assert_eq!(spec.root().clone().unwrap().path(), Path::new("rootfs"));
    // The pod's hostname is the VM's (set by the agent), not a per-container UTS namespace.
    assert_eq!(spec.hostname().as_deref(), None);
}

#[test]
fn no_new_privs_readonly_rootfs_and_paths() {
    let c = with_sc(LinuxContainerSecurityContext {
        no_new_privs: true,
        readonly_rootfs: true,
        masked_paths: strings(&["/proc/x"]),
        readonly_paths: strings(&["/proc/y"]),
        ..Default::default()
    });
    let (spec, _) = build(&c);
    assert_eq!(
        spec.process().clone().unwrap().no_new_privileges(),
        Some(true)
    );
    assert_eq!(spec.root().clone().unwrap().readonly(), Some(true));
    let l = spec.linux().clone().unwrap();
    assert_eq!(l.masked_paths().clone().unwrap(), strings(&["/proc/x"]));
    assert_eq!(l.readonly_paths().clone().unwrap(), strings(&["/proc/y"]));
}

fn seccomp_of(profile: Option<SecurityProfile>, add: &[&str]) -> Option<LinuxSeccomp> {
    let c = with_sc(LinuxContainerSecurityContext {
        seccomp: profile,
        capabilities: Some(CriCapability {
            add_capabilities: strings(add),
            ..Default::default()
        }),
        ..Default::default()
    });
    linux(&c).seccomp().clone()
}

fn errno_names(s: &LinuxSeccomp) -> Vec<String> {
    s.syscalls()
        .clone()
        .unwrap()
        .iter()
        .filter(|r| r.action() == LinuxSeccompAction::ScmpActErrno && r.args().is_none())
        .flat_map(|r| r.names().clone())
        .collect()
}

#[test]
fn seccomp_runtime_default_is_a_deny_list() {
    let s = seccomp_of(Some(SecurityProfile::default()), &[]).unwrap();
    assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActAllow);
    let denied = errno_names(&s);
    for name in [
        "mount",
        "bpf",
        "keyctl",
        "kexec_load",
        "unshare",
        "setns",
        "clone3",
        "reboot",
    ] {
        assert!(denied.contains(&name.to_string()), "{name}");
    }
    let rules = s.syscalls().clone().unwrap();
    let clone3 = rules.iter().find(|r| r.names() == &["clone3"]).unwrap();
    assert_eq!(clone3.errno_ret(), Some(ENOSYS_FOR_TEST));
    assert_eq!(rules.iter().filter(|r| r.names() == &["clone"]).count(), 7);
    assert!(rules.iter().any(|r| r.names() == &["socket"]));
    // Round trip through JSON as an OCI Spec.
    let json =
        serde_json::to_string(&json!({"ociVersion": "1.1.0", "linux": {"seccomp": s}})).unwrap();
    let spec: Spec = serde_json::from_str(&json).unwrap();
    assert_eq!(spec.linux().clone().unwrap().seccomp().clone().unwrap(), s);
}

const ENOSYS_FOR_TEST: u32 = 38;

#[test]
fn seccomp_default_relaxes_for_added_capabilities() {
    let s = seccomp_of(Some(SecurityProfile::default()), &["SYS_ADMIN", "SYS_TIME"]).unwrap();
    let denied = errno_names(&s);
    for name in ["mount", "unshare", "bpf", "clone3", "settimeofday"] {
        assert!(!denied.contains(&name.to_string()), "{name}");
    }
    assert!(denied.contains(&"kexec_load".to_string()));
    let rules = s.syscalls().clone().unwrap();
    assert!(!rules.iter().any(|r| r.names() == &["clone"]));
}

#[test]
fn seccomp_unconfined_and_deprecated_path() {
    let unconfined = SecurityProfile {
        profile_type: ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    };
    assert!(seccomp_of(Some(unconfined), &[]).is_none());
    let c = with_sc(LinuxContainerSecurityContext {
        #[allow(deprecated)]
        seccomp_profile_path: "runtime/default".into(),
        ..Default::default()
    });
    assert!(linux(&c).seccomp().is_some());
    let c = with_sc(LinuxContainerSecurityContext {
        #[allow(deprecated)]
        seccomp_profile_path: "weird".into(),
        ..Default::default()
    });
    invalid_field(&c, "config.linux.security_context.seccomp_profile_path");
}

#[test]
fn seccomp_localhost_reads_the_host_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.json");
    std::fs::write(
        &path,
        r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
    )
    .unwrap();
    let local = |p: &str| SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: p.into(),
    };
    let s = seccomp_of(Some(local(path.to_str().unwrap())), &[]).unwrap();
    assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActErrno);
    let field = "config.linux.security_context.seccomp.localhost_ref";
    for p in ["relative.json", "/nonexistent/p.json"] {
        invalid_field(
            &with_sc(LinuxContainerSecurityContext {
                seccomp: Some(local(p)),
                ..Default::default()
            }),
            field,
        );
    }
    std::fs::write(&path, "not json").unwrap();
    let c = with_sc(LinuxContainerSecurityContext {
        seccomp: Some(local(path.to_str().unwrap())),
        ..Default::default()
    });
    invalid_field(&c, field);
}

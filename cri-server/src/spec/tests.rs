use super::*;
use std::path::Path;

use k8s_cri::v1::{
    security_profile::ProfileType, Capability as CriCapability, ContainerMetadata, Device,
    HugepageLimit, ImageSpec, Int64Value, KeyValue, LinuxContainerConfig, Mount as CriMount,
    PodSandboxMetadata, SeLinuxOption, SecurityProfile, UserNamespace,
};
use k8s_cri::v1::{LinuxContainerResources, MountPropagation, NamespaceMode, NamespaceOption};
use oci_spec::runtime::LinuxNamespaceType;
use oci_spec::runtime::{Capability, LinuxSeccomp, LinuxSeccompAction};
use serde_json::json;

fn image() -> Value {
    json!({"architecture": "amd64", "config": {
        "Env": ["PATH=/img/bin", "FOO=image", "HOSTNAME=img"],
        "Entrypoint": ["/entry"], "Cmd": ["a", "b"], "WorkingDir": "/work"}})
}

fn pod() -> PodSandboxConfig {
    PodSandboxConfig {
        hostname: "web-0".into(),
        metadata: Some(PodSandboxMetadata {
            name: "web-0".into(),
            namespace: "prod".into(),
            uid: "u-1".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

fn with_sc(sc: LinuxContainerSecurityContext) -> ContainerConfig {
    ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(sc),
            resources: None,
        }),
        ..Default::default()
    }
}

fn with_res(r: LinuxContainerResources) -> ContainerConfig {
    ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: None,
            resources: Some(r),
        }),
        ..Default::default()
    }
}

fn build(c: &ContainerConfig) -> (Spec, BuiltSpec) {
    let built = container_spec(c, &pod(), &image()).expect("spec builds");
    let spec: Spec = serde_json::from_slice(&built.oci_spec_json).expect("valid OCI JSON");
    (spec, built)
}

fn process(c: &ContainerConfig) -> Process {
    build(c).0.process().clone().unwrap()
}

fn linux(c: &ContainerConfig) -> oci_spec::runtime::Linux {
    build(c).0.linux().clone().unwrap()
}

/// Asserts the config is refused as InvalidArgument with a message starting with `field`.
fn invalid_field(c: &ContainerConfig, field: &str) {
    match container_spec(c, &pod(), &image()) {
        Err(SpecError::InvalidArgument(m)) => assert!(m.starts_with(field), "{m}"),
        other => panic!("expected InvalidArgument({field}), got {other:?}"),
    }
}

fn unimplemented_field(c: &ContainerConfig, field: &str) {
    match container_spec(c, &pod(), &image()) {
        Err(SpecError::Unimplemented(m)) => assert!(m.starts_with(field), "{m}"),
        other => panic!("expected Unimplemented({field}), got {other:?}"),
    }
}

fn args(c: &ContainerConfig, img: &Value) -> Result<Vec<String>, SpecError> {
    let built = container_spec(c, &pod(), img)?;
    let spec: Spec = serde_json::from_slice(&built.oci_spec_json).unwrap();
    Ok(spec.process().as_ref().unwrap().args().clone().unwrap())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn args_follow_docker_rules() {
    let img = image();
    let c = ContainerConfig::default();
    assert_eq!(args(&c, &img).unwrap(), strings(&["/entry", "a", "b"]));
    let c = ContainerConfig {
        args: strings(&["x"]),
        ..Default::default()
    };
    assert_eq!(args(&c, &img).unwrap(), strings(&["/entry", "x"]));
    let c = ContainerConfig {
        command: strings(&["/cmd"]),
        ..Default::default()
    };
    assert_eq!(args(&c, &img).unwrap(), strings(&["/cmd"]));
    let c = ContainerConfig {
        command: strings(&["/cmd"]),
        args: strings(&["y"]),
        ..Default::default()
    };
    assert_eq!(args(&c, &img).unwrap(), strings(&["/cmd", "y"]));
    // An Entrypoint of [""] means "reset": only Cmd runs.
    let img = json!({"config": {"Entrypoint": [""], "Cmd": ["sh"]}});
    assert_eq!(
        args(&ContainerConfig::default(), &img).unwrap(),
        strings(&["sh"])
    );
}

#[test]
fn no_command_is_invalid() {
    let err = args(&ContainerConfig::default(), &json!({})).unwrap_err();
    assert!(matches!(err, SpecError::InvalidArgument(m) if m.starts_with("config.command")));
}

#[test]
fn env_merges_image_hostname_and_cri() {
    let c = ContainerConfig {
        envs: vec![
            KeyValue {
                key: "FOO".into(),
                value: "cri".into(),
            },
            KeyValue {
                key: "NEW".into(),
                value: "1=2".into(),
            },
        ],
        ..Default::default()
    };
    let env = process(&c).env().clone().unwrap();
    assert_eq!(
        env,
        strings(&["PATH=/img/bin", "FOO=cri", "HOSTNAME=web-0", "NEW=1=2"])
    );
    let env = container_spec(
        &ContainerConfig::default(),
        &pod(),
        &json!({"config":{"Cmd":["x"]}}),
    )
    .map(|b| serde_json::from_slice::<Spec>(&b.oci_spec_json).unwrap())
    .unwrap()
    .process()
    .clone()
    .unwrap()
    .env()
    .clone()
    .unwrap();
    assert!(env.contains(&format!("PATH={DEFAULT_PATH}")), "{env:?}");
}

#[test]
fn bad_env_keys_are_invalid() {
    for key in ["", "A=B"] {
        let c = ContainerConfig {
            envs: vec![
                KeyValue {
                    key: "OK".into(),
                    value: String::new(),
                },
                KeyValue {
                    key: key.into(),
                    value: "v".into(),
                },
            ],
            ..Default::default()
        };
        invalid_field(&c, "config.envs[1].key");
    }
}

#[test]
fn working_dir_sources_and_validation() {
    assert_eq!(
        process(&ContainerConfig::default()).cwd(),
        Path::new("/work")
    );
    let c = ContainerConfig {
        working_dir: "/srv".into(),
        ..Default::default()
    };
    assert_eq!(process(&c).cwd(), Path::new("/srv"));
    let built = container_spec(
        &ContainerConfig::default(),
        &pod(),
        &json!({"config":{"Cmd":["x"]}}),
    )
    .unwrap();
    let spec: Spec = serde_json::from_slice(&built.oci_spec_json).unwrap();
    assert_eq!(spec.process().as_ref().unwrap().cwd(), Path::new("/"));
    let c = ContainerConfig {
        working_dir: "rel".into(),
        ..Default::default()
    };
    invalid_field(&c, "config.working_dir");
}

fn user_of(sc: LinuxContainerSecurityContext, img_user: &str) -> (User, String) {
    let img = json!({"config": {"Cmd": ["x"], "User": img_user}});
    let built = container_spec(&with_sc(sc), &pod(), &img).unwrap();
    let spec: Spec = serde_json::from_slice(&built.oci_spec_json).unwrap();
    (spec.process().as_ref().unwrap().user().clone(), built.user)
}

#[test]
fn user_from_security_context_and_image() {
    let sc = LinuxContainerSecurityContext {
        run_as_user: Some(Int64Value { value: 1000 }),
        run_as_group: Some(Int64Value { value: 2000 }),
        supplemental_groups: vec![5, 6],
        ..Default::default()
    };
    let (u, name) = user_of(sc, "nobody");
    assert_eq!((u.uid(), u.gid(), name.as_str()), (1000, 2000, ""));
    assert_eq!(u.additional_gids().clone().unwrap(), vec![5, 6]);
    let sc = LinuxContainerSecurityContext {
        run_as_username: "app".into(),
        run_as_group: Some(Int64Value { value: 7 }),
        ..Default::default()
    };
    let (u, name) = user_of(sc, "");
    assert_eq!((u.gid(), name.as_str()), (7, "app:7"));
    // Numeric uid alone: the primary group comes from the image's /etc/passwd.
    let (u, name) = user_of(Default::default(), "1000");
    assert_eq!((u.uid(), name.as_str()), (1000, "1000"));
    let (u, name) = user_of(Default::default(), "1000:1001");
    assert_eq!((u.uid(), u.gid(), name.as_str()), (1000, 1001, ""));
    assert_eq!(user_of(Default::default(), "www:staff").1, "www:staff");
    let (u, name) = user_of(Default::default(), "");
    assert_eq!((u.uid(), u.gid(), name.as_str()), (0, 0, ""));
}

#[test]
fn bad_users_are_invalid() {
    let sc = LinuxContainerSecurityContext {
        run_as_group: Some(Int64Value { value: 1 }),
        ..Default::default()
    };
    invalid_field(&with_sc(sc), "config.linux.security_context.run_as_group");
    let sc = LinuxContainerSecurityContext {
        run_as_user: Some(Int64Value { value: -1 }),
        ..Default::default()
    };
    invalid_field(&with_sc(sc), "config.linux.security_context.run_as_user");
    let sc = LinuxContainerSecurityContext {
        supplemental_groups: vec![1, -3],
        ..Default::default()
    };
    invalid_field(
        &with_sc(sc),
        "config.linux.security_context.supplemental_groups[1]",
    );
}

#[test]
fn tty_and_stop_signal() {
    let c = ContainerConfig {
        tty: true,
        stdin: true,
        ..Default::default()
    };
    assert_eq!(process(&c).terminal(), Some(true));
    assert_eq!(build(&ContainerConfig::default()).1.stop_signal, SIGTERM);
    for (s, n) in [
        ("SIGQUIT", 3),
        ("int", 2),
        ("9", 9),
        ("SIGRTMIN+3", 37),
        ("RTMAX-1", 63),
    ] {
        assert_eq!(stop_signal(s).unwrap(), n, "{s}");
    }
    for s in ["SIGNOPE", "0", "RTMAX+1", "SIGRTMIN+40"] {
        assert!(stop_signal(s).is_err(), "{s}");
    }
    let img = json!({"config": {"Cmd": ["x"], "StopSignal": "SIGUSR1"}});
    let built = container_spec(&ContainerConfig::default(), &pod(), &img).unwrap();
    assert_eq!(built.stop_signal, 10);
}

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

mod linux;

#[test]
fn nul_bytes_are_refused_with_the_field() {
    let c = ContainerConfig {
        command: strings(&["sh", "a\0b"]),
        ..Default::default()
    };
    invalid_field(&c, "config.command[1]");
    let c = ContainerConfig {
        envs: vec![KeyValue {
            key: "K".into(),
            value: "v\0".into(),
        }],
        ..Default::default()
    };
    invalid_field(&c, "config.envs[0].value");
    let c = ContainerConfig {
        mounts: vec![CriMount {
            host_path: "/a\0".into(),
            container_path: "/b".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    invalid_field(&c, "config.mounts[0].host_path");
}

#[test]
fn memory_limits_have_a_floor_in_create_and_update() {
    let r = LinuxContainerResources {
        memory_limit_in_bytes: 1,
        ..Default::default()
    };
    invalid_field(
        &with_res(r.clone()),
        "config.linux.resources.memory_limit_in_bytes",
    );
    match oci_resources(&r) {
        Err(SpecError::InvalidArgument(m)) => {
            assert!(m.starts_with("linux.memory_limit_in_bytes"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let ok = LinuxContainerResources {
        memory_limit_in_bytes: MIN_MEMORY_LIMIT,
        ..Default::default()
    };
    oci_resources(&ok).unwrap();
    let e = resources_at(
        "config.linux.overhead",
        &LinuxContainerResources {
            cpu_period: 10,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("config.linux.overhead.cpu_period"),
        "{e}"
    );
}

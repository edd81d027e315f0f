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
    let built = container_spec(c, &pod(), &image(), PodKind::Vm).expect("spec builds");
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
    match container_spec(c, &pod(), &image(), PodKind::Vm) {
        Err(SpecError::InvalidArgument(m)) => assert!(m.starts_with(field), "{m}"),
        other => panic!("expected InvalidArgument({field}), got {other:?}"),
    }
}

fn unimplemented_field(c: &ContainerConfig, field: &str) {
    match container_spec(c, &pod(), &image(), PodKind::Vm) {
        Err(SpecError::Unimplemented(m)) => assert!(m.starts_with(field), "{m}"),
        other => panic!("expected Unimplemented({field}), got {other:?}"),
    }
}

fn args(c: &ContainerConfig, img: &Value) -> Result<Vec<String>, SpecError> {
    let built = container_spec(c, &pod(), img, PodKind::Vm)?;
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
        PodKind::Vm,
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
        PodKind::Vm,
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
    let built = container_spec(&with_sc(sc), &pod(), &img, PodKind::Vm).unwrap();
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
    let built = container_spec(&ContainerConfig::default(), &pod(), &img, PodKind::Vm).unwrap();
    assert_eq!(built.stop_signal, 10);
}

mod confinement;

mod linux;

mod native;

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

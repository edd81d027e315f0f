//! Namespaces, resources, mounts, annotations and exec.

use super::*;

fn ns_config(pid: NamespaceMode, network: NamespaceMode, ipc: NamespaceMode) -> ContainerConfig {
    with_sc(LinuxContainerSecurityContext {
        namespace_options: Some(NamespaceOption {
            pid: pid as i32,
            network: network as i32,
            ipc: ipc as i32,
            target_id: String::new(),
            userns_options: Some(UserNamespace {
                mode: NamespaceMode::Node as i32,
                ..Default::default()
            }),
        }),
        ..Default::default()
    })
}

#[test]
fn namespaces_like_runc_spec() {
    use NamespaceMode::*;
    for pid in [Pod, Container] {
        let types: Vec<_> = linux(&ns_config(pid, Pod, Pod))
            .namespaces()
            .clone()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert_eq!(
            types,
            vec![
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Network,
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Uts,
                LinuxNamespaceType::Mount
            ]
        );
    }
    let field = "config.linux.security_context.namespace_options";
    unimplemented_field(&ns_config(Node, Pod, Pod), &format!("{field}.pid"));
    unimplemented_field(&ns_config(Target, Pod, Pod), &format!("{field}.pid"));
    unimplemented_field(&ns_config(Pod, Node, Pod), &format!("{field}.network"));
    unimplemented_field(&ns_config(Pod, Pod, Node), &format!("{field}.ipc"));
    let mut c = ns_config(Pod, Pod, Pod);
    let sc = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    sc.namespace_options.as_mut().unwrap().userns_options = Some(UserNamespace::default());
    unimplemented_field(&c, &format!("{field}.userns_options"));
}

#[test]
fn resources_map_to_oci() {
    let mut unified = HashMap::new();
    unified.insert("memory.high".to_string(), "1000000".to_string());
    let c = with_res(LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        cpuset_cpus: "0-1,3".into(),
        cpuset_mems: "0".into(),
        memory_limit_in_bytes: 1 << 30,
        oom_score_adj: 900,
        hugepage_limits: vec![HugepageLimit {
            page_size: "2MB".into(),
            limit: 0,
        }],
        unified,
        ..Default::default()
    });
    let (spec, _) = build(&c);
    let r = spec.linux().clone().unwrap().resources().clone().unwrap();
    let cpu = r.cpu().clone().unwrap();
    assert_eq!(
        (cpu.period(), cpu.quota(), cpu.shares()),
        (Some(100_000), Some(50_000), Some(512))
    );
    assert_eq!(cpu.cpus().as_deref(), Some("0-1,3"));
    assert_eq!(cpu.mems().as_deref(), Some("0"));
    let mem = r.memory().unwrap();
    assert_eq!((mem.limit(), mem.swap()), (Some(1 << 30), Some(1 << 30)));
    assert_eq!(r.unified().clone().unwrap()["memory.high"], "1000000");
    assert!(r.pids().is_none());
    assert_eq!(spec.process().clone().unwrap().oom_score_adj(), Some(900));
    let c = with_res(LinuxContainerResources {
        memory_limit_in_bytes: 100 << 20,
        memory_swap_limit_in_bytes: 200 << 20,
        ..Default::default()
    });
    let mem = linux(&c).resources().clone().unwrap().memory().unwrap();
    assert_eq!(mem.swap(), Some(200 << 20));
}

#[test]
fn bad_resources_name_their_field() {
    let cases: Vec<(LinuxContainerResources, &str)> = vec![
        (
            LinuxContainerResources {
                cpu_quota: -5,
                ..Default::default()
            },
            "cpu_quota",
        ),
        (
            LinuxContainerResources {
                cpu_quota: 50_000,
                ..Default::default()
            },
            "cpu_quota",
        ),
        (
            LinuxContainerResources {
                cpu_period: 10,
                ..Default::default()
            },
            "cpu_period",
        ),
        (
            LinuxContainerResources {
                cpu_shares: -1,
                ..Default::default()
            },
            "cpu_shares",
        ),
        (
            LinuxContainerResources {
                memory_limit_in_bytes: -1,
                ..Default::default()
            },
            "memory_limit_in_bytes",
        ),
        (
            LinuxContainerResources {
                memory_limit_in_bytes: 10 << 20,
                memory_swap_limit_in_bytes: 1 << 20,
                ..Default::default()
            },
            "memory_swap_limit_in_bytes",
        ),
        (
            LinuxContainerResources {
                memory_swap_limit_in_bytes: 1 << 20,
                ..Default::default()
            },
            "memory_swap_limit_in_bytes",
        ),
        (
            LinuxContainerResources {
                oom_score_adj: 1001,
                ..Default::default()
            },
            "oom_score_adj",
        ),
        (
            LinuxContainerResources {
                cpuset_cpus: "0-a".into(),
                ..Default::default()
            },
            "cpuset_cpus",
        ),
        (
            LinuxContainerResources {
                unified: [("nodot".to_string(), "1".to_string())].into(),
                ..Default::default()
            },
            "unified",
        ),
    ];
    for (r, field) in cases {
        invalid_field(&with_res(r), &format!("config.linux.resources.{field}"));
    }
    let c = with_res(LinuxContainerResources {
        hugepage_limits: vec![HugepageLimit {
            page_size: "2MB".into(),
            limit: 1 << 21,
        }],
        ..Default::default()
    });
    unimplemented_field(&c, "config.linux.resources.hugepage_limits");
}

fn cri_mount(host: &str, container: &str, readonly: bool) -> CriMount {
    CriMount {
        host_path: host.into(),
        container_path: container.into(),
        readonly,
        ..Default::default()
    }
}

#[test]
fn standard_and_cri_mounts() {
    let c = ContainerConfig {
        mounts: vec![
            cri_mount("/var/lib/kubelet/pods/x/volumes/a", "/data/sub", false),
            cri_mount("/var/lib/kubelet/pods/x/etc-hosts", "/etc/hosts", true),
            cri_mount("/var/lib/kubelet/pods/x/volumes/b", "/data", true),
            cri_mount("/var/lib/kubelet/pods/x/volumes/shm", "/dev/shm/", false),
        ],
        ..Default::default()
    };
    let (spec, built) = build(&c);
    let mounts = spec.mounts().clone().unwrap();
    let dests: Vec<_> = mounts
        .iter()
        .map(|m| m.destination().to_str().unwrap())
        .collect();
    assert_eq!(
        dests,
        [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
            "/data",
            "/data/sub",
            "/etc/hosts",
            "/dev/shm"
        ]
    );
    let data = &mounts[6];
    assert_eq!(data.typ().as_deref(), Some("bind"));
    assert_eq!(
        data.source().clone().unwrap(),
        PathBuf::from(super::super::linux::guest_mount_source(
            "/var/lib/kubelet/pods/x/volumes/b"
        ))
    );
    assert_eq!(
        data.options().clone().unwrap(),
        strings(&["rbind", "rprivate", "ro"])
    );
    let cgroup = &mounts[5];
    assert_eq!(cgroup.typ().as_deref(), Some("cgroup2"));
    assert!(cgroup
        .options()
        .clone()
        .unwrap()
        .contains(&"ro".to_string()));
    assert_eq!(built.mounts.len(), 4);
    assert_eq!(
        built.mounts[0],
        HostMount {
            host_path: "/var/lib/kubelet/pods/x/volumes/a".into(),
            guest_source: super::super::linux::guest_mount_source(
                "/var/lib/kubelet/pods/x/volumes/a"
            ),
            container_path: "/data/sub".into(),
            readonly: false,
        }
    );
    assert_eq!(built.mounts[3].container_path, "/dev/shm");
    // One guest copy per host path: distinct paths, distinct copies below the mounts directory.
    assert!(built.mounts[0].guest_source.starts_with(GUEST_MOUNTS_DIR));
    assert_ne!(built.mounts[0].guest_source, built.mounts[1].guest_source);
}

#[test]
fn bad_mounts_name_their_field() {
    let one = |m: CriMount| ContainerConfig {
        mounts: vec![cri_mount("/a", "/a", false), m],
        ..Default::default()
    };
    invalid_field(
        &one(cri_mount("rel", "/x", false)),
        "config.mounts[1].host_path",
    );
    invalid_field(
        &one(cri_mount("/h", "x", false)),
        "config.mounts[1].container_path",
    );
    invalid_field(
        &one(cri_mount("/h", "/x/../y", false)),
        "config.mounts[1].container_path",
    );
    let mut m = cri_mount("/h", "/x", false);
    m.recursive_read_only = true;
    invalid_field(&one(m), "config.mounts[1].recursive_read_only");
    let mut m = cri_mount("/h", "/x", false);
    m.propagation = MountPropagation::PropagationBidirectional as i32;
    unimplemented_field(&one(m), "config.mounts[1].propagation");
    let mut m = cri_mount("", "/x", true);
    m.image = Some(ImageSpec::default());
    unimplemented_field(&one(m), "config.mounts[1].image");
    let c = ContainerConfig {
        devices: vec![Device {
            container_path: "/dev/kvm".into(),
            host_path: "/dev/kvm".into(),
            permissions: "rw".into(),
        }],
        ..Default::default()
    };
    unimplemented_field(&c, "config.devices");
}

#[test]
fn annotations_carry_cri_metadata() {
    let c = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "app".into(),
            attempt: 1,
        }),
        image: Some(ImageSpec {
            image: "sha256:abc".into(),
            user_specified_image: "nginx:1".into(),
            ..Default::default()
        }),
        annotations: [("k".to_string(), "v".to_string())].into(),
        ..Default::default()
    };
    let a = build(&c).0.annotations().clone().unwrap();
    for (k, v) in [
        ("k", "v"),
        ("io.kubernetes.cri.container-type", "container"),
        ("io.kubernetes.cri.container-name", "app"),
        ("io.kubernetes.cri.sandbox-name", "web-0"),
        ("io.kubernetes.cri.sandbox-namespace", "prod"),
        ("io.kubernetes.cri.sandbox-uid", "u-1"),
        ("io.kubernetes.cri.image-name", "nginx:1"),
    ] {
        assert_eq!(a.get(k).map(String::as_str), Some(v), "{k}");
    }
}

#[test]
fn errors_map_to_grpc_codes_at_the_cri_boundary() {
    let status = |e: SpecError| crate::runtime::to_status(e.into());
    let s = status(SpecError::Unimplemented("config.devices: no".into()));
    assert_eq!(s.code(), tonic::Code::Unimplemented);
    let s = status(SpecError::InvalidArgument("x: y".into()));
    assert_eq!(
        (s.code(), s.message()),
        (tonic::Code::InvalidArgument, "x: y")
    );
    let bad_json = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
    let s = status(SpecError::Serialize(bad_json));
    assert_eq!(s.code(), tonic::Code::Internal);
    assert!(
        s.message().starts_with("serializing the OCI spec: "),
        "{s:?}"
    );
}

#[test]
fn apparmor_and_selinux() {
    let profile = |t: ProfileType| SecurityProfile {
        profile_type: t as i32,
        localhost_ref: "p".into(),
    };
    for t in [ProfileType::RuntimeDefault, ProfileType::Unconfined] {
        build(&with_sc(LinuxContainerSecurityContext {
            apparmor: Some(profile(t)),
            ..Default::default()
        }));
    }
    let c = with_sc(LinuxContainerSecurityContext {
        apparmor: Some(profile(ProfileType::Localhost)),
        ..Default::default()
    });
    unimplemented_field(&c, "config.linux.security_context.apparmor");
    let c = with_sc(LinuxContainerSecurityContext {
        #[allow(deprecated)]
        apparmor_profile: "localhost/foo".into(),
        ..Default::default()
    });
    unimplemented_field(&c, "config.linux.security_context.apparmor_profile");
    build(&with_sc(LinuxContainerSecurityContext {
        selinux_options: Some(SeLinuxOption::default()),
        ..Default::default()
    }));
    let c = with_sc(LinuxContainerSecurityContext {
        selinux_options: Some(SeLinuxOption {
            level: "s0:c1".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    unimplemented_field(&c, "config.linux.security_context.selinux_options");
}

//! Specs of native pods' containers: node namespaces, node paths as runc binds them, propagation,
//! privileged capabilities within the node's.

use super::*;

fn native(c: &ContainerConfig) -> Result<Spec, SpecError> {
    let built = container_spec(c, &pod(), &image(), PodKind::Native)?;
    assert!(
        built.mounts.is_empty(),
        "nothing is copied for a native pod"
    );
    Ok(serde_json::from_slice(&built.oci_spec_json).unwrap())
}

fn with_mount(host_path: &str, propagation: MountPropagation) -> ContainerConfig {
    ContainerConfig {
        mounts: vec![CriMount {
            host_path: host_path.into(),
            container_path: "/data".into(),
            propagation: propagation as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn mount_at(spec: &Spec, dest: &str) -> oci_spec::runtime::Mount {
    spec.mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new(dest))
        .cloned()
        .unwrap()
}

fn data_mount(spec: &Spec) -> oci_spec::runtime::Mount {
    mount_at(spec, "/data")
}

#[test]
fn node_namespaces_are_allowed_for_native_pods_only() {
    let c = with_sc(LinuxContainerSecurityContext {
        namespace_options: Some(NamespaceOption {
            network: NamespaceMode::Node as i32,
            pid: NamespaceMode::Node as i32,
            ipc: NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let e = container_spec(&c, &pod(), &image(), PodKind::Vm).unwrap_err();
    assert!(matches!(e, SpecError::Unimplemented(_)), "{e}");
    // On the node's IPC namespace, the node's /dev/shm (as containerd).
    let shm = mount_at(&native(&c).unwrap(), "/dev/shm");
    assert_eq!(shm.typ().as_deref(), Some("bind"));
    assert_eq!(shm.source().as_deref(), Some(Path::new("/dev/shm")));
    let shm = mount_at(&native(&ContainerConfig::default()).unwrap(), "/dev/shm");
    assert_eq!(shm.typ().as_deref(), Some("tmpfs"));
}

#[test]
fn node_paths_are_bound_as_runc_binds_them() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    // A symlink is resolved; the source is the node path itself, not a copy.
    let spec = native(&with_mount(
        link.to_str().unwrap(),
        MountPropagation::PropagationPrivate,
    ))
    .unwrap();
    let m = data_mount(&spec);
    assert_eq!(m.source().as_deref(), Some(real.as_path()));
    assert_eq!(m.options().clone().unwrap(), ["rbind", "rprivate", "rw"]);
    assert_eq!(spec.linux().as_ref().unwrap().rootfs_propagation(), &None);
    // A missing path becomes a directory (containerd's MkdirAll).
    let missing = dir.path().join("a/b");
    native(&with_mount(
        missing.to_str().unwrap(),
        MountPropagation::PropagationPrivate,
    ))
    .unwrap();
    assert!(missing.is_dir());
    // The runtime handler does not offer recursive read-only mounts.
    let mut c = with_mount(real.to_str().unwrap(), MountPropagation::PropagationPrivate);
    c.mounts[0].readonly = true;
    c.mounts[0].recursive_read_only = true;
    let e = native(&c).unwrap_err();
    assert!(
        matches!(&e, SpecError::Unimplemented(m) if m.starts_with("config.mounts[0].recursive_read_only")),
        "{e}"
    );
}

#[test]
fn propagation_needs_a_node_mount_that_propagates() {
    // /proc is a mount of its own; whether it is shared depends on the host, so both outcomes are
    // checked against the node's mountinfo.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let proc_line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/proc"))
        .unwrap();
    let shared = proc_line.contains(" shared:");
    let slave = proc_line.contains(" master:");
    let bidirectional = native(&with_mount(
        "/proc",
        MountPropagation::PropagationBidirectional,
    ));
    match bidirectional {
        Ok(spec) => {
            assert!(shared, "{proc_line}");
            assert_eq!(data_mount(&spec).options().clone().unwrap()[1], "rshared");
            let linux = spec.linux().clone().unwrap();
            assert_eq!(linux.rootfs_propagation().as_deref(), Some("shared"));
        }
        Err(SpecError::FailedPrecondition(m)) => {
            assert!(!shared, "{proc_line}");
            assert!(m.starts_with("config.mounts[0].propagation:"), "{m}");
        }
        Err(e) => panic!("{e}"),
    }
    let inbound = native(&with_mount(
        "/proc",
        MountPropagation::PropagationHostToContainer,
    ));
    match inbound {
        Ok(spec) => {
            assert!(shared || slave, "{proc_line}");
            assert_eq!(data_mount(&spec).options().clone().unwrap()[1], "rslave");
        }
        Err(SpecError::FailedPrecondition(_)) => assert!(!shared && !slave, "{proc_line}"),
        Err(e) => panic!("{e}"),
    }
    assert_eq!(host_mounts_stronger(), Some("shared"));
}

fn host_mounts_stronger() -> Option<&'static str> {
    super::super::host_mounts::stronger(Some("slave"), Some("shared"))
}

#[test]
fn privileged_native_containers_get_the_nodes_capabilities() {
    let c = with_sc(LinuxContainerSecurityContext {
        privileged: true,
        ..Default::default()
    });
    let spec = native(&c).unwrap();
    let caps = spec
        .process()
        .as_ref()
        .unwrap()
        .capabilities()
        .clone()
        .unwrap();
    let node = caps::read(None, caps::CapSet::Bounding).unwrap();
    let given = caps.bounding().clone().unwrap();
    assert_eq!(given.len(), node.len(), "{given:?} vs {node:?}");
    // The node's devices too (containerd's WithHostDevices); none without privileges, none in a VM.
    let devices = spec
        .linux()
        .as_ref()
        .unwrap()
        .devices()
        .clone()
        .unwrap_or_default();
    assert!(
        devices.iter().any(|d| d.path() == Path::new("/dev/null")),
        "{devices:?}"
    );
    let plain = native(&ContainerConfig::default()).unwrap();
    assert_eq!(plain.linux().as_ref().unwrap().devices(), &None);
    // In a VM: every capability the spec knows.
    let (vm, _) = build(&c);
    let all = vm
        .process()
        .as_ref()
        .unwrap()
        .capabilities()
        .clone()
        .unwrap();
    assert!(all.bounding().clone().unwrap().len() >= given.len());
}

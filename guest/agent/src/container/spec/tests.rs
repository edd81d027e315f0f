use super::*;

fn pod() -> PodContext {
    PodContext::guest("/run/podvisor/sandbox".into())
}

#[test]
fn native_pods_bind_node_paths_and_may_keep_the_node_pid_namespace() {
    let mut v = base();
    v["mounts"] = serde_json::json!([{"destination": "/host", "type": "bind",
        "source": "/var/lib/kubelet", "options": ["rbind", "rshared"]}]);
    // In a VM a node path is not a guest directory a container may bind.
    let e = prep(&v, &pod()).unwrap_err().to_string();
    assert!(e.starts_with("oci_spec_json.mounts[0].source"), "{e}");
    let node = PodContext {
        host_pid: true,
        bind_roots: Vec::new(),
        ..pod()
    };
    let spec = prep(&v, &node).unwrap();
    let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
    assert!(
        !namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::Pid),
        "{namespaces:?}"
    );
    let mount = &spec.mounts().as_ref().unwrap()[0];
    assert_eq!(
        mount.source().as_deref(),
        Some(Path::new("/var/lib/kubelet"))
    );
    // Without host_pid each container gets its own PID namespace there too.
    let own = PodContext {
        bind_roots: Vec::new(),
        ..pod()
    };
    let spec = prep(&v, &own).unwrap();
    let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
    assert!(namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Pid));
}

#[test]
fn pods_that_avoid_avx_tell_glibc_so() {
    let avoiding = PodContext {
        avoid_avx: true,
        ..pod()
    };
    let spec = prep(&base(), &avoiding).unwrap();
    let env = env_of(&spec);
    assert_eq!(
        env,
        [
            "PATH=/bin".to_string(),
            format!("GLIBC_TUNABLES={AVOID_AVX_GLIBC_TUNABLES}")
        ]
    );
    let spec = prep(&base(), &pod()).unwrap();
    assert_eq!(
        spec.process().as_ref().unwrap().env().clone().unwrap(),
        ["PATH=/bin"]
    );
    // Existing tunables are extended; an explicit hwcaps choice is left alone.
    let mut v = base();
    v["process"]["env"] = serde_json::json!(["GLIBC_TUNABLES=glibc.malloc.arena_max=2"]);
    let env = env_of(&prep(&v, &avoiding).unwrap());
    assert_eq!(
        env,
        [format!(
            "GLIBC_TUNABLES=glibc.malloc.arena_max=2:{AVOID_AVX_GLIBC_TUNABLES}"
        )]
    );
    v["process"]["env"] = serde_json::json!(["GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2"]);
    let env = env_of(&prep(&v, &avoiding).unwrap());
    assert_eq!(env, ["GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2"]);
}

fn env_of(spec: &Spec) -> Vec<String> {
    spec.process().as_ref().unwrap().env().clone().unwrap()
}

fn base() -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2", "hooks": null,
        "process": {"args": ["sh", "-c", "echo hi"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "/somewhere/else", "readonly": true},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "cgroupsPath": "/host/chosen",
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"}]
        }
    })
}

fn prep(v: &serde_json::Value, pod: &PodContext) -> Result<Spec, ContainerError> {
    prepare(&serde_json::to_vec(v).unwrap(), "/podvisor/c1", pod)
}

fn err_msg(r: Result<Spec, ContainerError>) -> String {
    match r {
        Err(ContainerError::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn agent_owns_root_cgroup_namespaces_and_pod_files() {
    let spec = prep(&base(), &pod()).unwrap();
    let root = spec.root().as_ref().unwrap();
    assert_eq!(
        (root.path().as_path(), root.readonly()),
        (Path::new("rootfs"), Some(true))
    );
    let linux = spec.linux().as_ref().unwrap();
    assert_eq!(
        linux.cgroups_path().as_deref(),
        Some(Path::new("/podvisor/c1"))
    );
    let ns: Vec<_> = linux
        .namespaces()
        .as_ref()
        .unwrap()
        .iter()
        .map(|n| (n.typ(), n.path().clone()))
        .collect();
    assert_eq!(
        ns,
        [
            (LinuxNamespaceType::Mount, None),
            (LinuxNamespaceType::Pid, None)
        ]
    );
    let mounts = spec.mounts().as_ref().unwrap();
    let hosts = mounts
        .iter()
        .find(|m| m.destination() == Path::new("/etc/hosts"))
        .unwrap();
    assert_eq!(
        hosts.source().as_deref(),
        Some(Path::new("/run/podvisor/sandbox/hosts"))
    );
    assert!(
        hosts
            .options()
            .as_ref()
            .unwrap()
            .contains(&"ro".to_string()),
        "read-only root: pod files too"
    );
    assert_eq!(mounts.len(), 4);

    // Shared PID namespace: joined by path. A spec that mounts its own /etc/hosts keeps it.
    let mut v = base();
    v["mounts"] = serde_json::json!([{"destination": "/etc/hosts", "type": "bind",
        "source": "/run/podvisor/storage/vol/hosts", "options": ["rbind"]}]);
    let shared = PodContext {
        pid_namespace: Some("/proc/7/ns/pid".into()),
        ..pod()
    };
    let spec = prep(&v, &shared).unwrap();
    let linux = spec.linux().as_ref().unwrap();
    let pid = linux
        .namespaces()
        .as_ref()
        .unwrap()
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Pid)
        .unwrap();
    assert_eq!(pid.path().as_deref(), Some(Path::new("/proc/7/ns/pid")));
    let mounts = spec.mounts().as_ref().unwrap();
    assert_eq!(
        mounts
            .iter()
            .filter(|m| m.destination() == Path::new("/etc/hosts"))
            .count(),
        1
    );
}

#[test]
fn bad_specs_name_the_field() {
    assert!(err_msg(prepare(b"{not json", "/p", &pod())).starts_with("oci_spec_json:"));
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "/process",
            serde_json::Value::Null,
            "oci_spec_json.process:",
        ),
        (
            "/process/args",
            serde_json::json!([]),
            "oci_spec_json.process.args:",
        ),
        (
            "/process/cwd",
            serde_json::json!("relative"),
            "oci_spec_json.process.cwd:",
        ),
        (
            "/process/env",
            serde_json::json!(["NOVALUE"]),
            "oci_spec_json.process.env[0]:",
        ),
        (
            "/mounts",
            serde_json::json!([{"destination": "/x/../../etc", "type": "tmpfs"}]),
            "oci_spec_json.mounts[0].destination:",
        ),
        (
            "/mounts",
            serde_json::json!([{"destination": "/data", "type": "bind", "source": "/etc"}]),
            "oci_spec_json.mounts[0].source:",
        ),
        (
            "/mounts",
            serde_json::json!([{"destination": "/data", "options": ["rbind"], "source": "/run/podvisor/storage/../../etc"}]),
            "oci_spec_json.mounts[0].source:",
        ),
        (
            "/hooks",
            serde_json::json!({"prestart": [{"path": "/bin/true"}]}),
            "oci_spec_json.hooks:",
        ),
        (
            "/linux/namespaces",
            serde_json::json!([{"type": "user"}]),
            "oci_spec_json.linux.namespaces:",
        ),
        (
            "/linux/namespaces",
            serde_json::json!([{"type": "mount", "path": "/proc/1/ns/mnt"}]),
            "oci_spec_json.linux.namespaces:",
        ),
        ("/linux", serde_json::Value::Null, "oci_spec_json.linux:"),
    ];
    for (pointer, value, field) in cases {
        let mut v = base();
        *v.pointer_mut(pointer)
            .unwrap_or_else(|| panic!("{pointer}")) = value;
        let msg = err_msg(prep(&v, &pod()));
        assert!(msg.starts_with(field), "{pointer}: {msg}");
    }
}

#[test]
fn users_resolve_from_the_image() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::write(
        dir.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33:www:/var/www:/bin/false\nbroken:x:abc\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("etc/group"),
        "root:x:0:\nwww:x:33:\nadm:x:4:www,other\nvideo:x:44:www\n",
    )
    .unwrap();
    let u = resolve_user(dir.path(), "www").unwrap();
    assert_eq!(
        (u.uid, u.gid, u.additional_gids.as_slice(), u.home.as_str()),
        (33, 33, &[4, 44][..], "/var/www")
    );
    assert_eq!(resolve_user(dir.path(), "33").unwrap(), u);
    assert_eq!(resolve_user(dir.path(), "www:adm").unwrap().gid, 4);
    assert_eq!(resolve_user(dir.path(), "www:1234").unwrap().gid, 1234);
    let numeric = resolve_user(dir.path(), "1000:1000").unwrap();
    assert_eq!(
        (numeric.uid, numeric.gid, numeric.additional_gids.len()),
        (1000, 1000, 0)
    );
    for bad in ["nobody", "www:nogroup", "", ":0", "broken"] {
        assert!(
            matches!(resolve_user(dir.path(), bad), Err(ContainerError::InvalidArgument(m)) if m.starts_with("user:")),
            "{bad}"
        );
    }
}

#[test]
fn exec_processes_are_the_container_process_with_other_args_and_terminal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::write(
        dir.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\nusers:x:100:nobody\n",
    )
    .unwrap();
    let mut v = base();
    v["process"]["terminal"] = serde_json::json!(true);
    v["process"]["consoleSize"] = serde_json::json!({"height": 24, "width": 80});
    v["process"]["noNewPrivileges"] = serde_json::json!(true);
    v["process"]["capabilities"] =
        serde_json::json!({"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]});
    v["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": 64, "soft": 32}]);
    v["process"]["apparmorProfile"] = serde_json::json!("runtime/default");
    v["process"]["selinuxLabel"] = serde_json::json!("system_u:system_r:container_t:s0");
    v["process"]["oomScoreAdj"] = serde_json::json!(500);
    let mut spec = prep(&v, &pod()).unwrap();
    let process = spec.process_mut().as_mut().unwrap();
    apply_user(process, resolve_user(dir.path(), "nobody").unwrap());
    let container = process.clone();

    let args = vec!["id".to_string(), "-G".to_string()];
    let exec = exec_process(&container, &args, false).unwrap();
    assert_eq!(exec.args().as_deref(), Some(&args[..]));
    assert_eq!((exec.terminal(), exec.console_size()), (Some(false), None));
    let user = exec.user();
    assert_eq!(
        (user.uid(), user.gid(), user.additional_gids().as_deref()),
        (65534, 65534, Some(&[100][..]))
    );
    assert_eq!(
        exec.env().as_deref().unwrap(),
        ["PATH=/bin", "HOME=/nonexistent"]
    );
    // Everything else is the container's.
    let mut same = exec.clone();
    same.set_args(container.args().clone())
        .set_terminal(Some(true))
        .set_console_size(container.console_size());
    assert_eq!(same, container);
    assert_eq!(exec.no_new_privileges(), Some(true));
    assert!(exec.rlimits().is_some() && exec.capabilities().is_some());
    assert_eq!(
        exec_process(&container, &args, true).unwrap().terminal(),
        Some(true)
    );

    for (bad, field) in [
        (vec![], "args:"),
        (vec![String::new()], "args:"),
        (vec!["sh".into(), "a\0b".into()], "args[1]:"),
    ] {
        assert!(
            matches!(exec_process(&container, &bad, false), Err(ContainerError::InvalidArgument(m)) if m.starts_with(field)),
            "{bad:?}"
        );
    }
}

#[test]
fn supplemental_groups_merge_and_home_defaults_from_the_image() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::write(
        dir.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("etc/group"), "root:x:0:\nwheel:x:10:app\n").unwrap();
    // CRI supplemental groups (fsGroup 2000, 3000) stay, the image's (wheel) are added.
    let mut v = base();
    v["process"]["user"] = serde_json::json!({"uid": 0, "gid": 0, "additionalGids": [3000, 2000]});
    let mut spec = prep(&v, &pod()).unwrap();
    let process = spec.process_mut().as_mut().unwrap();
    apply_user(process, resolve_user(dir.path(), "1000").unwrap());
    assert_eq!(
        process.user().additional_gids().as_deref(),
        Some(&[10, 2000, 3000][..])
    );
    // A numeric user given in the spec (no name to resolve) gets its passwd home; unknown uids "/".
    for (uid, home) in [(1000, "HOME=/home/app"), (4242, "HOME=/")] {
        let mut v = base();
        v["process"]["user"] = serde_json::json!({"uid": uid, "gid": uid});
        let mut spec = prep(&v, &pod()).unwrap();
        let process = spec.process_mut().as_mut().unwrap();
        default_home(process, dir.path());
        assert!(
            process.env().as_ref().unwrap().iter().any(|e| e == home),
            "{uid}"
        );
    }
    // An explicit HOME wins.
    let mut v = base();
    v["process"]["env"] = serde_json::json!(["HOME=/mine"]);
    let mut spec = prep(&v, &pod()).unwrap();
    let process = spec.process_mut().as_mut().unwrap();
    default_home(process, dir.path());
    assert_eq!(process.env().as_deref().unwrap(), ["HOME=/mine"]);
}

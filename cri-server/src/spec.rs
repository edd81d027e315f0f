//! CRI `ContainerConfig` → OCI runtime spec for the guest agent, following what containerd's
//! CRI plugin does, minus what a pod VM cannot offer (host devices, host namespaces, LSMs).
//!
//! Privileged containers get every capability, no seccomp filter, no masked or read-only
//! paths and writable /sys and /sys/fs/cgroup. That is tolerable here because the pod's
//! kernel is the VM's, not the node's: a privileged container can take over its pod VM
//! (including the agent and its vsock link to the host), not the node.

use std::collections::HashMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};

use k8s_cri::v1::{
    ContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext, NamespaceMode,
    PodSandboxConfig,
};
use oci_spec::runtime::{LinuxDeviceCgroup, LinuxResources, Process, Root, Spec, User};
use serde_json::Value;

use crate::pod::PodKind;

mod host_devices;
mod host_mounts;
mod linux;
mod security;
#[cfg(test)]
mod tests;

use linux::{
    container_resources, mounts, namespaces, non_empty_or, DEFAULT_MASKED, DEFAULT_READONLY,
};

pub use podvisor_proto::GUEST_MOUNTS_DIR;
/// PATH for containers whose image sets none (containerd's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The smallest memory limit a container or pod may have (Docker's floor: below it a container's own
/// setup is OOM-killed before its process runs).
pub const MIN_MEMORY_LIMIT: i64 = 6 << 20;
/// Signal number StopContainer sends when the image names none.
pub const SIGTERM: i32 = 15;

const SC: &str = "config.linux.security_context";
const RES: &str = "config.linux.resources";

/// An OCI runtime spec for the agent plus what the spec cannot carry.
#[derive(Debug, Clone)]
pub struct BuiltSpec {
    /// The OCI runtime spec (JSON); `root.path` is "rootfs", the agent replaces it.
    pub oci_spec_json: Vec<u8>,
    /// Docker-style `user[:group]` the guest must resolve against the image's /etc/passwd and
    /// /etc/group, overriding `process.user` uid/gid; numeric parts are literal ids, a missing
    /// group means the user's primary group (0 when the uid has no passwd entry). Empty when
    /// `process.user` is already final (numeric uid and gid, or nothing set: root).
    pub user: String,
    /// Signal number for StopContainer: the image's StopSignal, else SIGTERM.
    pub stop_signal: i32,
    /// CRI mounts the host must deliver into the guest before the container is created.
    pub mounts: Vec<HostMount>,
}

/// A CRI mount: host content to copy to `guest_source`, bind-mounted at `container_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMount {
    /// Absolute path on the node.
    pub host_path: PathBuf,
    /// Path in the guest the spec's bind mount uses as its source.
    pub guest_source: String,
    /// Absolute path inside the container.
    pub container_path: String,
    /// Mounted read-only in the container.
    pub readonly: bool,
}

/// Why a CRI container config cannot be turned into a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The request is wrong; the message starts with the CRI field path.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is valid CRI but a pod VM cannot do it; the message names the field.
    #[error("{0}")]
    Unimplemented(String),
    /// The node is not in a state the request needs (a mount that does not propagate).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Our OCI spec does not serialize.
    #[error("serializing the OCI spec: {0}")]
    Serialize(#[source] serde_json::Error),
}

fn invalid(field: impl Display, msg: impl Display) -> SpecError {
    SpecError::InvalidArgument(format!("{field}: {msg}"))
}

fn unimplemented(field: impl Display, msg: impl Display) -> SpecError {
    SpecError::Unimplemented(format!("{field}: {msg}"))
}

/// What the image config contributes (`config` of the OCI image config blob).
#[derive(Default)]
struct ImageDefaults {
    env: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    working_dir: String,
    user: String,
    stop_signal: String,
}

impl ImageDefaults {
    fn from_blob(blob: &Value) -> Self {
        let Some(c) = blob.get("config") else {
            return Self::default();
        };
        let list = |k: &str| -> Vec<String> {
            c.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let text = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        ImageDefaults {
            env: list("Env"),
            entrypoint: list("Entrypoint"),
            cmd: list("Cmd"),
            working_dir: text("WorkingDir"),
            user: text("User"),
            stop_signal: text("StopSignal"),
        }
    }
}

/// Builds the OCI runtime spec of container `container_id` of the pod configured by `pod`.
/// `image_config` is the image's whole OCI config blob.
pub fn container_spec(
    config: &ContainerConfig,
    pod: &PodSandboxConfig,
    image_config: &Value,
    kind: PodKind,
) -> Result<BuiltSpec, SpecError> {
    check_no_nul(config)?;
    let image = ImageDefaults::from_blob(image_config);
    if !config.devices.is_empty() {
        return Err(unimplemented(
            "config.devices",
            "device passthrough into the pod VM is not supported",
        ));
    }
    if !config.cdi_devices.is_empty() {
        return Err(unimplemented(
            "config.cdi_devices",
            "device passthrough into the pod VM is not supported",
        ));
    }
    let default_sc = LinuxContainerSecurityContext::default();
    let linux_cfg = config.linux.as_ref();
    let sc = linux_cfg
        .and_then(|l| l.security_context.as_ref())
        .unwrap_or(&default_sc);
    security::check_lsm(sc)?;

    let mut process = Process::default();
    process
        .set_args(Some(process_args(config, &image)?))
        .set_env(Some(environment(config, pod, &image)?))
        .set_cwd(working_dir(config, &image)?)
        .set_terminal(Some(config.tty))
        .set_rlimits(None)
        .set_no_new_privileges(sc.no_new_privs.then_some(true));
    let (user, to_resolve) = process_user(sc, &image)?;
    process.set_user(user);
    let caps = security::capabilities(
        sc.privileged,
        sc.capabilities.as_ref(),
        &security::privileged_set(kind),
    )?;
    let seccomp = security::seccomp(sc, &caps)?;
    process.set_capabilities(Some(caps));

    let mut linux = oci_spec::runtime::Linux::default();
    linux
        .set_namespaces(Some(namespaces(sc.namespace_options.as_ref(), kind)?))
        .set_seccomp(seccomp)
        .set_uid_mappings(None)
        .set_gid_mappings(None)
        .set_sysctl(None);
    if sc.privileged {
        linux.set_masked_paths(None).set_readonly_paths(None);
    } else {
        linux
            .set_masked_paths(Some(non_empty_or(&sc.masked_paths, DEFAULT_MASKED)))
            .set_readonly_paths(Some(non_empty_or(&sc.readonly_paths, DEFAULT_READONLY)));
    }
    let resources = resources(
        sc,
        linux_cfg.and_then(|l| l.resources.as_ref()),
        &mut process,
    )?;
    linux.set_resources(Some(resources));

    let cri_mounts = spec_mounts(config, sc, kind, &mut linux)?;
    if kind == PodKind::Native && sc.privileged {
        // containerd's WithHostDevices: the node's devices (the device cgroup allows them all).
        linux.set_devices(Some(host_devices::under(Path::new("/dev"))));
    }
    let mut root = Root::default();
    root.set_path(PathBuf::from("rootfs"))
        .set_readonly(Some(sc.readonly_rootfs));

    let mut spec = Spec::default();
    spec.set_version("1.1.0".to_string())
        .set_root(Some(root))
        .set_process(Some(process))
        // No hostname: containers share the pod's UTS namespace (the VM's, or the one a native
        // pod's agent runs in), whose hostname the agent sets.
        .set_hostname(None)
        .set_mounts(Some(cri_mounts.mounts))
        .set_annotations(Some(annotations(config, pod)))
        .set_linux(Some(linux));
    let oci_spec_json = serde_json::to_vec(&spec).map_err(SpecError::Serialize)?;
    Ok(BuiltSpec {
        oci_spec_json,
        user: to_resolve,
        stop_signal: stop_signal(&image.stop_signal)?,
        mounts: cri_mounts.copies,
    })
}

/// The container's OCI resources: its device rule (everything for privileged containers, nothing
/// otherwise) and the CRI resources; sets the process's `oom_score_adj`.
fn resources(
    sc: &LinuxContainerSecurityContext,
    cri: Option<&LinuxContainerResources>,
    process: &mut Process,
) -> Result<LinuxResources, SpecError> {
    let mut resources = LinuxResources::default();
    let mut device_rule = LinuxDeviceCgroup::default();
    device_rule
        .set_allow(sc.privileged)
        .set_access(Some("rwm".to_string()));
    resources.set_devices(Some(vec![device_rule]));
    if let Some(r) = cri {
        container_resources(r, &mut resources)?;
        let adj = i32::try_from(r.oom_score_adj)
            .ok()
            .filter(|a| (-1000..=1000).contains(a))
            .ok_or_else(|| invalid(format!("{RES}.oom_score_adj"), "must be in -1000..=1000"))?;
        process.set_oom_score_adj(Some(adj));
    }
    Ok(resources)
}

/// The container's mounts, with the rootfs propagation they need set on `linux`; on the node's IPC
/// namespace a native container gets the node's `/dev/shm`.
fn spec_mounts(
    config: &ContainerConfig,
    sc: &LinuxContainerSecurityContext,
    kind: PodKind,
    linux: &mut oci_spec::runtime::Linux,
) -> Result<linux::CriMounts, SpecError> {
    let mut cri_mounts = mounts(config, sc.privileged, kind)?;
    linux.set_rootfs_propagation(cri_mounts.rootfs_propagation.map(String::from));
    let node_ipc = sc
        .namespace_options
        .as_ref()
        .is_some_and(|n| n.ipc == NamespaceMode::Node as i32);
    if kind == PodKind::Native && node_ipc {
        linux::node_shm(&mut cri_mounts.mounts);
    }
    Ok(cri_mounts)
}

/// OCI resources for UpdateContainerResources; errors name the request field (`linux.<field>`).
pub fn oci_resources(r: &LinuxContainerResources) -> Result<LinuxResources, SpecError> {
    resources_at("linux", r)
}

/// Checks CRI resources as CreateContainer does, naming fields under `prefix` (a pod's
/// `config.linux.resources`, its `config.linux.overhead`, an update's `linux`); returns them in OCI form.
pub fn resources_at(
    prefix: &str,
    r: &LinuxContainerResources,
) -> Result<LinuxResources, SpecError> {
    let mut resources = LinuxResources::default();
    let rename = |m: String| m.replacen(RES, prefix, 1);
    container_resources(r, &mut resources).map_err(|e| match e {
        SpecError::InvalidArgument(m) => SpecError::InvalidArgument(rename(m)),
        SpecError::Unimplemented(m) => SpecError::Unimplemented(rename(m)),
        other => other,
    })?;
    Ok(resources)
}

/// Docker's rules: CRI command replaces Entrypoint (and drops Cmd), CRI args replace Cmd.
fn process_args(config: &ContainerConfig, image: &ImageDefaults) -> Result<Vec<String>, SpecError> {
    let mut args = config.command.clone();
    if args.is_empty() {
        if !(image.entrypoint.len() == 1 && image.entrypoint[0].is_empty()) {
            args = image.entrypoint.clone();
        }
        if config.args.is_empty() {
            args.extend(image.cmd.iter().cloned());
        }
    }
    args.extend(config.args.iter().cloned());
    if args.is_empty() {
        return Err(invalid(
            "config.command",
            "no command specified and the image has none",
        ));
    }
    Ok(args)
}

/// Refuses NUL bytes in the fields that become C strings in the guest (arguments, environment,
/// paths): they would fail deep in the guest with a message naming no field.
fn check_no_nul(config: &ContainerConfig) -> Result<(), SpecError> {
    let lists = [
        ("config.command", &config.command),
        ("config.args", &config.args),
    ];
    for (field, list) in lists {
        if let Some(i) = list.iter().position(|a| a.contains('\0')) {
            return Err(invalid(format!("{field}[{i}]"), "contains a NUL byte"));
        }
    }
    if let Some(i) = config.envs.iter().position(|kv| kv.value.contains('\0')) {
        return Err(invalid(
            format!("config.envs[{i}].value"),
            "contains a NUL byte",
        ));
    }
    for (i, m) in config.mounts.iter().enumerate() {
        for (name, v) in [
            ("host_path", &m.host_path),
            ("container_path", &m.container_path),
        ] {
            if v.contains('\0') {
                return Err(invalid(
                    format!("config.mounts[{i}].{name}"),
                    "contains a NUL byte",
                ));
            }
        }
    }
    for (field, v) in [
        ("config.working_dir", &config.working_dir),
        ("config.log_path", &config.log_path),
    ] {
        if v.contains('\0') {
            return Err(invalid(field, "contains a NUL byte"));
        }
    }
    Ok(())
}

/// Image Env, then HOSTNAME, then CRI envs, later keys replacing earlier ones in place.
fn environment(
    config: &ContainerConfig,
    pod: &PodSandboxConfig,
    image: &ImageDefaults,
) -> Result<Vec<String>, SpecError> {
    fn set(env: &mut Vec<String>, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        let prefix = format!("{key}=");
        match env.iter_mut().find(|e| e.starts_with(&prefix) || *e == key) {
            Some(e) => *e = entry,
            None => env.push(entry),
        }
    }
    let mut env = image.env.clone();
    if !pod.hostname.is_empty() {
        set(&mut env, "HOSTNAME", &pod.hostname);
    }
    for (i, kv) in config.envs.iter().enumerate() {
        if kv.key.is_empty() || kv.key.contains('=') || kv.key.contains('\0') {
            return Err(invalid(
                format!("config.envs[{i}].key"),
                format!("invalid environment variable name {:?}", kv.key),
            ));
        }
        set(&mut env, &kv.key, &kv.value);
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    Ok(env)
}

fn working_dir(config: &ContainerConfig, image: &ImageDefaults) -> Result<PathBuf, SpecError> {
    let (dir, field) = if !config.working_dir.is_empty() {
        (config.working_dir.as_str(), "config.working_dir")
    } else if !image.working_dir.is_empty() {
        (image.working_dir.as_str(), "image config WorkingDir")
    } else {
        ("/", "")
    };
    if !dir.starts_with('/') {
        return Err(invalid(field, format!("{dir:?} is not an absolute path")));
    }
    Ok(PathBuf::from(dir))
}

fn id(field: String, v: i64) -> Result<u32, SpecError> {
    u32::try_from(v).map_err(|_| invalid(field, format!("{v} is not a valid id")))
}

/// The numeric `process.user` plus the `user[:group]` string the guest must resolve ("" if none).
fn process_user(
    sc: &LinuxContainerSecurityContext,
    image: &ImageDefaults,
) -> Result<(User, String), SpecError> {
    let spec = if !sc.run_as_username.is_empty() || sc.run_as_user.is_some() {
        let user = if sc.run_as_username.is_empty() {
            let uid = sc.run_as_user.as_ref().map_or(0, |u| u.value);
            id(format!("{SC}.run_as_user"), uid)?.to_string()
        } else {
            sc.run_as_username.clone()
        };
        match &sc.run_as_group {
            Some(g) => format!("{user}:{}", id(format!("{SC}.run_as_group"), g.value)?),
            None => user,
        }
    } else if sc.run_as_group.is_some() {
        return Err(invalid(
            format!("{SC}.run_as_group"),
            "set without run_as_user or run_as_username",
        ));
    } else {
        image.user.clone()
    };
    let (name, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec.as_str(), None),
    };
    let uid = name.parse::<u32>().ok();
    let gid = group.and_then(|g| g.parse::<u32>().ok());
    let mut user = User::default();
    user.set_uid(uid.unwrap_or(0)).set_gid(gid.unwrap_or(0));
    let groups = sc
        .supplemental_groups
        .iter()
        .enumerate()
        .map(|(i, g)| id(format!("{SC}.supplemental_groups[{i}]"), *g))
        .collect::<Result<Vec<u32>, _>>()?;
    user.set_additional_gids((!groups.is_empty()).then_some(groups));
    let settled = spec.is_empty() || (uid.is_some() && gid.is_some());
    Ok((user, if settled { String::new() } else { spec }))
}

/// CRI annotations plus the io.kubernetes.cri.* ones containerd sets on containers.
fn annotations(config: &ContainerConfig, pod: &PodSandboxConfig) -> HashMap<String, String> {
    let mut a = config.annotations.clone();
    let mut put = |k: &str, v: &str| {
        a.insert(format!("io.kubernetes.cri.{k}"), v.to_string());
    };
    put("container-type", "container");
    if let Some(m) = &config.metadata {
        put("container-name", &m.name);
    }
    if let Some(m) = &pod.metadata {
        put("sandbox-name", &m.name);
        put("sandbox-namespace", &m.namespace);
        put("sandbox-uid", &m.uid);
    }
    if let Some(i) = &config.image {
        let name = if i.user_specified_image.is_empty() {
            &i.image
        } else {
            &i.user_specified_image
        };
        put("image-name", name);
    }
    a
}

/// x86_64 signal numbers by name (without "SIG").
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];
const SIGRTMIN: i32 = 34;
const SIGRTMAX: i32 = 64;

/// Parses an image StopSignal ("SIGTERM", "TERM", "15", "SIGRTMIN+3"); "" is SIGTERM.
fn stop_signal(s: &str) -> Result<i32, SpecError> {
    let field = "image config StopSignal";
    if s.is_empty() {
        return Ok(SIGTERM);
    }
    let bad = || invalid(field, format!("unknown signal {s:?}"));
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=SIGRTMAX).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, n)) = SIGNALS.iter().find(|(k, _)| *k == name) {
        return Ok(n);
    }
    let rt = |base: i32, rest: &str, sign: i32| -> Result<i32, SpecError> {
        let off = if rest.is_empty() {
            0
        } else {
            rest.parse::<i32>().map_err(|_| bad())?
        };
        let n = base + sign * off;
        if (SIGRTMIN..=SIGRTMAX).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        }
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        if rest.is_empty() || rest.starts_with('+') {
            return rt(SIGRTMIN, rest.trim_start_matches('+'), 1);
        }
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        if rest.is_empty() || rest.starts_with('-') {
            return rt(SIGRTMAX, rest.trim_start_matches('-'), -1);
        }
    }
    Err(bad())
}

//! Checks the OCI runtime spec the host sends and rewrites the parts the agent owns: the root, the cgroup
//! path, the pod-shared namespaces, the pod's /etc files, and the user named in the image's /etc/passwd.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, Mount, MountBuilder, Process,
    RootBuilder, Spec,
};

use podvisor_proto::AVOID_AVX_GLIBC_TUNABLES;

use super::ContainerError;

/// Guest directories a bind mount may take its source from.
pub const BIND_SOURCE_ROOTS: [&str; 2] = [
    podvisor_proto::DEFAULT_STORAGE_ROOT,
    crate::sandbox::FILES_DIR,
];

/// The pod files every container gets unless its spec mounts something there.
const POD_FILES: [&str; 3] = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"];

/// What the agent decides for every container of this pod.
#[derive(Debug, Clone)]
pub struct PodContext {
    /// The host said the guest kernel runs with `noxsave` (`CreateSandboxRequest::avoid_avx`; PVM hosts:
    /// the emulator cannot execute XSAVE in kernel mode), so it preserves only x87/SSE registers across
    /// context switches while user space runs natively with the host's XCR0: two processes using AVX
    /// corrupt each other's YMM state (seen as random SIGSEGVs in glibc start-up code, ~1 in 6 execs).
    /// glibc programs are then told to avoid AVX via GLIBC_TUNABLES.
    pub avoid_avx: bool,
    /// Directory holding `hostname`, `hosts` and `resolv.conf`.
    pub files_dir: PathBuf,
    /// PID namespace to join (shared pod PID namespace), or a new one per container.
    pub pid_namespace: Option<PathBuf>,
    /// A native pod sharing the node's PID namespace: containers get no PID namespace of their own.
    pub host_pid: bool,
    /// Directories bind mounts may take their source from; empty on the node, where a native pod's
    /// mounts are the node's paths (as runc takes them; the host checked them).
    pub bind_roots: Vec<PathBuf>,
}

impl PodContext {
    /// The context of a pod VM: [`BIND_SOURCE_ROOTS`], pod files in `files_dir`.
    pub fn guest(files_dir: PathBuf) -> Self {
        Self {
            avoid_avx: false,
            files_dir,
            pid_namespace: None,
            host_pid: false,
            bind_roots: BIND_SOURCE_ROOTS.iter().map(PathBuf::from).collect(),
        }
    }
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> ContainerError {
    ContainerError::InvalidArgument(format!("{field}: {msg}"))
}

/// An absolute path with no `..` (what a container path may be).
pub fn check_absolute(field: &str, path: &Path) -> Result<(), ContainerError> {
    if !path.is_absolute() {
        return Err(invalid(
            field,
            format!("{} is not absolute", path.display()),
        ));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(invalid(field, format!("{} contains '..'", path.display())));
    }
    Ok(())
}

/// Parses and checks a spec, then applies the agent's decisions. `cgroup` is the cgroup path to use.
pub fn prepare(json: &[u8], cgroup: &str, pod: &PodContext) -> Result<Spec, ContainerError> {
    let mut spec: Spec = serde_json::from_slice(json).map_err(|e| invalid("oci_spec_json", e))?;
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| invalid("oci_spec_json.process", "missing"))?;
    check_process("oci_spec_json.process", process)?;
    if pod.avoid_avx {
        avoid_avx(process);
    }
    if spec.hooks().is_some() {
        return Err(invalid(
            "oci_spec_json.hooks",
            "hooks are not supported in the guest",
        ));
    }
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(readonly)
            .build()
            .map_err(|e| invalid("oci_spec_json.root", e))?,
    ));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (i, m) in mounts.iter().enumerate() {
        check_mount(&format!("oci_spec_json.mounts[{i}]"), m, &pod.bind_roots)?;
    }
    for file in POD_FILES {
        if !mounts.iter().any(|m| m.destination() == Path::new(file)) {
            let name = Path::new(file).file_name().expect("file name");
            let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
            if readonly {
                options.push("ro".into());
            }
            mounts.push(
                MountBuilder::default()
                    .destination(file)
                    .typ("bind")
                    .source(pod.files_dir.join(name))
                    .options(options)
                    .build()
                    .map_err(|e| invalid("oci_spec_json.mounts", e))?,
            );
        }
    }
    spec.set_mounts(Some(mounts));
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| invalid("oci_spec_json.linux", "missing"))?;
    linux.set_cgroups_path(Some(cgroup.into()));
    let namespaces = pod_namespaces(linux.namespaces().clone().unwrap_or_default(), pod)?;
    linux.set_namespaces(Some(namespaces));
    if linux.uid_mappings().is_some() || linux.gid_mappings().is_some() {
        return Err(invalid(
            "oci_spec_json.linux.uidMappings",
            "user namespaces are not supported in the guest",
        ));
    }
    Ok(spec)
}

/// The namespaces of a container of `pod` from those its spec lists: the pod's network, UTS and IPC
/// (the agent's own: the VM's, or those a native pod's agent runs in), a new mount (and cgroup)
/// namespace, and a new, the pod's shared, or (host PID) no PID namespace.
fn pod_namespaces(
    given: Vec<LinuxNamespace>,
    pod: &PodContext,
) -> Result<Vec<LinuxNamespace>, ContainerError> {
    let mut namespaces = Vec::new();
    for ns in given {
        match ns.typ() {
            // The VM is the pod: containers share its network, hostname and IPC.
            LinuxNamespaceType::Network | LinuxNamespaceType::Uts | LinuxNamespaceType::Ipc => {}
            LinuxNamespaceType::Pid => {}
            LinuxNamespaceType::Mount | LinuxNamespaceType::Cgroup => {
                if ns.path().is_some() {
                    return Err(invalid(
                        "oci_spec_json.linux.namespaces",
                        format!(
                            "joining an existing {} namespace is not supported",
                            ns.typ()
                        ),
                    ));
                }
                namespaces.push(ns);
            }
            other => {
                return Err(invalid(
                    "oci_spec_json.linux.namespaces",
                    format!("{other} namespaces are not supported in the guest"),
                ))
            }
        }
    }
    if !namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Mount)
    {
        namespaces.push(namespace(LinuxNamespaceType::Mount, None)?);
    }
    if !pod.host_pid {
        namespaces.push(namespace(
            LinuxNamespaceType::Pid,
            pod.pid_namespace.clone(),
        )?);
    }
    Ok(namespaces)
}

fn namespace(
    typ: LinuxNamespaceType,
    path: Option<PathBuf>,
) -> Result<LinuxNamespace, ContainerError> {
    let mut b = LinuxNamespaceBuilder::default().typ(typ);
    if let Some(path) = path {
        b = b.path(path);
    }
    b.build()
        .map_err(|e| invalid("oci_spec_json.linux.namespaces", e))
}

/// Adds [`AVOID_AVX_GLIBC_TUNABLES`] to the process's GLIBC_TUNABLES (kept if the process sets its own hwcaps).
pub fn avoid_avx(process: &mut Process) {
    let mut env = process.env().clone().unwrap_or_default();
    match env.iter_mut().find(|e| e.starts_with("GLIBC_TUNABLES=")) {
        Some(e) if e.contains("glibc.cpu.hwcaps=") => {}
        Some(e) => {
            e.push(':');
            e.push_str(AVOID_AVX_GLIBC_TUNABLES);
        }
        None => env.push(format!("GLIBC_TUNABLES={AVOID_AVX_GLIBC_TUNABLES}")),
    }
    process.set_env(Some(env));
}

/// Checks an OCI process (container entry point or exec).
pub fn check_process(field: &str, process: &Process) -> Result<(), ContainerError> {
    match process.args() {
        Some(args) if !args.is_empty() && !args[0].is_empty() => {}
        _ => return Err(invalid(&format!("{field}.args"), "empty")),
    }
    check_absolute(&format!("{field}.cwd"), process.cwd())?;
    for (i, env) in process.env().iter().flatten().enumerate() {
        if !env.contains('=') || env.starts_with('=') {
            return Err(invalid(
                &format!("{field}.env[{i}]"),
                format!("{env:?} is not NAME=value"),
            ));
        }
    }
    Ok(())
}

/// Makes `process` run as `user`: uid, gid, supplementary groups (the spec's — CRI supplemental groups
/// and fsGroup — merged with the user's groups in the image, containerd's default `Merge` policy), and
/// HOME unless the environment sets it.
pub fn apply_user(process: &mut Process, user: ResolvedUser) {
    let mut oci_user = process.user().clone();
    let mut gids = oci_user.additional_gids().clone().unwrap_or_default();
    gids.extend(user.additional_gids);
    gids.sort_unstable();
    gids.dedup();
    oci_user.set_uid(user.uid);
    oci_user.set_gid(user.gid);
    oci_user.set_additional_gids(Some(gids));
    process.set_user(oci_user);
    let mut env = process.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
        process.set_env(Some(env));
    }
}

/// Sets HOME, when the environment has none, to the home directory of the process's uid in the image's
/// /etc/passwd under `rootfs`, else `/` (as runc does).
pub fn default_home(process: &mut Process, rootfs: &Path) {
    let mut env = process.env().clone().unwrap_or_default();
    if env.iter().any(|e| e.starts_with("HOME=")) {
        return;
    }
    let uid = process.user().uid().to_string();
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let home = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[2] == uid)
        .map(|f| f[5].to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".into());
    env.push(format!("HOME={home}"));
    process.set_env(Some(env));
}

/// The process of an exec in a container whose own process (as created: user resolved, HOME set) is
/// `container`: everything the container's process has (user and groups, env, cwd, capabilities,
/// no_new_privileges, rlimits, oom_score_adj, apparmor/selinux, umask...) with `args` and `terminal`
/// replaced, as containerd builds exec processes. `args` is checked (field `args`).
pub fn exec_process(
    container: &Process,
    args: &[String],
    terminal: bool,
) -> Result<Process, ContainerError> {
    if args.first().is_none_or(|a| a.is_empty()) {
        return Err(invalid("args", "empty"));
    }
    if let Some(i) = args.iter().position(|a| a.contains('\0')) {
        return Err(invalid(&format!("args[{i}]"), "contains a NUL byte"));
    }
    let mut process = container.clone();
    process
        .set_args(Some(args.to_vec()))
        .set_terminal(Some(terminal))
        .set_console_size(None);
    Ok(process)
}

fn check_mount(field: &str, m: &Mount, roots: &[PathBuf]) -> Result<(), ContainerError> {
    check_absolute(&format!("{field}.destination"), m.destination())?;
    let bind = m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind");
    if bind {
        let source = m
            .source()
            .as_ref()
            .ok_or_else(|| invalid(&format!("{field}.source"), "a bind mount needs a source"))?;
        check_absolute(&format!("{field}.source"), source)?;
        if !roots.is_empty() && !roots.iter().any(|root| source.starts_with(root)) {
            let roots: Vec<_> = roots.iter().map(|r| r.display().to_string()).collect();
            return Err(invalid(
                &format!("{field}.source"),
                format!(
                    "{} is outside the guest directories a container may bind ({})",
                    source.display(),
                    roots.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// A user resolved from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups from /etc/group.
    pub additional_gids: Vec<u32>,
    /// Home directory (for HOME).
    pub home: String,
}

/// Resolves `user` ("name", "uid", "name:group", "uid:gid") against the image's `etc/passwd` and
/// `etc/group` under `rootfs`. Numeric ids need no entry (as runc).
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<ResolvedUser, ContainerError> {
    let (name, group) = match user.split_once(':') {
        Some((n, g)) => (n, Some(g)),
        None => (user, None),
    };
    if name.is_empty() {
        return Err(invalid("user", "empty user name"));
    }
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let groups = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let entry = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && (f[0] == name || f[2] == name)).then(|| {
            (
                f[0].to_string(),
                f[2].parse::<u32>().ok(),
                f[3].parse::<u32>().ok(),
                f[5].to_string(),
            )
        })
    });
    let (user_name, uid, mut gid, home) = match (entry, name.parse::<u32>()) {
        (Some((n, Some(uid), Some(gid), home)), _) => (n, uid, gid, home),
        (None, Ok(uid)) => (String::new(), uid, 0, "/".to_string()),
        _ => {
            return Err(invalid(
                "user",
                format!("no user {name:?} in the image's /etc/passwd"),
            ))
        }
    };
    let group_line = |want: &str| {
        groups.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 3 && (f[0] == want || f[2] == want)).then(|| f[2].parse::<u32>().ok())?
        })
    };
    if let Some(group) = group {
        gid = match (group_line(group), group.parse::<u32>()) {
            (Some(g), _) | (None, Ok(g)) => g,
            _ => {
                return Err(invalid(
                    "user",
                    format!("no group {group:?} in the image's /etc/group"),
                ))
            }
        };
    }
    let mut additional_gids: Vec<u32> = groups
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            let member =
                f.len() >= 4 && !user_name.is_empty() && f[3].split(',').any(|m| m == user_name);
            member.then(|| f[2].parse::<u32>().ok()).flatten()
        })
        .filter(|g| *g != gid)
        .collect();
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests;

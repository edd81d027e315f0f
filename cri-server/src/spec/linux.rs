//! The Linux parts of a container spec: namespaces, resources, masked paths and mounts.

use std::path::{Component, Path, PathBuf};

use k8s_cri::v1::{
    ContainerConfig, LinuxContainerResources, MountPropagation, NamespaceMode, NamespaceOption,
};
use oci_spec::runtime::{
    LinuxCpu, LinuxMemory, LinuxNamespace, LinuxNamespaceType, LinuxResources, Mount,
};

use super::{invalid, unimplemented, HostMount, SpecError, GUEST_MOUNTS_DIR, RES, SC};
use crate::pod::PodKind;

/// The namespaces a container spec lists (like `runc spec`); the agent points them at the pod's. A
/// native pod's agent runs in the pod's namespaces (or the node's where the pod shares them).
pub(super) fn namespaces(
    opts: Option<&NamespaceOption>,
    kind: PodKind,
) -> Result<Vec<LinuxNamespace>, SpecError> {
    let field = format!("{SC}.namespace_options");
    if let Some(o) = opts.filter(|_| kind == PodKind::Vm) {
        let mode = |v: i32| NamespaceMode::try_from(v).ok();
        match mode(o.pid) {
            Some(NamespaceMode::Pod | NamespaceMode::Container) => {}
            _ => {
                return Err(unimplemented(
                    format!("{field}.pid"),
                    "only POD and CONTAINER PID namespaces exist in a pod VM",
                ))
            }
        }
        for (name, v) in [("network", o.network), ("ipc", o.ipc)] {
            if !matches!(mode(v), Some(NamespaceMode::Pod | NamespaceMode::Container)) {
                return Err(unimplemented(
                    format!("{field}.{name}"),
                    "the pod VM is the pod: node and target namespaces do not exist in it",
                ));
            }
        }
        if let Some(u) = &o.userns_options {
            if mode(u.mode) != Some(NamespaceMode::Node) {
                return Err(unimplemented(
                    format!("{field}.userns_options"),
                    "user namespaces are not supported",
                ));
            }
        }
    }
    if let Some(u) = opts.and_then(|o| o.userns_options.as_ref()) {
        if NamespaceMode::try_from(u.mode).ok() != Some(NamespaceMode::Node) {
            return Err(unimplemented(
                format!("{field}.userns_options"),
                "user namespaces are not supported",
            ));
        }
    }
    let ns = |typ| {
        let mut n = LinuxNamespace::default();
        n.set_typ(typ);
        n
    };
    Ok(vec![
        ns(LinuxNamespaceType::Pid),
        ns(LinuxNamespaceType::Network),
        ns(LinuxNamespaceType::Ipc),
        ns(LinuxNamespaceType::Uts),
        ns(LinuxNamespaceType::Mount),
    ])
}

fn non_negative(name: &str, v: i64) -> Result<i64, SpecError> {
    if v < 0 {
        return Err(invalid(format!("{RES}.{name}"), format!("{v} is negative")));
    }
    Ok(v)
}

fn cpu_list(name: &str, v: &str) -> Result<Option<String>, SpecError> {
    let ok = v.split(',').all(|part| {
        part.split('-')
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    match (v.is_empty(), ok) {
        (true, _) => Ok(None),
        (false, true) => Ok(Some(v.to_string())),
        (false, false) => Err(invalid(
            format!("{RES}.{name}"),
            format!("{v:?} is not a list"),
        )),
    }
}

/// Where the guest keeps the content of host path `host_path`: one copy per pod and host path, so
/// containers mounting the same volume (an emptyDir) share it.
pub(super) fn guest_mount_source(host_path: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(host_path.as_bytes());
    format!("{GUEST_MOUNTS_DIR}/{}", hex::encode(&digest[..16]))
}

/// CRI container resources → OCI (cgroup v2 inside the guest).
pub(super) fn container_resources(
    r: &LinuxContainerResources,
    out: &mut LinuxResources,
) -> Result<(), SpecError> {
    let period = non_negative("cpu_period", r.cpu_period)?;
    let quota = non_negative("cpu_quota", r.cpu_quota)?;
    let shares = non_negative("cpu_shares", r.cpu_shares)?;
    if period != 0 && !(1_000..=1_000_000).contains(&period) {
        return Err(invalid(
            format!("{RES}.cpu_period"),
            "must be in 1000..=1000000 µs",
        ));
    }
    if quota != 0 && period == 0 {
        return Err(invalid(
            format!("{RES}.cpu_quota"),
            "set without cpu_period",
        ));
    }
    if quota != 0 && quota < 1_000 {
        return Err(invalid(
            format!("{RES}.cpu_quota"),
            "must be at least 1000 µs",
        ));
    }
    if shares > 262_144 {
        return Err(invalid(
            format!("{RES}.cpu_shares"),
            "must be at most 262144",
        ));
    }
    let mut cpu = LinuxCpu::default();
    cpu.set_period((period != 0).then_some(period as u64))
        .set_quota((quota != 0).then_some(quota))
        .set_shares((shares != 0).then_some(shares as u64))
        .set_cpus(cpu_list("cpuset_cpus", &r.cpuset_cpus)?)
        .set_mems(cpu_list("cpuset_mems", &r.cpuset_mems)?);
    if cpu != LinuxCpu::default() {
        out.set_cpu(Some(cpu));
    }
    let limit = non_negative("memory_limit_in_bytes", r.memory_limit_in_bytes)?;
    let swap = non_negative("memory_swap_limit_in_bytes", r.memory_swap_limit_in_bytes)?;
    if swap != 0 && limit == 0 {
        return Err(invalid(
            format!("{RES}.memory_swap_limit_in_bytes"),
            "set without memory_limit_in_bytes",
        ));
    }
    if swap != 0 && swap < limit {
        return Err(invalid(
            format!("{RES}.memory_swap_limit_in_bytes"),
            "is memory plus swap: it cannot be below memory_limit_in_bytes",
        ));
    }
    if limit != 0 && limit < super::MIN_MEMORY_LIMIT {
        return Err(invalid(
            format!("{RES}.memory_limit_in_bytes"),
            format!(
                "{limit} is below the {} MiB minimum",
                super::MIN_MEMORY_LIMIT >> 20
            ),
        ));
    }
    if limit != 0 {
        let mut memory = LinuxMemory::default();
        memory
            .set_limit(Some(limit))
            .set_swap(Some(if swap != 0 { swap } else { limit }));
        out.set_memory(Some(memory));
    }
    if let Some(h) = r.hugepage_limits.iter().find(|h| h.limit != 0) {
        return Err(unimplemented(
            format!("{RES}.hugepage_limits"),
            format!(
                "hugepages ({}) are not supported in the pod VM",
                h.page_size
            ),
        ));
    }
    for key in r.unified.keys() {
        let valid = key
            .split_once('.')
            .is_some_and(|(c, f)| !c.is_empty() && !f.is_empty())
            && !key.contains('/');
        if !valid {
            return Err(invalid(
                format!("{RES}.unified"),
                format!("{key:?} is not a cgroup v2 file name"),
            ));
        }
    }
    if !r.unified.is_empty() {
        out.set_unified(Some(r.unified.clone()));
    }
    Ok(())
}

/// containerd's default masked paths.
pub(super) const DEFAULT_MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// containerd's default read-only paths.
pub(super) const DEFAULT_READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

pub(super) fn non_empty_or(given: &[String], default: &[&str]) -> Vec<String> {
    if given.is_empty() {
        default.iter().map(|s| s.to_string()).collect()
    } else {
        given.to_vec()
    }
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest))
        .set_typ(Some(typ.to_string()))
        .set_source(Some(PathBuf::from(source)))
        .set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

/// `runc spec`'s mounts (sysfs and cgroup2 writable when privileged) followed by the CRI mounts.
pub(super) fn mounts(
    config: &ContainerConfig,
    privileged: bool,
    kind: PodKind,
) -> Result<CriMounts, SpecError> {
    let sys_mode = if privileged { "rw" } else { "ro" };
    // On the node, runc's type: the runtime mounts the node's hierarchy (v1 or v2) read-only.
    let cgroup_type = match kind {
        PodKind::Vm => "cgroup2",
        PodKind::Native => "cgroup",
    };
    let mut standard = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_mode],
        ),
        mount(
            "/sys/fs/cgroup",
            cgroup_type,
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_mode],
        ),
    ];
    let mut cri = Vec::new();
    let mut host = Vec::new();
    let mut rootfs_propagation = None;
    for (i, m) in config.mounts.iter().enumerate() {
        let field = format!("config.mounts[{i}]");
        let clean = cri_mount_destination(&field, m, kind)?;
        standard.retain(|s| s.destination() != &clean);
        if kind == PodKind::Native {
            let (spec_mount, propagation) = super::host_mounts::bind(&field, m, &clean)?;
            rootfs_propagation = super::host_mounts::stronger(rootfs_propagation, propagation);
            cri.push(spec_mount);
            continue;
        }
        let guest_source = guest_mount_source(&m.host_path);
        let mode = if m.readonly { "ro" } else { "rw" };
        let mut spec_mount = mount("", "bind", &guest_source, &["rbind", "rprivate", mode]);
        spec_mount.set_destination(clean.clone());
        cri.push(spec_mount);
        host.push(HostMount {
            host_path: PathBuf::from(&m.host_path),
            guest_source,
            container_path: clean.to_string_lossy().into_owned(),
            readonly: m.readonly,
        });
    }
    // Parents before children, whatever order kubelet sent them in (as containerd).
    cri.sort_by_key(|m| m.destination().components().count());
    standard.extend(cri);
    Ok(CriMounts {
        mounts: standard,
        copies: host,
        rootfs_propagation,
    })
}

/// Checks CRI mount `m` (field `field`) of a pod of `kind`; returns its normalised destination ("//a/./b/"
/// is "/a/b", so duplicates and ordering compare paths).
fn cri_mount_destination(
    field: &str,
    m: &k8s_cri::v1::Mount,
    kind: PodKind,
) -> Result<PathBuf, SpecError> {
    if m.image.is_some() {
        return Err(unimplemented(
            format!("{field}.image"),
            "image volumes are not supported",
        ));
    }
    if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
        return Err(unimplemented(
            format!("{field}.uid_mappings"),
            "id-mapped mounts are not supported",
        ));
    }
    if m.propagation != MountPropagation::PropagationPrivate as i32 && kind == PodKind::Vm {
        return Err(unimplemented(
            format!("{field}.propagation"),
            "only PROPAGATION_PRIVATE mounts can be delivered into the pod VM",
        ));
    }
    if !Path::new(&m.host_path).is_absolute() {
        return Err(invalid(
            format!("{field}.host_path"),
            format!("{:?} is not an absolute path", m.host_path),
        ));
    }
    let dest = Path::new(&m.container_path);
    if !dest.is_absolute() || dest.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(
            format!("{field}.container_path"),
            format!("{:?} must be absolute without \"..\"", m.container_path),
        ));
    }
    if m.recursive_read_only && !m.readonly {
        return Err(invalid(
            format!("{field}.recursive_read_only"),
            "requires readonly",
        ));
    }
    Ok(dest.components().collect())
}

/// Gives a container of a pod on the node's IPC namespace the node's `/dev/shm` (as containerd), in
/// place of its own tmpfs; a CRI mount at `/dev/shm` stays.
pub(super) fn node_shm(mounts: &mut [Mount]) {
    let own = mounts
        .iter_mut()
        .find(|m| m.destination() == Path::new("/dev/shm") && m.typ().as_deref() == Some("tmpfs"));
    if let Some(m) = own {
        *m = mount("/dev/shm", "bind", "/dev/shm", &["rbind", "rprivate", "rw"]);
    }
}

/// A container's mounts.
pub(super) struct CriMounts {
    /// The spec's mounts: runc's standard ones and the CRI mounts.
    pub mounts: Vec<Mount>,
    /// What the host copies into a pod VM before the container is created.
    pub copies: Vec<HostMount>,
    /// The rootfs propagation the CRI mounts need (`slave`, `shared`; native pods only).
    pub rootfs_propagation: Option<&'static str>,
}

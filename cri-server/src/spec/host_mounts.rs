//! CRI mounts of native pods: binds of the node's paths, as containerd gives them to runc — the host
//! path created as a directory when missing and its symlinks resolved, the CRI propagation as
//! `rprivate`/`rslave`/`rshared` (with the rootfs propagation it needs), and the node's mount checked
//! to be shared (Bidirectional) or shared or slave (HostToContainer).

use std::path::{Path, PathBuf};

use k8s_cri::v1::{Mount as CriMount, MountPropagation};
use oci_spec::runtime::Mount;
use procfs::process::MountOptFields;

use super::{invalid, unimplemented, SpecError};

/// The spec mount of CRI mount `m` (field `field`) at `dest`, and the rootfs propagation it needs
/// (`slave`, `shared`).
pub(super) fn bind(
    field: &str,
    m: &CriMount,
    dest: &Path,
) -> Result<(Mount, Option<&'static str>), SpecError> {
    if m.recursive_read_only {
        return Err(unimplemented(
            format!("{field}.recursive_read_only"),
            "the native handler does not offer recursive read-only mounts",
        ));
    }
    let source = host_source(field, &m.host_path)?;
    let (propagation, rootfs) = match MountPropagation::try_from(m.propagation) {
        Ok(MountPropagation::PropagationPrivate) => ("rprivate", None),
        Ok(MountPropagation::PropagationHostToContainer) => {
            check_propagation(field, &source, false)?;
            ("rslave", Some("slave"))
        }
        Ok(MountPropagation::PropagationBidirectional) => {
            check_propagation(field, &source, true)?;
            ("rshared", Some("shared"))
        }
        Err(_) => {
            return Err(invalid(
                format!("{field}.propagation"),
                format!("{} is not a propagation mode", m.propagation),
            ))
        }
    };
    let mode = if m.readonly { "ro" } else { "rw" };
    let mut mount = Mount::default();
    mount
        .set_destination(dest.to_path_buf())
        .set_typ(Some("bind".into()))
        .set_source(Some(source))
        .set_options(Some(vec!["rbind".into(), propagation.into(), mode.into()]));
    Ok((mount, rootfs))
}

/// The rootfs propagation that serves both `a` and `b` (`shared` over `slave`; the OCI spec's values,
/// which the engine applies recursively).
pub(super) fn stronger(a: Option<&'static str>, b: Option<&'static str>) -> Option<&'static str> {
    match (a, b) {
        (Some("shared"), _) | (_, Some("shared")) => Some("shared"),
        (a, b) => a.or(b),
    }
}

/// The host path as the container gets it: created as a directory when missing, symlinks resolved
/// (containerd: MkdirAll, then EvalSymlinks).
fn host_source(field: &str, host_path: &str) -> Result<PathBuf, SpecError> {
    let path = Path::new(host_path);
    let failed = |what: &str, e: std::io::Error| {
        invalid(
            format!("{field}.host_path"),
            format!("{what} {}: {e}", crate::text::echo(host_path)),
        )
    };
    match std::fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|e| failed("creating", e))?;
        }
        Err(e) => return Err(failed("reading", e)),
    }
    std::fs::canonicalize(path).map_err(|e| failed("resolving", e))
}

/// Checks that the node mount holding `path` propagates: shared for Bidirectional, shared or slave
/// for HostToContainer (containerd's ensureShared / ensureSharedOrSlave).
fn check_propagation(field: &str, path: &Path, need_shared: bool) -> Result<(), SpecError> {
    let infos = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|e| invalid(format!("{field}.host_path"), format!("mountinfo: {e}")))?;
    let holder = infos
        .into_iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count());
    let Some(holder) = holder else {
        return Err(invalid(
            format!("{field}.host_path"),
            format!("no mount holds {}", path.display()),
        ));
    };
    let shared = holder
        .opt_fields
        .iter()
        .any(|f| matches!(f, MountOptFields::Shared(_)));
    let slave = holder
        .opt_fields
        .iter()
        .any(|f| matches!(f, MountOptFields::Master(_)));
    let (ok, what) = if need_shared {
        (shared, "a shared mount (Bidirectional)")
    } else {
        (shared || slave, "a shared or slave mount (HostToContainer)")
    };
    if ok {
        return Ok(());
    }
    Err(SpecError::FailedPrecondition(format!(
        "{field}.propagation: {} is mounted on {} but it is not {what}",
        path.display(),
        holder.mount_point.display()
    )))
}

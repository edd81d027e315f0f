//! cgroup v1 specifics: the host's hierarchies, libcgroups' v1 manager and the freezer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::ContainerError;

/// The freezer's state file (FROZEN, FREEZING or THAWED).
pub const FREEZER_STATE: &str = "freezer.state";

/// The mount point of each v1 controller libcgroups supports, from /proc/self/mountinfo, by controller name.
pub fn host_mounts() -> Result<BTreeMap<String, PathBuf>, ContainerError> {
    let mounts = libcgroups::v1::util::list_supported_mount_points()
        .map_err(|e| ContainerError::Internal(format!("cgroup v1 mount points: {e}")))?;
    if mounts.is_empty() {
        return Err(ContainerError::Internal(
            "no cgroup v1 hierarchy is mounted".into(),
        ));
    }
    Ok(mounts
        .into_iter()
        .map(|(controller, mount)| (controller.to_string(), mount))
        .collect())
}

/// libcgroups' v1 manager of the cgroup `relative` (it finds the hierarchies itself).
pub fn manager(
    relative: &Path,
) -> Result<libcgroups::v1::Manager, libcgroups::v1::manager::V1ManagerError> {
    libcgroups::v1::Manager::new(&Path::new("/").join(relative))
}

/// Freezes the freezer cgroup `dir` and waits (at most 100 ms, never past `deadline`) for it to be frozen;
/// whether it is.
pub fn freeze(dir: &Path, deadline: Instant) -> bool {
    let state = dir.join(FREEZER_STATE);
    if std::fs::write(&state, "FROZEN").is_err() {
        return false;
    }
    let until = deadline.min(Instant::now() + Duration::from_millis(100));
    loop {
        let now = std::fs::read_to_string(&state).unwrap_or_default();
        if now.trim() == "FROZEN" {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Thaws the freezer cgroup `dir` (also after a freeze that did not complete: FREEZING is thawed too).
pub fn thaw(dir: &Path) {
    let _ = std::fs::write(dir.join(FREEZER_STATE), "THAWED");
}

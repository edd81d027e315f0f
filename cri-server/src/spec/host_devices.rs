//! The node's devices for privileged containers of native pods, as containerd gives them
//! (`WithHostDevices`, runc's `HostDevices`): every character and block device under `/dev`, with its
//! type, numbers, mode and owner; the device cgroup already allows everything for them.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};

/// Directories of `/dev` that hold no devices a container takes from the node (runc skips them too:
/// the container has its own pts, shm and mqueue mounts).
const SKIPPED: [&str; 7] = ["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];
/// Deepest directory level looked at (`/dev/a/b/c`).
const MAX_DEPTH: usize = 4;

/// The devices under `dev` (the node's `/dev`), sorted by path; unreadable entries are skipped.
pub(super) fn under(dev: &Path) -> Vec<LinuxDevice> {
    let mut out = Vec::new();
    walk(dev, dev, 0, &mut out);
    out.sort_by(|a, b| a.path().cmp(b.path()));
    out
}

fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<LinuxDevice>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Not followed: a symlink is the node's alias of a device listed under its own name.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            let name = entry.file_name();
            if depth < MAX_DEPTH && !SKIPPED.iter().any(|s| name == *s) {
                walk(root, &path, depth + 1, out);
            }
            continue;
        }
        let typ = if kind.is_char_device() {
            LinuxDeviceType::C
        } else if kind.is_block_device() {
            LinuxDeviceType::B
        } else {
            continue;
        };
        // /dev/console is the container's own (its terminal), as runc leaves it.
        if path == root.join("console") {
            continue;
        }
        let Ok(relative) = path.strip_prefix(root) else {
            continue;
        };
        let rdev = meta.rdev();
        let mut device = LinuxDevice::default();
        device
            .set_path(Path::new("/dev").join(relative))
            .set_typ(typ)
            .set_major(nix::sys::stat::major(rdev) as i64)
            .set_minor(nix::sys::stat::minor(rdev) as i64)
            .set_file_mode(Some(meta.mode() & 0o7777))
            .set_uid(Some(meta.uid()))
            .set_gid(Some(meta.gid()));
        out.push(device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node's /dev: its null device with the right numbers; no pts, no symlinks, no console.
    #[test]
    fn the_nodes_devices_with_their_numbers() {
        let devices = under(Path::new("/dev"));
        let null = devices
            .iter()
            .find(|d| d.path() == Path::new("/dev/null"))
            .expect("/dev/null");
        assert_eq!(
            (null.typ(), null.major(), null.minor()),
            (LinuxDeviceType::C, 1, 3)
        );
        assert_eq!(null.file_mode(), Some(0o666));
        assert!(devices.iter().all(|d| !d.path().starts_with("/dev/pts")));
        assert!(devices
            .iter()
            .all(|d| d.path() != Path::new("/dev/console")));
        // /dev/fd and /dev/stdin are links; a directory of fake nodes is not a device list.
        assert!(devices.iter().all(|d| d.path() != Path::new("/dev/stdin")));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(under(dir.path()).is_empty());
    }
}

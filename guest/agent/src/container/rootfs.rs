//! A container's root filesystem: the read-only image storage under an overlay whose upper layer lives on a
//! size-limited tmpfs, all inside the bundle directory.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::ContainerError;

/// Mounts `<bundle>/layer` (tmpfs of `layer_bytes`) and the overlay `<bundle>/rootfs` over `image`; returns
/// the rootfs path. The caller tears down on error.
pub fn mount(bundle: &Path, image: &Path, layer_bytes: u64) -> Result<PathBuf, ContainerError> {
    let rootfs = bundle.join("rootfs");
    let layer = bundle.join("layer");
    for dir in [&rootfs, &layer] {
        std::fs::create_dir_all(dir)?;
    }
    nix::mount::mount(
        Some("tmpfs"),
        &layer,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("size={layer_bytes},mode=0755").as_str()),
    )?;
    for dir in ["upper", "work"] {
        std::fs::create_dir(layer.join(dir))?;
    }
    let overlay = format!(
        "lowerdir={},upperdir={},workdir={}",
        image.display(),
        layer.join("upper").display(),
        layer.join("work").display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(overlay.as_str()),
    )
    .map_err(|e| ContainerError::Internal(format!("mounting the overlay rootfs: {e}")))?;

    Ok(rootfs)
}

/// Unmounts the rootfs and writable layer (lazily: with everything mounted below them) and removes the
/// bundle directory; errors are logged. The directory stays while anything is still mounted below it.
pub fn teardown(bundle: &Path) {
    for m in ["rootfs", "layer"] {
        match nix::mount::umount2(&bundle.join(m), MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => crate::log(&format!("unmounting {}: {e}", bundle.join(m).display())),
        }
    }
    if let Err(e) = remove_unmounted(bundle) {
        crate::log(&e);
    }
}

/// Removes `dir` and its content unless something is mounted at or below it: a recursive removal
/// would go into the mounted file system (on the node: possibly a node path bound into a container).
pub fn remove_unmounted(dir: &Path) -> Result<(), String> {
    let mounted = mounted_under(dir);
    if let Some(first) = mounted.first() {
        return Err(format!(
            "not removing {}: {} still mounted below it (first: {})",
            dir.display(),
            mounted.len(),
            first.display()
        ));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", dir.display())),
    }
}

/// The mount points at or below `dir` in this mount namespace (`/proc/self/mountinfo`).
pub fn mounted_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
    info.split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').nth(4))
        .map(|point| PathBuf::from(std::ffi::OsString::from_vec(unescape(point))))
        .filter(|point| point.starts_with(dir))
        .collect()
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (field[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_decoded_and_a_mounted_directory_is_never_removed() {
        assert_eq!(unescape(b"/a\\040b\\134c"), b"/a b\\c");
        assert_eq!(unescape(b"/plain\\"), b"/plain\\");
        // /proc is always mounted: neither it nor its parent would be removed.
        assert!(mounted_under(Path::new("/proc")).contains(&PathBuf::from("/proc")));
        let e = remove_unmounted(Path::new("/proc")).unwrap_err();
        assert!(e.starts_with("not removing /proc"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("x");
        std::fs::create_dir_all(gone.join("y")).unwrap();
        remove_unmounted(&gone).unwrap();
        assert!(!gone.exists());
        remove_unmounted(&gone).unwrap();
    }
}

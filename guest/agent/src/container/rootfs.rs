//! A container's root filesystem: the read-only image storage under an overlay whose upper layer lives on a
//! size-limited tmpfs, all inside the bundle directory.

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

/// Unmounts the rootfs and writable layer and removes the bundle directory; errors are logged.
pub fn teardown(bundle: &Path) {
    for m in ["rootfs", "layer"] {
        match nix::mount::umount2(&bundle.join(m), MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => crate::log(&format!("unmounting {}: {e}", bundle.join(m).display())),
        }
    }
    if let Err(e) = std::fs::remove_dir_all(bundle) {
        if e.kind() != std::io::ErrorKind::NotFound {
            crate::log(&format!("removing {}: {e}", bundle.display()));
        }
    }
}

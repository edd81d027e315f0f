//! The guest kernel + initramfs that `guest/build.sh` builds, and whether this host can boot VMs and
//! pods with them: tests skip with a `SKIPPED <test>: <reason>` line when it cannot, or panic when
//! PODVISOR_REQUIRE_KVM=1.

use std::path::{Path, PathBuf};

/// The workspace's root directory (this crate is `e2e/testkit/`).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where `guest/build.sh` puts `vmlinux` and `initramfs.cpio`: `<workspace>/target/guest`.
pub fn guest_dir() -> PathBuf {
    workspace_root().join("target/guest")
}

/// Kernel and initramfs built by `guest/build.sh` (or given by PODVISOR_KERNEL / PODVISOR_INITRAMFS).
pub fn guest_artifacts() -> Result<(PathBuf, PathBuf), String> {
    let guest = guest_dir();
    let kernel = std::env::var_os("PODVISOR_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| guest.join("vmlinux"));
    let initramfs = std::env::var_os("PODVISOR_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| guest.join("initramfs.cpio"));
    for p in [&kernel, &initramfs] {
        if !p.is_file() {
            return Err(format!("{} missing (run guest/build.sh)", p.display()));
        }
    }
    Ok((kernel, initramfs))
}

/// Returns the guest artifacts if this host can run VMs. Otherwise prints a SKIPPED line and returns
/// None — or panics when PODVISOR_REQUIRE_KVM=1 (CI on a KVM host must not skip).
#[cfg(feature = "vm")]
pub fn vm_prerequisites(test: &str) -> Option<(PathBuf, PathBuf)> {
    let why = if !vmm::KvmHost::detect().dev_kvm {
        Err("/dev/kvm not available".to_string())
    } else {
        guest_artifacts()
    };
    match why {
        Ok(a) => Some(a),
        Err(reason) if std::env::var("PODVISOR_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("{test}: PODVISOR_REQUIRE_KVM=1 but {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            None
        }
    }
}

/// Guest kernel + initramfs directory built by `guest/build.sh`, if this host can run pod VMs (and
/// the test registry's tools are installed). Otherwise prints a SKIPPED line and returns None — or
/// panics when PODVISOR_REQUIRE_KVM=1.
#[cfg(feature = "cri")]
pub fn pod_prerequisites(test: &str) -> Option<PathBuf> {
    let guest = guest_dir();
    let why = if !Path::new("/dev/kvm").exists() {
        Some("/dev/kvm not available".to_string())
    } else if !guest.join("vmlinux").is_file() || !guest.join("initramfs.cpio").is_file() {
        Some(format!(
            "{} has no vmlinux/initramfs.cpio (run guest/build.sh)",
            guest.display()
        ))
    } else {
        image_service::testing::skip_reason()
    };
    skip_unless_required(test, why).then_some(guest)
}

/// The guest directory holding `podvisor-agent` (built by `guest/build.sh`), if this host can run
/// native pods: root, and the test registry's tools. Otherwise prints a SKIPPED line and returns None —
/// or panics when PODVISOR_REQUIRE_KVM=1 (CI runs every pod test).
#[cfg(feature = "cri")]
pub fn native_prerequisites(test: &str) -> Option<PathBuf> {
    let guest = guest_dir();
    let why = if !crate::procfs::is_root() {
        Some("native pods need root".to_string())
    } else if !guest.join("podvisor-agent").is_file() {
        Some(format!(
            "{} has no podvisor-agent (run guest/build.sh)",
            guest.display()
        ))
    } else {
        image_service::testing::skip_reason()
    };
    skip_unless_required(test, why).then_some(guest)
}

/// True when there is no reason to skip; otherwise prints `SKIPPED <test>: <why>` and returns false —
/// or panics when PODVISOR_REQUIRE_KVM=1.
#[cfg(feature = "cri")]
fn skip_unless_required(test: &str, why: Option<String>) -> bool {
    match why {
        None => true,
        Some(reason) if std::env::var("PODVISOR_REQUIRE_KVM").as_deref() == Ok("1") => {
            panic!("{test}: PODVISOR_REQUIRE_KVM=1 but {reason}")
        }
        Some(reason) => {
            println!("SKIPPED {test}: {reason}");
            false
        }
    }
}

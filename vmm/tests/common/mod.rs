//! Helpers shared by the VM integration tests and the boot benchmark.
#![allow(dead_code)]

pub mod guest_stats;
pub mod netns;
pub mod oci;
pub mod qemu;

#[allow(unused_imports)]
pub use qemu::{pss_kib, wait_for_marker};

use std::path::{Path, PathBuf};
use std::process::Command;

use vmm::{BlockSlotConfig, KvmHost, VmConfig};

/// Kernel and initramfs built by `guest/build.sh` (or given by PODVISOR_KERNEL / PODVISOR_INITRAMFS).
pub fn guest_artifacts() -> Result<(PathBuf, PathBuf), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let kernel = std::env::var_os("PODVISOR_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/guest/vmlinux"));
    let initramfs = std::env::var_os("PODVISOR_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/guest/initramfs.cpio"));
    for p in [&kernel, &initramfs] {
        if !p.is_file() {
            return Err(format!("{} missing (run guest/build.sh)", p.display()));
        }
    }
    Ok((kernel, initramfs))
}

/// Returns the guest artifacts if this host can run VMs. Otherwise prints a SKIPPED line and returns
/// None — or panics when PODVISOR_REQUIRE_KVM=1 (CI on a KVM host must not skip).
pub fn vm_prerequisites(test: &str) -> Option<(PathBuf, PathBuf)> {
    let why = if !KvmHost::detect().dev_kvm {
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

/// A VM config with `slots` block slots, files under `dir`.
pub fn vm_config(
    dir: &Path,
    kernel: &Path,
    initramfs: &Path,
    slots: Vec<BlockSlotConfig>,
) -> VmConfig {
    VmConfig {
        vcpus: 1,
        mem_mib: 256,
        kernel: kernel.to_owned(),
        initramfs: Some(initramfs.to_owned()),
        cmdline: vmm::default_cmdline(&KvmHost::detect()),
        console_log: dir.join("console.log"),
        vsock_uds: dir.join("vsock.sock"),
        guest_cid: 3,
        block_slots: slots,
        net: None,
    }
}

#[allow(unused_imports)]
pub use podvisor_proto::client::wait_for_agent;

/// Builds an ext4 image of `size_mib` MiB holding `files` (path, content), without a journal.
pub fn make_ext4(dir: &Path, name: &str, files: &[(&str, &[u8])], size_mib: u32) -> PathBuf {
    let root = dir.join(format!("{name}.root"));
    std::fs::create_dir_all(&root).unwrap();
    for (path, content) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let image = dir.join(format!("{name}.ext4"));
    ext4_from_dir(&root, &image, size_mib);
    std::fs::remove_dir_all(&root).unwrap();
    image
}

/// Builds an ext4 image of `size_mib` MiB from the tree at `root`, without a journal.
pub fn ext4_from_dir(root: &Path, image: &Path, size_mib: u32) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-d"])
        .arg(root)
        .arg(image)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Number of entries in a /proc directory of this process (threads or fds).
pub fn proc_count(what: &str) -> usize {
    std::fs::read_dir(format!("/proc/self/{what}"))
        .unwrap()
        .count()
}

/// What each open fd of this process points at, sorted (for leak diagnostics).
pub fn fd_targets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

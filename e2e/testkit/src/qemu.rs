//! The peer VMM of the benchmarks: QEMU's microvm machine booting the same kernel, initramfs and
//! command line as ours.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::procfs::pss_kib;
use crate::vm::wait_for_marker;

/// A QEMU boot: seconds until `marker` appeared on the console, and QEMU's PSS (MiB) then.
pub struct QemuBoot {
    /// Seconds from spawning QEMU to the marker.
    pub to_marker: f64,
    /// QEMU's proportional set size after `settle`, MiB.
    pub pss_mib: f64,
}

/// Boots `kernel` + `initramfs` in `qemu-system-x86_64 -M microvm` (1 vCPU, 256 MiB) until the console
/// shows `marker`, waits `settle`, measures QEMU's memory and kills it. Panics on timeout.
pub fn qemu_boot(
    dir: &Path,
    kernel: &Path,
    initramfs: &Path,
    marker: &str,
    timeout: Duration,
    settle: Duration,
) -> QemuBoot {
    let console = dir.join("qemu-console.log");
    let cmdline = vmm::default_cmdline(&vmm::KvmHost::detect());
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-M",
            "microvm,acpi=off",
            "-cpu",
            "host,-arch-capabilities",
        ])
        .args([
            "-m",
            "256",
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(&cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (apt-get install qemu-system-x86)");
    let ok = wait_for_marker(&console, marker, timeout);
    let to_marker = start.elapsed().as_secs_f64();
    std::thread::sleep(settle);
    let pss = pss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "qemu: no {marker:?} in {}", console.display());
    QemuBoot {
        to_marker,
        pss_mib: pss as f64 / 1024.0,
    }
}

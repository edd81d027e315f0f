//! `podvisor check`: a host capability report, one line per check.

use std::path::Path;
use std::process::ExitCode;

use vmm::{HostKind, KvmHost};

/// The outcome of one check.
#[derive(Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether podvisor can work with it.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// Runs every check against this host.
pub fn checks(guest_dir: &Path) -> Vec<Check> {
    let host = KvmHost::detect();
    let mut out = vec![Check {
        name: "kvm",
        ok: host.dev_kvm,
        detail: if host.dev_kvm {
            match host.kind {
                HostKind::Pvm => format!(
                    "/dev/kvm is {}: guest kernel code is emulated, pod boots take tens of seconds",
                    host.kind
                ),
                kind => format!("/dev/kvm is {kind}"),
            }
        } else {
            "/dev/kvm is missing (load kvm_intel, kvm_amd or kvm_pvm)".into()
        },
    }];
    for file in ["vmlinux", "initramfs.cpio"] {
        let path = guest_dir.join(file);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        out.push(Check {
            name: if file == "vmlinux" {
                "guest kernel"
            } else {
                "guest initramfs"
            },
            ok: size > 0,
            detail: if size > 0 {
                format!("{} ({size} bytes)", path.display())
            } else {
                format!(
                    "{} missing (run guest/build.sh and install it)",
                    path.display()
                )
            },
        });
    }
    let cgroup2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    out.push(Check {
        name: "cgroups",
        ok: cgroup2 || Path::new("/sys/fs/cgroup/cpu").exists(),
        detail: if cgroup2 {
            "v2 (unified)".into()
        } else {
            "v1 / hybrid".into()
        },
    });
    out
}

/// Prints the report for the daemon settings `args`; the exit code is non-zero if any check failed.
pub fn run(args: &crate::daemon::DaemonArgs) -> ExitCode {
    let results = checks(&args.guest_dir);
    for c in &results {
        println!(
            "{} {:<16} {}",
            if c.ok { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    if results.iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_guest_files_fail_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let results = checks(dir.path());
        let kernel = results.iter().find(|c| c.name == "guest kernel").unwrap();
        assert!(!kernel.ok);
        assert!(kernel.detail.contains("vmlinux missing"));
        std::fs::write(dir.path().join("vmlinux"), b"x").unwrap();
        assert!(
            checks(dir.path())
                .iter()
                .find(|c| c.name == "guest kernel")
                .unwrap()
                .ok
        );
    }

    #[test]
    fn kvm_check_reports_the_host_kind() {
        let host = KvmHost::detect();
        let kvm = checks(Path::new("/nonexistent"))
            .into_iter()
            .next()
            .unwrap();
        assert_eq!(kvm.ok, host.dev_kvm);
        if host.kind == HostKind::Pvm && host.dev_kvm {
            assert!(kvm.detail.contains("PVM"), "{}", kvm.detail);
        }
    }
}

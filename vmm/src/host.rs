//! Host KVM detection: which kind of virtualization backs `/dev/kvm` and what it implies for guests.

use std::fmt;
use std::path::Path;

/// The kind of KVM implementation on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// Intel VT-x (`kvm_intel`).
    Vmx,
    /// AMD-V (`kvm_amd`).
    Svm,
    /// PVM (`kvm_pvm`): guest kernel code is emulated unless the guest is a PVM guest kernel.
    Pvm,
    /// `/dev/kvm` exists but the backing module is not recognised.
    Unknown,
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKind::Vmx => "VMX (kvm_intel)",
            HostKind::Svm => "SVM (kvm_amd)",
            HostKind::Pvm => "PVM (kvm_pvm)",
            HostKind::Unknown => "unknown KVM module",
        })
    }
}

/// CPU features the PVM instruction emulator cannot execute in guest kernel mode, masked on the guest
/// kernel command line because CPUID masking through `KVM_SET_CPUID2` is not reliably honoured there.
pub const PVM_CLEARCPUID: &str =
    "smap,smep,cx16,popcnt,fsgsbase,rdrand,rdseed,rdpid,bmi1,bmi2,avx,avx2,\
avx512f,movbe,xsaveopt,erms,fsrm,umip,pku,abm,f16c,fma,aes,pclmulqdq,sse4_1,sse4_2,ssse3";

/// What this host's KVM is, as far as podvisor cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmHost {
    /// Whether `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// The implementation behind it.
    pub kind: HostKind,
}

impl KvmHost {
    /// Detects the host from `/dev/kvm` and `/sys/module`.
    pub fn detect() -> KvmHost {
        Self::detect_in(Path::new("/"))
    }

    /// Detects the host with `root` as the filesystem root (for tests).
    pub fn detect_in(root: &Path) -> KvmHost {
        let module = |m: &str| root.join("sys/module").join(m).exists();
        let kind = if module("kvm_pvm") {
            HostKind::Pvm
        } else if module("kvm_intel") {
            HostKind::Vmx
        } else if module("kvm_amd") {
            HostKind::Svm
        } else {
            HostKind::Unknown
        };
        KvmHost {
            dev_kvm: root.join("dev/kvm").exists(),
            kind,
        }
    }

    /// Kernel command-line arguments this host needs for a plain (non-PVM) guest kernel.
    pub fn guest_cmdline_args(&self) -> String {
        match self.kind {
            // The emulator lacks XSAVE-family and the listed instructions; rodata=off skips ~7 s of
            // emulated page-table rewriting (the VM boundary, not guest W^X, is what isolates pods).
            HostKind::Pvm => format!("noxsave clearcpuid={PVM_CLEARCPUID} rodata=off"),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_module_kind() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(KvmHost::detect_in(dir.path()).kind, HostKind::Unknown);
        assert!(!KvmHost::detect_in(dir.path()).dev_kvm);
        std::fs::create_dir_all(dir.path().join("sys/module/kvm_amd")).unwrap();
        assert_eq!(KvmHost::detect_in(dir.path()).kind, HostKind::Svm);
        std::fs::create_dir_all(dir.path().join("sys/module/kvm_pvm")).unwrap();
        let host = KvmHost::detect_in(dir.path());
        assert_eq!(host.kind, HostKind::Pvm);
        assert!(host.guest_cmdline_args().contains("clearcpuid=smap,"));
    }
}

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
///
/// Linux parses at most [`CLEARCPUID_MAX_LEN`] characters of `clearcpuid=` (and only its last occurrence):
/// the longer list this replaced was cut after "fma,ae", so aes, pclmulqdq, sse4_1, sse4_2 and ssse3 were
/// never cleared. xsaveopt, avx, avx2, avx512f, fma and pku are left out because `noxsave` (always passed
/// with this list) already clears them through the kernel's CPUID dependency table.
pub const PVM_CLEARCPUID: &str = "smap,smep,cx16,popcnt,fsgsbase,rdrand,rdseed,rdpid,bmi1,bmi2,\
movbe,erms,fsrm,umip,abm,f16c,aes,pclmulqdq,sse4_1,sse4_2,ssse3";

/// The longest `clearcpuid=` value Linux 6.1 reads (a 128-byte buffer with its NUL).
pub const CLEARCPUID_MAX_LEN: usize = 127;

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

    /// Whether this host's guests run their kernel with `noxsave` (PVM: the instruction emulator cannot
    /// execute XSAVE in guest kernel mode). Such a guest kernel preserves only x87/SSE registers across
    /// context switches, so guest user space must avoid AVX: [`KvmHost::guest_cmdline_args`] passes
    /// `noxsave` and the glibc tunable exactly when this holds, and the host tells the agent so in
    /// `CreateSandboxRequest::avoid_avx`.
    pub fn guest_xsave_disabled(&self) -> bool {
        self.kind == HostKind::Pvm
    }

    /// Kernel command-line arguments this host needs for a plain (non-PVM) guest kernel.
    pub fn guest_cmdline_args(&self) -> String {
        let mut args = Vec::new();
        if self.guest_xsave_disabled() {
            args.push("noxsave".to_string());
        }
        if self.kind == HostKind::Pvm {
            // The emulator lacks XSAVE-family and the listed instructions; rodata=off skips ~7 s of
            // emulated page-table rewriting (the VM boundary, not guest W^X, is what isolates pods).
            // Boot-time trade-offs that only pay off where guest kernel code is emulated:
            // - retain_initrd: freeing the initramfs image after unpacking (page-attribute changes, page
            //   poisoning) costs ~1 s for the 1.7 MB agent initramfs; instead it stays reserved, i.e. the
            //   guest has that much less free RAM (the host pages are backed either way).
            // - dhash_entries/ihash_entries: zeroing the dentry/inode hash tables in emulated early boot
            //   takes ~0.3 s at the 256 MiB defaults (32768/16384 buckets), ~0.18 s at 8192/4096, which
            //   still keeps hash chains short for tens of thousands of cached files.
            args.push(format!(
                "clearcpuid={PVM_CLEARCPUID} rodata=off retain_initrd \
                 dhash_entries=8192 ihash_entries=4096"
            ));
        }
        if self.guest_xsave_disabled() {
            // GLIBC_TUNABLES (passed by the kernel to init's environment, so inherited by the agent and
            // every process it forks): with `noxsave` the guest kernel saves only x87/SSE state across
            // context switches while user space runs with the host's XCR0, so two processes using AVX
            // corrupt each other's registers. This keeps glibc's string functions in the agent and its
            // forks (the container engine's init processes) off AVX; containers get the same tunable
            // from the agent (`CreateSandboxRequest::avoid_avx`).
            args.push(format!(
                "GLIBC_TUNABLES={}",
                podvisor_proto::AVOID_AVX_GLIBC_TUNABLES
            ));
        }
        args.join(" ")
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

    #[test]
    fn pvm_clearcpuid_fits_the_kernel_parser() {
        assert!(PVM_CLEARCPUID.len() <= CLEARCPUID_MAX_LEN);
        let args = KvmHost {
            dev_kvm: true,
            kind: HostKind::Pvm,
        }
        .guest_cmdline_args();
        // xsaveopt/avx/avx2/avx512f/fma/pku are only masked through noxsave.
        assert!(args.split_whitespace().any(|a| a == "noxsave"));
        assert_eq!(args.matches("clearcpuid=").count(), 1);
    }

    #[test]
    fn noxsave_and_the_glibc_tunable_follow_the_typed_fact() {
        for kind in [
            HostKind::Vmx,
            HostKind::Svm,
            HostKind::Pvm,
            HostKind::Unknown,
        ] {
            let host = KvmHost {
                dev_kvm: true,
                kind,
            };
            let args = host.guest_cmdline_args();
            let words: Vec<&str> = args.split_whitespace().collect();
            let tunable = format!(
                "GLIBC_TUNABLES={}",
                podvisor_proto::AVOID_AVX_GLIBC_TUNABLES
            );
            assert_eq!(
                words.contains(&"noxsave"),
                host.guest_xsave_disabled(),
                "{kind}: {args}"
            );
            assert_eq!(
                words.contains(&tunable.as_str()),
                host.guest_xsave_disabled(),
                "{kind}: {args}"
            );
        }
    }
}

//! How VMs end, with tiny hand-made guests (no Linux boot, so these run in well under a second):
//! a triple fault becomes an exit reason, a guest halted with interrupts off is still stoppable,
//! and a failed boot leaks nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_testkit::procfs::{fd_targets, proc_count};
use vmm::{Error, ExitReason, KvmHost, ThreadKind, Vm, VmConfig, VmState};

/// Physical load and entry address of the test "kernels" (where vmlinux is loaded too).
const LOAD_ADDR: u64 = 0x100_0000;

/// Writes a minimal ELF64 executable whose single PT_LOAD segment is `code` at LOAD_ADDR.
fn tiny_elf(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [EHDR as u16, PHDR as u16, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    let offset = EHDR + PHDR;
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        offset,
        LOAD_ADDR,
        LOAD_ADDR,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    let path = dir.join(name);
    std::fs::write(&path, f).unwrap();
    path
}

fn config(dir: &Path, kernel: PathBuf) -> VmConfig {
    VmConfig {
        vcpus: 1,
        mem_mib: 64,
        kernel,
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        console_log: dir.join("console.log"),
        vsock_uds: dir.join("vsock.sock"),
        guest_cid: 3,
        block_slots: vec![vmm::BlockSlotConfig { read_only: true }],
        net: None,
    }
}

fn kvm_or_skip(test: &str) -> bool {
    if KvmHost::detect().dev_kvm {
        return true;
    }
    if std::env::var("PODVISOR_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: PODVISOR_REQUIRE_KVM=1 but /dev/kvm is missing");
    }
    eprintln!("SKIPPED {test}: /dev/kvm not available");
    false
}

#[test]
fn exits_stops_and_failed_boots() {
    // One test so the thread and fd accounting is not disturbed by parallel tests.
    if !kvm_or_skip("exits_stops_and_failed_boots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let threads_before = proc_count("task");
    let fds_before = fd_targets();

    // ud2 with an empty IDT: #UD -> #NP -> #DF -> triple fault.
    let vm = Vm::boot(config(
        dir.path(),
        tiny_elf(dir.path(), "ud2", &[0x0f, 0x0b]),
    ))
    .unwrap();
    let reason = vm
        .wait_timeout(Duration::from_secs(60))
        .expect("triple fault must end the VM");
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(vm.state(), VmState::Exited(ExitReason::GuestReset));
    assert_eq!(vm.stop(), ExitReason::GuestReset);

    // cli; hlt; jmp back: the vCPU sleeps inside KVM until the host kicks it.
    let vm = Vm::boot(config(
        dir.path(),
        tiny_elf(dir.path(), "hlt", &[0xfa, 0xf4, 0xeb, 0xfc]),
    ))
    .unwrap();
    assert_eq!(vm.wait_timeout(Duration::from_millis(300)), None);
    assert_eq!(vm.state(), VmState::Running);
    // Every VM thread is reported with its kernel thread id (what cgroup placement writes).
    let kinds: Vec<(&str, ThreadKind)> = vm
        .threads()
        .iter()
        .map(|t| (t.name.as_str(), t.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("virtio-vsock", ThreadKind::Device),
            ("virtio-blk0", ThreadKind::Device),
            ("vcpu0", ThreadKind::Vcpu)
        ]
    );
    for t in vm.threads() {
        let comm = std::fs::read_to_string(format!("/proc/self/task/{}/comm", t.tid)).unwrap();
        assert_eq!(comm.trim_end(), t.name);
    }
    let t = Instant::now();
    assert_eq!(vm.stop(), ExitReason::Stopped);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );

    // A kernel that is not an ELF: clear error, nothing started is left behind.
    let bogus = dir.path().join("bogus");
    std::fs::write(&bogus, vec![0u8; 4096]).unwrap();
    let err = Vm::boot(config(dir.path(), bogus)).unwrap_err();
    assert!(matches!(err, Error::Boot(_)), "{err}");
    // An invalid config is rejected before anything is created.
    let mut bad = config(dir.path(), tiny_elf(dir.path(), "k", &[0xf4]));
    bad.mem_mib = 1;
    assert!(matches!(Vm::boot(bad), Err(Error::Config(_))));

    assert!(!dir.path().join("vsock.sock").exists());
    assert_eq!(proc_count("task"), threads_before, "threads left behind");
    assert_eq!(fd_targets(), fds_before, "fds left behind");
}

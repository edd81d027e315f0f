//! Boots a kernel + initramfs with the vmm crate and waits for the VM to exit.
//!
//! `cargo run -p vmm --example boot -- KERNEL INITRAMFS [SECONDS] [EXTRA CMDLINE...]`; the console log
//! goes to `./console.log`, the vsock socket to `./vsock.sock`. VCPUS and MEM_MIB override 1 and 256.

use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: boot KERNEL INITRAMFS [SECONDS] [EXTRA CMDLINE...]");
        std::process::exit(2);
    }
    let secs: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(120);
    let extra = args.get(3..).map(|a| a.join(" ")).unwrap_or_default();
    let host = vmm::KvmHost::detect();
    let _ = std::fs::remove_file("vsock.sock");
    let config = vmm::VmConfig {
        vcpus: env_or("VCPUS", 1),
        mem_mib: env_or("MEM_MIB", 256),
        kernel: args[0].clone().into(),
        initramfs: Some(args[1].clone().into()),
        cmdline: format!("{} {}", vmm::default_cmdline(&host), extra),
        console_log: "console.log".into(),
        vsock_uds: "vsock.sock".into(),
        guest_cid: 3,
        block_slots: vec![vmm::BlockSlotConfig { read_only: true }],
        net: None,
    };
    let start = Instant::now();
    let vm = vmm::Vm::boot(config).unwrap_or_else(|e| {
        eprintln!("boot failed: {e}");
        std::process::exit(1)
    });
    let reason = vm.wait_timeout(Duration::from_secs(secs));
    println!("after {:?}: {:?}", start.elapsed(), reason);
    println!("stop: {}", vm.stop());
}

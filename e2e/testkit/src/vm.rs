//! VM material for the vmm tests and benches: a test VM config, waiting for the console and the agent.

use std::path::Path;
use std::time::{Duration, Instant};

use vmm::{BlockSlotConfig, KvmHost, VmConfig};

/// Waits (bounded) for the guest agent on the hybrid-vsock socket (re-exported from podvisor-proto).
pub use podvisor_proto::client::wait_for_agent;

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

/// Waits until `path` contains `marker`; returns false on timeout.
pub fn wait_for_marker(path: &Path, marker: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(marker)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

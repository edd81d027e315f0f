//! The podvisor host <-> guest agent protocol (`podvisor.agent.v1`, see `agent.proto`).
//!
//! The message types, the [`AgentClient`] and the [`Agent`] server trait are generated from `agent.proto`.
//! The constants and functions here are the rest of the host <-> guest contract, used by both sides: the
//! vsock ports, guest paths, limits, the block slot serials and the guest's glibc tunable.
//! With the `client` feature (default), [`client::connect_hybrid_vsock`] opens a client through the VMM's
//! hybrid-vsock unix socket.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

/// Generated code for package `podvisor.agent.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("podvisor.agent.v1");
}

pub use v1::agent_client::AgentClient;
pub use v1::agent_server::{Agent, AgentServer};
pub use v1::*;

#[cfg(feature = "client")]
pub mod client;
pub mod validate;

/// The gRPC paths (`/podvisor.agent.v1.Agent/<Method>`) of every RPC in `agent.proto`: what an agent
/// built from this protocol serves (`podvisor check` looks for them in the installed initramfs).
pub fn agent_method_paths() -> Vec<String> {
    include_str!("../agent.proto")
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(|m| format!("/podvisor.agent.v1.Agent/{}", m.trim()))
        .collect()
}

/// The vsock port the guest agent listens on (the host reaches it through the VMM's hybrid-vsock socket,
/// [`client::wait_for_agent`]).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Guest directory holding host content delivered by CopyFile (CRI mounts), shared by the pod's
/// containers.
pub const GUEST_MOUNTS_DIR: &str = "/run/podvisor/sandbox/mounts";

/// vsock port of the agent's port forwarder: the host writes `PORT <tcp port>\n`, the agent connects to
/// that port on the guest's loopback and answers `OK\n` (or `ERR <reason>\n` and closes); the
/// connection then carries the TCP stream's bytes both ways (CRI PortForward).
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1025;

/// glibc tunable that keeps glibc's IFUNCs (string functions, memcpy...) off AVX/AVX-512: what a process
/// of a guest whose kernel runs with `noxsave` needs (see `CreateSandboxRequest::avoid_avx` in
/// `agent.proto`). The host puts `GLIBC_TUNABLES=<this>` on such a guest's kernel command line (the kernel
/// passes it to init's environment: the agent and everything it forks); the agent adds it to the
/// `GLIBC_TUNABLES` of every container process of a pod created with `avoid_avx`.
pub const AVOID_AVX_GLIBC_TUNABLES: &str =
    "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD";

/// The virtio-blk serial (`/sys/block/vdX/serial` in the guest) of the VMM's block slot `slot`: how the
/// agent finds the disk of `AddStorageRequest::block_slot`.
pub fn block_slot_serial(slot: u32) -> String {
    format!("slot{slot}")
}

/// The largest `ReadFileRequest::max_bytes` the agent accepts (4 MiB). Clients must accept responses of this
/// size plus framing, above tonic's default 4 MiB decoding limit (`client::connect_hybrid_vsock` does).
pub const MAX_READ_BYTES: u32 = 4 * 1024 * 1024;

/// Storages without an explicit mount point are mounted at `<this>/<id>`.
pub const DEFAULT_STORAGE_ROOT: &str = "/run/podvisor/storage";

/// How long `AddStorage` waits for an empty slot to get an image when `timeout_ms` is 0.
pub const DEFAULT_STORAGE_TIMEOUT_MS: u32 = 30_000;

/// The largest `AddStorageRequest::timeout_ms` the agent accepts.
pub const MAX_STORAGE_TIMEOUT_MS: u32 = 300_000;

#[cfg(test)]
mod tests {
    #[test]
    fn method_paths_come_from_the_proto() {
        let paths = super::agent_method_paths();
        assert!(paths.contains(&"/podvisor.agent.v1.Agent/CopyFile".to_string()));
        let rpcs = include_str!("../agent.proto").matches("\n  rpc ").count();
        assert_eq!(paths.len(), rpcs);
        assert!(paths.iter().all(|p| !p.contains(' ')), "{paths:?}");
    }

    #[test]
    fn block_slot_serials_fit_virtio_blk_ids() {
        // VIRTIO_BLK_ID_BYTES: the serial is at most 20 bytes.
        assert_eq!(super::block_slot_serial(0), "slot0");
        assert!(super::block_slot_serial(u32::MAX).len() <= 20);
    }
}

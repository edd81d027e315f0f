//! Test and benchmark helpers shared by podvisor's crates (Cloud Hypervisor's `test_infra` in spirit):
//! a dev-dependency only, never published. What one test file alone needs stays in that test.
//!
//! Features keep each user's build to what it needs: `vm` (the vmm tests and boot bench) adds the
//! VM helpers, `cri` (the daemon tests and benches) the daemon, CRI, image and CNI helpers; the rest
//! is std, `nix` and `serde_json`.
#![forbid(unsafe_code)]

pub mod guest;
pub mod http;
pub mod image;
pub mod netns;
pub mod procfs;
pub mod python;

#[cfg(feature = "vm")]
pub mod qemu;
#[cfg(feature = "vm")]
pub mod vm;

#[cfg(feature = "cri")]
pub mod bed;
#[cfg(feature = "cri")]
pub mod cni;
#[cfg(feature = "cri")]
pub mod containerd;
#[cfg(feature = "cri")]
pub mod cri;
#[cfg(feature = "cri")]
pub mod daemon;

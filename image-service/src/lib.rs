//! podvisor image service: pulls OCI images into a content store and builds one read-only block image per
//! image digest, which the sandbox manager hot-attaches to pod VMs.
//!
//! Not implemented yet (issue "Image service"); this crate only reserves its place in the workspace.

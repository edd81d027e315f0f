//! podvisor image service: pulls OCI images with `oci-client` into a content-addressed store and builds one
//! read-only block image (ext4 or erofs) per image, which the sandbox manager attaches to pod VMs.
//!
//! [`ImageService`] is the entry point; the modules below it are usable on their own (the layer applier,
//! the content store, registry host configuration).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod apply;
pub mod blockimage;
pub mod content;
pub mod hosts;
pub mod meta;
pub mod registry;
pub mod service;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use blockimage::FsType;
pub use content::Digest;
pub use meta::ImageRecord;
pub use registry::Credentials;
pub use service::{
    Config, ErrorKind, GcStats, ImageError, ImageService, Progress, Stats, Usage, DEFAULT_CERTS_DIR,
};

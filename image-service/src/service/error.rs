//! The image service's error and its classification into [`ErrorKind`]s, the one mapping callers turn into
//! protocol codes (cri-server maps each kind to one gRPC code). The rule: `InvalidArgument` only for the
//! caller's own input; content that does not verify is `DataLoss` (not retryable: the registry serves
//! corrupt content); images refused by policy or format are `FailedPrecondition`; registry and transport
//! failures a retry may cure are `Unavailable`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::apply::ApplyError;
use crate::blockimage::BuildError;
use crate::content::{ContentError, Digest};
use crate::meta::MetaError;
use crate::registry::RegistryError;

/// Errors of the image service.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Talking to the registry failed (includes invalid references).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The content store failed or content did not verify.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// A layer was refused or could not be applied.
    #[error("layer {layer}: {source}")]
    Apply {
        /// The layer blob.
        layer: Digest,
        /// Why.
        source: ApplyError,
    },
    /// Building the block image failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The metadata database failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The image is refused: unsupported media type or platform, a descriptor over a limit, a config that
    /// does not match its manifest.
    #[error("bad image: {0}")]
    BadImage(String),
    /// The image config is not a valid OCI image configuration.
    #[error("bad image: image config: {0}")]
    BadConfig(#[source] serde_json::Error),
    /// The image is leased by running pods or containers.
    #[error("image {id} is in use by {holders:?}")]
    InUse {
        /// The image.
        id: Digest,
        /// Lease holders.
        holders: Vec<String>,
    },
    /// No such image in the store.
    #[error("image {0:?} not found")]
    NotFound(String),
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The same error, shared with the other callers of a coalesced pull.
    #[error(transparent)]
    Shared(Arc<ImageError>),
    /// A task the operation ran on (the pull shared by coalesced callers, a blocking build or scan)
    /// panicked or was cancelled.
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The class of an error, for callers that map errors to protocol codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is invalid.
    InvalidArgument,
    /// The image, manifest or blob does not exist.
    NotFound,
    /// The registry could not be reached (retryable).
    Unavailable,
    /// The registry refused the credentials.
    Unauthenticated,
    /// The operation is refused in the current state (image in use, image content rejected).
    FailedPrecondition,
    /// Downloaded content did not verify against its digest or size: the registry serves corrupt data,
    /// which retrying the same pull does not cure.
    DataLoss,
    /// Anything else.
    Internal,
}

impl ImageError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ImageError::Shared(e) => e.kind(),
            ImageError::Registry(e) => registry_kind(e),
            ImageError::Content(c) => content_kind(c),
            ImageError::Apply { source, .. } => match source {
                ApplyError::Io { .. } => ErrorKind::Internal,
                ApplyError::DiffIdMismatch { .. } => ErrorKind::DataLoss,
                _ => ErrorKind::FailedPrecondition,
            },
            ImageError::BadImage(_) | ImageError::BadConfig(_) | ImageError::InUse { .. } => {
                ErrorKind::FailedPrecondition
            }
            ImageError::NotFound(_) => ErrorKind::NotFound,
            ImageError::Build(_)
            | ImageError::Meta(_)
            | ImageError::Io { .. }
            | ImageError::Task(_) => ErrorKind::Internal,
        }
    }
}

fn registry_kind(e: &RegistryError) -> ErrorKind {
    match e {
        RegistryError::InvalidReference { .. } => ErrorKind::InvalidArgument,
        RegistryError::NotFound { .. } | RegistryError::NoPlatform { .. } => ErrorKind::NotFound,
        RegistryError::Unreachable { .. } | RegistryError::Protocol { .. } => {
            ErrorKind::Unavailable
        }
        RegistryError::Unauthorized { .. } => ErrorKind::Unauthenticated,
        RegistryError::Unsupported(_)
        | RegistryError::Malformed { .. }
        | RegistryError::TooLarge { .. }
        | RegistryError::Hosts(_) => ErrorKind::FailedPrecondition,
        RegistryError::Content(c) => content_kind(c),
    }
}

fn content_kind(c: &ContentError) -> ErrorKind {
    match c {
        ContentError::DigestMismatch { .. } | ContentError::SizeMismatch { .. } => {
            ErrorKind::DataLoss
        }
        // Digests come from manifests and registry headers (a reference's digest is validated with it):
        // a non-sha256 one is content podvisor does not support.
        ContentError::InvalidDigest(_) => ErrorKind::FailedPrecondition,
        ContentError::Stream { .. } => ErrorKind::Unavailable,
        ContentError::Io { .. } => ErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_that_does_not_verify_is_data_loss_and_never_retryable() {
        let d = Digest::of(b"x");
        let mismatch = || ContentError::DigestMismatch {
            expected: d.clone(),
            actual: Digest::of(b"y").to_string(),
        };
        for e in [
            ImageError::Content(mismatch()),
            ImageError::Registry(RegistryError::Content(mismatch())),
            ImageError::Shared(Arc::new(ImageError::Content(mismatch()))),
        ] {
            assert_eq!(e.kind(), ErrorKind::DataLoss, "{e}");
        }
        let big = RegistryError::TooLarge {
            what: "manifest".into(),
            size: 5 << 20,
            more: false,
            limit: 4 << 20,
        };
        assert_eq!(
            ImageError::Registry(big).kind(),
            ErrorKind::FailedPrecondition
        );
        let bad_digest = ContentError::InvalidDigest("sha512:00".into());
        assert_eq!(
            ImageError::Content(bad_digest).kind(),
            ErrorKind::FailedPrecondition
        );
    }

    #[tokio::test]
    async fn typed_causes_keep_their_kind_and_message_and_are_sources() {
        use std::error::Error as _;
        let json = serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        let json_msg = json.to_string();
        let bad = ImageError::BadConfig(json);
        assert_eq!(bad.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(
            bad.to_string(),
            format!("bad image: image config: {json_msg}")
        );
        let source = bad.source().expect("the serde_json error is the source");
        assert!(source.is::<serde_json::Error>(), "{source:?}");

        let json = serde_json::from_slice::<serde_json::Value>(b"[").unwrap_err();
        let json_msg = json.to_string();
        let malformed = ImageError::Registry(RegistryError::Malformed {
            what: "bad image index",
            source: json,
        });
        assert_eq!(malformed.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(
            malformed.to_string(),
            format!("unsupported manifest: bad image index: {json_msg}")
        );
        let source = malformed
            .source()
            .expect("transparent: the registry error's source");
        assert!(source.is::<serde_json::Error>(), "{source:?}");

        let join = tokio::spawn(async { panic!("boom") }).await.unwrap_err();
        let join_msg = join.to_string();
        let task = ImageError::from(join);
        assert_eq!(task.kind(), ErrorKind::Internal);
        assert_eq!(task.to_string(), format!("internal error: {join_msg}"));
        assert!(task.to_string().contains("boom"), "{task}");
        let source = task.source().expect("the join error is the source");
        assert!(source.is::<tokio::task::JoinError>(), "{source:?}");
        let shared = ImageError::Shared(Arc::new(task));
        assert_eq!(shared.kind(), ErrorKind::Internal);
    }
}

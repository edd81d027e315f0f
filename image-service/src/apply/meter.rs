//! Size accounting for the caps: the uncompressed archive stream, hashed for the diff_id on the way.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

use sha2::{Digest as _, Sha256};

use super::{ApplyError, Limits};
use crate::content::Digest;

/// Which cap `layer` bytes of this layer (after `before` bytes of earlier layers) cross, if any.
fn over(limits: Limits, before: u64, layer: u64) -> Option<ApplyError> {
    if layer > limits.max_layer_bytes {
        Some(ApplyError::TooLarge {
            what: "layer",
            limit: limits.max_layer_bytes,
        })
    } else if before.saturating_add(layer) > limits.max_image_bytes {
        Some(ApplyError::TooLarge {
            what: "image",
            limit: limits.max_image_bytes,
        })
    } else {
        None
    }
}

/// Counts and hashes the uncompressed stream and fails once a cap is crossed.
pub(super) struct Metered<R> {
    inner: R,
    hasher: Sha256,
    layer: u64,
    image_before: u64,
    limits: Limits,
    tripped: Rc<Cell<Option<ApplyError>>>,
}

impl<R> Metered<R> {
    /// Meters `inner`, the layer after `image_before` bytes of earlier layers.
    pub(super) fn new(inner: R, image_before: u64, limits: Limits) -> Metered<R> {
        Metered {
            inner,
            hasher: Sha256::new(),
            layer: 0,
            image_before,
            limits,
            tripped: Rc::default(),
        }
    }

    /// Where the cap error is left when a read fails because of it (the tar reader only passes an
    /// `io::Error` on).
    pub(super) fn tripped(&self) -> Rc<Cell<Option<ApplyError>>> {
        self.tripped.clone()
    }

    /// The bytes read and their sha256.
    pub(super) fn finish(self) -> (u64, Digest) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()))
            .parse()
            .expect("a sha256 digest");
        (self.layer, digest)
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.layer += n as u64;
        if let Some(e) = over(self.limits, self.image_before, self.layer) {
            self.tripped.set(Some(e));
            return Err(io::Error::other("uncompressed size limit exceeded"));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

//! Pull steps 4 and 5, unpack and build, on one blocking thread: the layers are applied bottom first into
//! `rootfs` in a new temporary directory under the store's `tmp/` (each checked against its diff_id,
//! within the uncompressed-size limits), then the block image is built next to it and the tree deleted.
//! Until the commit renames it into place, the image lives in that directory, which is deleted when the
//! step's output is dropped (on any failure).

use std::path::PathBuf;
use std::sync::Arc;

use tempfile::TempDir;

use crate::apply::Applier;
use crate::blockimage;
use crate::content::Digest;
use crate::meta::block_image_name;
use crate::service::{io_err, ImageError, Inner, Progress};

/// The unpacked root of an image.
struct Unpacked {
    /// The temporary directory holding it.
    tmp: TempDir,
    /// The root, in `tmp`.
    rootfs: PathBuf,
    /// Uncompressed bytes of all layers.
    uncompressed: u64,
}

/// A block image built but not committed.
pub(super) struct Built {
    /// The temporary directory holding it (dropping it deletes the directory).
    pub(super) tmp: TempDir,
    /// The block image, in `tmp`.
    pub(super) path: PathBuf,
    /// Uncompressed bytes of all layers.
    pub(super) uncompressed: u64,
}

impl Inner {
    /// Unpacks `layers` (checked against `diff_ids`) and builds the block image of image `id`.
    pub(super) async fn unpack_and_build(
        self: &Arc<Self>,
        id: &Digest,
        layers: &[Digest],
        diff_ids: Vec<String>,
        progress: &Arc<dyn Progress>,
    ) -> Result<Built, ImageError> {
        progress.stage("unpacking");
        let (this, layers, id, p) = (self.clone(), layers.to_vec(), id.clone(), progress.clone());
        tokio::task::spawn_blocking(move || {
            let unpacked = this.unpack(&layers, &diff_ids, &id)?;
            this.build(unpacked, &id, p.as_ref())
        })
        .await?
    }

    /// Applies `layers` into a new temporary root, each checked against its diff_id.
    fn unpack(
        &self,
        layers: &[Digest],
        diff_ids: &[String],
        id: &Digest,
    ) -> Result<Unpacked, ImageError> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("build-{}-", &id.hex()[..12]))
            .tempdir_in(&self.tmp)
            .map_err(io_err(&self.tmp))?;
        let rootfs = tmp.path().join("rootfs");
        let apply_err = |layer: &Digest| {
            let layer = layer.clone();
            move |source| ImageError::Apply { layer, source }
        };
        let mut applier = Applier::new(&rootfs, self.config.limits).map_err(apply_err(id))?;
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            applier
                .apply_file(&self.content.path(layer), Some(diff_id))
                .map_err(apply_err(layer))?;
        }
        let uncompressed = applier.total_bytes();
        applier.finish().map_err(apply_err(id))?;
        Ok(Unpacked {
            tmp,
            rootfs,
            uncompressed,
        })
    }

    /// Builds the block image of `unpacked` next to it, then deletes the tree.
    fn build(
        &self,
        unpacked: Unpacked,
        id: &Digest,
        progress: &dyn Progress,
    ) -> Result<Built, ImageError> {
        let fs = self.config.fs_type;
        progress.stage(&format!("building {} image", fs.extension()));
        let Unpacked {
            tmp,
            rootfs,
            uncompressed,
        } = unpacked;
        let path = tmp.path().join(block_image_name(id, fs));
        blockimage::build(
            fs,
            &rootfs,
            &path,
            id.hex(),
            self.config.erofs_compressor.as_deref(),
        )?;
        // The unpacked tree is no longer needed; free its space before the commit.
        std::fs::remove_dir_all(&rootfs).map_err(io_err(&rootfs))?;
        Ok(Built {
            tmp,
            path,
            uncompressed,
        })
    }
}

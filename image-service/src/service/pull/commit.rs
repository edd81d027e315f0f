//! Pull step 6, commit, under the service's commit lock (it serializes record changes with removals,
//! leases and garbage collection): the built block image is renamed into `blocks/` and the image record
//! stored with its tags, digest references and blobs. An image already built (the same config under
//! another tag or digest, same filesystem, block image present) only gets the new references.

use std::sync::atomic::Ordering;

use super::build::Built;
use super::{now, PullPlan};
use crate::content::Digest;
use crate::meta::{block_image_name, ImageRecord};
use crate::service::{io_err, ImageError, Inner, Progress};

impl Inner {
    /// Commits the plan's references to the stored record of its image if that image is already built;
    /// `None` when it has to be built.
    pub(super) async fn reuse_built(
        &self,
        plan: &PullPlan,
        layers: &[Digest],
        progress: &dyn Progress,
    ) -> Result<Option<ImageRecord>, ImageError> {
        let Some(mut record) = self.meta.get(&plan.id)? else {
            return Ok(None);
        };
        if record.fs_type != self.config.fs_type || !self.blocks.join(&record.block_image).is_file()
        {
            return Ok(None);
        }
        let _commit = self.commit.lock().await;
        record.repo_tags = plan.repo_tags.clone();
        record.repo_digests = plan.repo_digests.clone();
        record.blobs = plan.blobs(layers);
        progress.stage("done");
        Ok(Some(self.meta.put(record)?))
    }

    /// Moves the `built` block image into place and stores the image's record.
    pub(super) async fn commit_pull(
        &self,
        plan: &PullPlan,
        layers: Vec<Digest>,
        user: String,
        built: Built,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, ImageError> {
        let fs = self.config.fs_type;
        let block_image = block_image_name(&plan.id, fs);
        let _commit = self.commit.lock().await;
        let dest = self.blocks.join(&block_image);
        std::fs::rename(&built.path, &dest).map_err(io_err(&dest))?;
        drop(built.tmp);
        self.images_built.fetch_add(1, Ordering::Relaxed);
        let block_image_size = std::fs::metadata(&dest).map_err(io_err(&dest))?.len();
        let record = self.meta.put(ImageRecord {
            id: plan.id.clone(),
            repo_tags: plan.repo_tags.clone(),
            repo_digests: plan.repo_digests.clone(),
            manifest_digest: plan.manifest_digest.clone(),
            blobs: plan.blobs(&layers),
            layers,
            size: plan.size(),
            uncompressed_size: built.uncompressed,
            block_image,
            fs_type: fs,
            block_image_size,
            user,
            created_unix: now(),
        })?;
        progress.stage("done");
        tracing::info!(image = %plan.reference, id = %record.id, "image pulled");
        Ok(record)
    }
}

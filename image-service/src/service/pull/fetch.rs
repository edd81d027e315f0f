//! Pull step 3, fetch: the config, then the layers (at most `max_concurrent_downloads` at once), each
//! into the content store unless it is there, verified against its digest and size as it is written.
//! A blob another pull is fetching is waited for (the store's per-digest lock), not fetched twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::ImageConfiguration;

use super::{size_of, PullPlan};
use crate::content::Digest;
use crate::registry::Remote;
use crate::service::{ImageError, Inner, Progress};

impl Inner {
    /// Fetches the plan's config unless it is in the store, and parses it.
    pub(super) async fn fetch_config(
        &self,
        plan: &PullPlan,
    ) -> Result<ImageConfiguration, ImageError> {
        let id = &plan.id;
        {
            let _lock = self.content.lock(id).await;
            if !self.content.contains(id) {
                plan.remote
                    .fetch_blob(
                        plan.endpoint,
                        id,
                        plan.config().size(),
                        &self.content,
                        |_| {},
                    )
                    .await?;
                self.blobs_fetched.fetch_add(1, Ordering::Relaxed);
            }
        }
        serde_json::from_slice(&self.content.read(id)?).map_err(ImageError::BadConfig)
    }

    /// Reports the layers to `progress`, then fetches the missing ones in parallel.
    pub(super) async fn fetch_layers(
        self: &Arc<Self>,
        plan: &PullPlan,
        layers: &[Digest],
        progress: &Arc<dyn Progress>,
    ) -> Result<(), ImageError> {
        progress.resolved(layers.len(), plan.layers().iter().map(size_of).sum());
        let max = self.config.max_concurrent_downloads.max(1);
        let mut downloads = Vec::new();
        for (l, d) in plan.layers().iter().zip(layers) {
            let (this, remote, progress) = (self.clone(), &plan.remote, progress.clone());
            let (d, size, endpoint) = (d.clone(), size_of(l), plan.endpoint);
            downloads
                .push(async move { this.fetch_layer(remote, endpoint, d, size, progress).await });
        }
        futures_util::stream::iter(downloads)
            .buffer_unordered(max)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Downloads one layer unless it is in the store (or another pull is fetching it: then waits for that).
    async fn fetch_layer(
        self: Arc<Self>,
        remote: &Remote,
        endpoint: usize,
        d: Digest,
        size: u64,
        progress: Arc<dyn Progress>,
    ) -> Result<(), ImageError> {
        let _lock = self.content.lock(&d).await;
        if self.content.contains(&d) {
            progress.layer_done(&d, size, true);
            return Ok(());
        }
        let p = progress.clone();
        remote
            .fetch_blob(endpoint, &d, size, &self.content, move |n| p.bytes(n))
            .await?;
        self.blobs_fetched.fetch_add(1, Ordering::Relaxed);
        progress.layer_done(&d, size, false);
        Ok(())
    }
}

//! One pull, as a plan and its steps:
//!
//! 1. resolve (`resolve.rs`): the reference to its linux/amd64 manifest (through an index if it names
//!    one); the index and manifest go into the content store. Yields the [`PullPlan`].
//! 2. verify (`verify.rs`): the manifest's descriptors before anything is fetched (layer media types,
//!    digests, sizes against the limits; the config's size); after the config is fetched, its platform
//!    and its diff_ids against the layers.
//! 3. fetch (`fetch.rs`): the config, then the missing layers in parallel, each verified against its
//!    digest and size into the content store.
//! 4. unpack (`build.rs`): the layers applied into a temporary root, each checked against its diff_id.
//! 5. build (`build.rs`): the block image, built next to the root.
//! 6. commit (`commit.rs`): the block image renamed into place and the record (tags, digests, blobs)
//!    stored. An image already built under another reference skips the layer fetch, 4 and 5: only its
//!    references are committed.
//!
//! [`Inner::pull_pinned`] runs them in this order: resolve, verify the descriptors, fetch the config,
//! verify it, (an image already built: commit its new references, done), fetch the layers, unpack, build,
//! commit. Progress: `resolved` and `layer_done` from the layer fetch, `unpacking` before unpack,
//! `building <fs> image` before build, `done` at commit.
//!
//! Every blob the pull uses is pinned against garbage collection from the moment it is named; a failed
//! pull deletes those no stored image references (see [`Inner::pull`]).

mod build;
mod commit;
mod fetch;
mod resolve;
mod verify;

pub use verify::MAX_CONFIG_BYTES;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use oci_client::Reference;
use oci_spec::image::{Descriptor, ImageManifest};

use super::{ImageError, Inner, Pins, Progress};
use crate::content::Digest;
use crate::meta::ImageRecord;
use crate::registry::{Credentials, Remote};

/// What [`Inner::resolve`] learned about an image: where its blobs come from, its manifest, and the
/// references it will be recorded under. The later steps take it and each other's outputs.
struct PullPlan {
    /// The reference pulled.
    reference: Reference,
    /// The registry endpoints for it.
    remote: Remote,
    /// The endpoint that resolved it (blobs are fetched from it first).
    endpoint: usize,
    /// The index the reference named, if it named one.
    index: Option<Digest>,
    /// The linux/amd64 image manifest's digest.
    manifest_digest: Digest,
    /// Its size in bytes.
    manifest_size: u64,
    /// The manifest.
    manifest: ImageManifest,
    /// The config blob's digest: the image id.
    id: Digest,
    /// `<registry>/<repository>:<tag>` when the reference has a tag and no digest.
    repo_tags: Vec<String>,
    /// `<registry>/<repository>@<digest>` of the index, else of the manifest.
    repo_digests: Vec<String>,
}

impl PullPlan {
    /// The config's descriptor.
    fn config(&self) -> &Descriptor {
        self.manifest.config()
    }

    /// The layers' descriptors, bottom first.
    fn layers(&self) -> &[Descriptor] {
        self.manifest.layers()
    }

    /// Every blob the image keeps alive: the index, the manifest, the config, then `layers`.
    fn blobs(&self, layers: &[Digest]) -> Vec<Digest> {
        let mut blobs: Vec<Digest> = self.index.iter().cloned().collect();
        blobs.push(self.manifest_digest.clone());
        blobs.push(self.id.clone());
        blobs.extend(layers.iter().cloned());
        blobs
    }

    /// Bytes of the image content: manifest, config and compressed layers.
    fn size(&self) -> u64 {
        self.manifest_size + self.config().size() + self.layers().iter().map(size_of).sum::<u64>()
    }
}

struct NoProgress;
impl Progress for NoProgress {}

fn digest_of(d: &Descriptor) -> Result<Digest, ImageError> {
    Ok(d.digest().to_string().parse()?)
}

fn size_of(d: &Descriptor) -> u64 {
    d.size()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Inner {
    /// Pulls `reference`; when that fails, deletes the blobs it pinned (fetched or found) that no stored
    /// image references and no other pull in progress uses, so a failed pull leaves nothing behind.
    pub(super) async fn pull(
        self: &Arc<Self>,
        reference: Reference,
        creds: &Credentials,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<ImageRecord, ImageError> {
        let mut pins = Pins::new(self);
        let res = self
            .pull_pinned(reference, creds, progress, &mut pins)
            .await;
        if let Err(e) = &res {
            let touched = pins.release();
            match self.collect_unreferenced(&touched).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(blobs = n, error = %e, "collected the blobs of a failed pull")
                }
                Err(gc) => tracing::warn!(error = %gc, "collecting the blobs of a failed pull"),
            }
        }
        res
    }

    /// The steps of a pull, each blob pinned in `pins` as it is named.
    async fn pull_pinned(
        self: &Arc<Self>,
        reference: Reference,
        creds: &Credentials,
        progress: Option<Arc<dyn Progress>>,
        pins: &mut Pins,
    ) -> Result<ImageRecord, ImageError> {
        let progress: Arc<dyn Progress> = progress.unwrap_or_else(|| Arc::new(NoProgress));
        let plan = self.resolve(reference, creds, pins).await?;
        let layers = self.verify(&plan, pins)?;
        let config = self.fetch_config(&plan).await?;
        let image = verify::verify_config(&config, layers.len())?;
        if let Some(record) = self.reuse_built(&plan, &layers, progress.as_ref()).await? {
            return Ok(record);
        }
        self.fetch_layers(&plan, &layers, &progress).await?;
        let built = self
            .unpack_and_build(&plan.id, &layers, image.diff_ids, &progress)
            .await?;
        self.commit_pull(&plan, layers, image.user, built, progress.as_ref())
            .await
    }
}

//! One pull: resolve, fetch missing blobs in parallel (verified into the content store), apply the layers
//! into a temporary root, build the block image, then rename it into place and commit the record.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};
use oci_client::Reference;
use oci_spec::image::{Descriptor, ImageConfiguration, MediaType};

use super::{io_err, ImageError, Inner, Pins, Progress};
use crate::apply::Applier;
use crate::blockimage;
use crate::content::Digest;
use crate::meta::{block_image_name, ImageRecord};
use crate::registry::{Credentials, Remote, Resolved};

/// Largest image config accepted (it is read into memory and parsed): 4 MiB, the config limit of
/// containers/image (CRI-O, Podman). containerd sets none beyond the descriptor's size; manifests get
/// [`crate::registry::MAX_MANIFEST_BYTES`].
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

struct NoProgress;
impl Progress for NoProgress {}

fn digest_of(d: &Descriptor) -> Result<Digest, ImageError> {
    Ok(d.digest().to_string().parse()?)
}

fn size_of(d: &Descriptor) -> u64 {
    d.size()
}

/// Checks a layer's media type is one podvisor can unpack (the compression itself is sniffed).
fn check_layer_type(d: &Descriptor) -> Result<(), ImageError> {
    let ok = match d.media_type() {
        MediaType::ImageLayer
        | MediaType::ImageLayerGzip
        | MediaType::ImageLayerZstd
        | MediaType::ImageLayerNonDistributable
        | MediaType::ImageLayerNonDistributableGzip
        | MediaType::ImageLayerNonDistributableZstd => true,
        MediaType::Other(t) => matches!(
            t.as_str(),
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
                | "application/vnd.docker.image.rootfs.diff.tar"
                | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        ),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadImage(format!(
            "layer {} has unsupported media type {}",
            d.digest(),
            d.media_type()
        )))
    }
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

    async fn pull_pinned(
        self: &Arc<Self>,
        reference: Reference,
        creds: &Credentials,
        progress: Option<Arc<dyn Progress>>,
        pins: &mut Pins,
    ) -> Result<ImageRecord, ImageError> {
        let progress: Arc<dyn Progress> = progress.unwrap_or_else(|| Arc::new(NoProgress));
        let remote = Remote::new(
            reference.clone(),
            &self.hosts,
            creds,
            self.config.registry_timeout,
        )?;
        let resolved = remote.resolve().await?;
        let Resolved {
            endpoint,
            index,
            manifest_digest,
            manifest_bytes,
            manifest,
        } = resolved;
        let config_desc = manifest.config();
        let id = digest_of(config_desc)?;
        let layers = manifest.layers();
        let mut blobs = Vec::new();
        if let Some((d, bytes)) = &index {
            pins.add(d);
            self.content.write_bytes(d, bytes)?;
            blobs.push(d.clone());
        }
        pins.add(&manifest_digest);
        self.content
            .write_bytes(&manifest_digest, &manifest_bytes)?;
        blobs.push(manifest_digest.clone());
        pins.add(&id);
        blobs.push(id.clone());
        let mut layer_digests = Vec::new();
        for l in layers {
            check_layer_type(l)?;
            if size_of(l) > self.config.limits.max_layer_bytes {
                return Err(ImageError::BadImage(format!(
                    "layer {} is {} bytes compressed, over the {}-byte layer limit",
                    l.digest(),
                    size_of(l),
                    self.config.limits.max_layer_bytes
                )));
            }
            let d = digest_of(l)?;
            pins.add(&d);
            layer_digests.push(d);
        }
        blobs.extend(layer_digests.iter().cloned());
        let top = index.as_ref().map(|(d, _)| d).unwrap_or(&manifest_digest);
        let repo = format!("{}/{}", reference.registry(), reference.repository());
        let repo_tags = match (reference.tag(), reference.digest()) {
            (Some(tag), None) => vec![format!("{repo}:{tag}")],
            _ => vec![],
        };
        let repo_digests = vec![format!("{repo}@{top}")];

        // The config first: it names the platform and the diff_ids the layers must match.
        if config_desc.size() > MAX_CONFIG_BYTES {
            return Err(ImageError::BadImage(format!(
                "image config {id} is {} bytes, over the {MAX_CONFIG_BYTES}-byte limit",
                config_desc.size()
            )));
        }
        {
            let _lock = self.content.lock(&id).await;
            if !self.content.contains(&id) {
                remote
                    .fetch_blob(endpoint, &id, config_desc.size(), &self.content, |_| {})
                    .await?;
                self.blobs_fetched.fetch_add(1, Ordering::Relaxed);
            }
        }
        let config: ImageConfiguration =
            serde_json::from_slice(&self.content.read(&id)?).map_err(ImageError::BadConfig)?;
        if config.os().to_string() != "linux" || config.architecture().to_string() != "amd64" {
            return Err(ImageError::BadImage(format!(
                "image is for {}/{}, not linux/amd64",
                config.os(),
                config.architecture()
            )));
        }
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != layer_digests.len() {
            return Err(ImageError::BadImage(format!(
                "manifest has {} layers but the config lists {} diff_ids",
                layer_digests.len(),
                diff_ids.len()
            )));
        }
        let user = config
            .config()
            .as_ref()
            .and_then(|c| c.user().clone())
            .unwrap_or_default();
        let fs = self.config.fs_type;
        let block_image = block_image_name(&id, fs);
        let size = manifest_bytes.len() as u64
            + config_desc.size()
            + layers.iter().map(size_of).sum::<u64>();

        // Already built (another tag or digest of the same image): only the references are new.
        if let Some(existing) = self.meta.get(&id)? {
            if existing.fs_type == fs && self.blocks.join(&existing.block_image).is_file() {
                let _commit = self.commit.lock().await;
                let mut rec = existing;
                rec.repo_tags = repo_tags;
                rec.repo_digests = repo_digests;
                rec.blobs = blobs;
                progress.stage("done");
                return Ok(self.meta.put(rec)?);
            }
        }

        progress.resolved(layers.len(), layers.iter().map(size_of).sum());
        let max = self.config.max_concurrent_downloads.max(1);
        let mut downloads = Vec::new();
        for (l, d) in layers.iter().zip(&layer_digests) {
            let (this, remote, progress) = (self.clone(), &remote, progress.clone());
            let (d, size) = (d.clone(), size_of(l));
            downloads
                .push(async move { this.fetch_layer(remote, endpoint, d, size, progress).await });
        }
        futures_util::stream::iter(downloads)
            .buffer_unordered(max)
            .try_collect::<Vec<()>>()
            .await?;

        progress.stage("unpacking");
        let this = self.clone();
        let (layers_c, diff_ids_c, id_c, p) = (
            layer_digests.clone(),
            diff_ids,
            id.clone(),
            progress.clone(),
        );
        let (tmp, built, uncompressed) = tokio::task::spawn_blocking(move || {
            this.build(&layers_c, &diff_ids_c, &id_c, p.as_ref())
        })
        .await??;

        let _commit = self.commit.lock().await;
        let dest = self.blocks.join(&block_image);
        std::fs::rename(&built, &dest).map_err(io_err(&dest))?;
        drop(tmp);
        self.images_built.fetch_add(1, Ordering::Relaxed);
        let block_image_size = std::fs::metadata(&dest).map_err(io_err(&dest))?.len();
        let record = self.meta.put(ImageRecord {
            id,
            repo_tags,
            repo_digests,
            manifest_digest,
            layers: layer_digests,
            blobs,
            size,
            uncompressed_size: uncompressed,
            block_image,
            fs_type: fs,
            block_image_size,
            user,
            created_unix: now(),
        })?;
        progress.stage("done");
        tracing::info!(image = %reference, id = %record.id, "image pulled");
        Ok(record)
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

    /// Applies the layers into a temporary root and builds the block image next to it. Returns the
    /// temporary directory (dropping it deletes everything left in it), the built image's path in it and
    /// the uncompressed size.
    fn build(
        &self,
        layers: &[Digest],
        diff_ids: &[String],
        id: &Digest,
        progress: &dyn Progress,
    ) -> Result<(tempfile::TempDir, std::path::PathBuf, u64), ImageError> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("build-{}-", &id.hex()[..12]))
            .tempdir_in(&self.tmp)
            .map_err(io_err(&self.tmp))?;
        let rootfs = tmp.path().join("rootfs");
        let mut applier =
            Applier::new(&rootfs, self.config.limits).map_err(|source| ImageError::Apply {
                layer: id.clone(),
                source,
            })?;
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            applier
                .apply_file(&self.content.path(layer), Some(diff_id))
                .map_err(|source| ImageError::Apply {
                    layer: layer.clone(),
                    source,
                })?;
        }
        let uncompressed = applier.total_bytes();
        applier.finish().map_err(|source| ImageError::Apply {
            layer: id.clone(),
            source,
        })?;
        let fs = self.config.fs_type;
        progress.stage(&format!("building {} image", fs.extension()));
        let out = tmp.path().join(block_image_name(id, fs));
        blockimage::build(
            fs,
            &rootfs,
            &out,
            id.hex(),
            self.config.erofs_compressor.as_deref(),
        )?;
        // The unpacked tree is no longer needed; free its space before the commit.
        std::fs::remove_dir_all(&rootfs).map_err(io_err(&rootfs))?;
        Ok((tmp, out, uncompressed))
    }
}

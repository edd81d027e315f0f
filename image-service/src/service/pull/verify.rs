//! Pull step 2, verify: the manifest's descriptors before anything is fetched (each layer's media type,
//! digest and compressed size against the layer limit; the config's size against
//! [`MAX_CONFIG_BYTES`]), and the fetched config against the manifest (linux/amd64, one diff_id per
//! layer). Blob contents are verified as they are fetched (digest, size) and applied (diff_id).

use oci_spec::image::{Descriptor, ImageConfiguration, MediaType};

use super::{digest_of, size_of, PullPlan};
use crate::content::Digest;
use crate::service::{ImageError, Inner, Pins};

/// Largest image config accepted (it is read into memory and parsed): 4 MiB, the config limit of
/// containers/image (CRI-O, Podman). containerd sets none beyond the descriptor's size; manifests get
/// [`crate::registry::MAX_MANIFEST_BYTES`].
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// What the image config tells the later steps.
pub(super) struct ConfigFacts {
    /// The uncompressed layers' digests, bottom first (one per layer).
    pub(super) diff_ids: Vec<String>,
    /// The config's `User` (may be empty).
    pub(super) user: String,
}

impl Inner {
    /// Checks the plan's layers (pinning each once checked), then the config's size. Returns the layer
    /// digests, bottom first.
    pub(super) fn verify(
        &self,
        plan: &PullPlan,
        pins: &mut Pins,
    ) -> Result<Vec<Digest>, ImageError> {
        let max_layer = self.config.limits.max_layer_bytes;
        let mut layers = Vec::new();
        for l in plan.layers() {
            check_layer_type(l)?;
            if size_of(l) > max_layer {
                return Err(ImageError::BadImage(format!(
                    "layer {} is {} bytes compressed, over the {max_layer}-byte layer limit",
                    l.digest(),
                    size_of(l),
                )));
            }
            let d = digest_of(l)?;
            pins.add(&d);
            layers.push(d);
        }
        // The config is fetched first (it names the platform and the diff_ids the layers must match).
        if plan.config().size() > MAX_CONFIG_BYTES {
            return Err(ImageError::BadImage(format!(
                "image config {} is {} bytes, over the {MAX_CONFIG_BYTES}-byte limit",
                plan.id,
                plan.config().size()
            )));
        }
        Ok(layers)
    }
}

/// Checks `config` is for linux/amd64 and lists one diff_id for each of the manifest's `layers`.
pub(super) fn verify_config(
    config: &ImageConfiguration,
    layers: usize,
) -> Result<ConfigFacts, ImageError> {
    if config.os().to_string() != "linux" || config.architecture().to_string() != "amd64" {
        return Err(ImageError::BadImage(format!(
            "image is for {}/{}, not linux/amd64",
            config.os(),
            config.architecture()
        )));
    }
    let diff_ids = config.rootfs().diff_ids().clone();
    if diff_ids.len() != layers {
        return Err(ImageError::BadImage(format!(
            "manifest has {layers} layers but the config lists {} diff_ids",
            diff_ids.len()
        )));
    }
    let user = config
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .unwrap_or_default();
    Ok(ConfigFacts { diff_ids, user })
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

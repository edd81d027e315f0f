//! Pull step 1, resolve: the reference to its linux/amd64 manifest on the first registry endpoint that
//! answers; the index (if the reference named one) and the manifest are pinned and stored, the config
//! (the image id) pinned. Yields the [`PullPlan`] and the references the image will be recorded under.

use oci_client::Reference;

use super::{digest_of, PullPlan};
use crate::registry::{Credentials, Remote, Resolved};
use crate::service::{ImageError, Inner, Pins};

impl Inner {
    /// Resolves `reference` with `creds` and stores its index and manifest (pinned in `pins`).
    pub(super) async fn resolve(
        &self,
        reference: Reference,
        creds: &Credentials,
        pins: &mut Pins,
    ) -> Result<PullPlan, ImageError> {
        let remote = Remote::new(
            reference.clone(),
            &self.hosts,
            creds,
            self.config.registry_timeout,
        )?;
        let Resolved {
            endpoint,
            index,
            manifest_digest,
            manifest_bytes,
            manifest,
        } = remote.resolve().await?;
        let id = digest_of(manifest.config())?;
        if let Some((d, bytes)) = &index {
            pins.add(d);
            self.content.write_bytes(d, bytes)?;
        }
        pins.add(&manifest_digest);
        self.content
            .write_bytes(&manifest_digest, &manifest_bytes)?;
        pins.add(&id);
        let index = index.map(|(d, _)| d);
        let (repo_tags, repo_digests) =
            references(&reference, index.as_ref().unwrap_or(&manifest_digest));
        Ok(PullPlan {
            reference,
            remote,
            endpoint,
            index,
            manifest_digest,
            manifest_size: manifest_bytes.len() as u64,
            manifest,
            id,
            repo_tags,
            repo_digests,
        })
    }
}

/// The tag reference (when `reference` has a tag and no digest) and the digest reference (to `top`, the
/// digest the reference resolved to) an image pulled by `reference` is recorded under.
fn references(reference: &Reference, top: &crate::content::Digest) -> (Vec<String>, Vec<String>) {
    let repo = format!("{}/{}", reference.registry(), reference.repository());
    let repo_tags = match (reference.tag(), reference.digest()) {
        (Some(tag), None) => vec![format!("{repo}:{tag}")],
        _ => vec![],
    };
    (repo_tags, vec![format!("{repo}@{top}")])
}

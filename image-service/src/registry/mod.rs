//! Talks to registries with `oci-client`: tries the configured endpoints (mirrors, then the upstream) in
//! order, resolves a reference to a linux/amd64 image manifest (through an image index or Docker manifest
//! list if needed) and streams blobs into the content store, where they are verified.

mod manifest;

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use oci_spec::image::{Arch, ImageIndex, ImageManifest, Os};

use crate::content::{ContentError, ContentStore, Digest};
use crate::hosts::{Endpoint, HostsError, RegistryHosts, Scheme};
use manifest::Auth;
pub use manifest::MAX_MANIFEST_BYTES;

/// Docker v2 schema2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ACCEPT: &[&str] = &[
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
];

/// Errors talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why.
        message: String,
    },
    /// The registry host configuration is broken.
    #[error(transparent)]
    Hosts(#[from] HostsError),
    /// No endpoint could be reached.
    #[error("registry {host} unreachable: {message}")]
    Unreachable {
        /// The endpoint.
        host: String,
        /// The transport error.
        message: String,
    },
    /// The registry does not have the manifest or blob.
    #[error("{what} not found on {host}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// The endpoint.
        host: String,
    },
    /// The registry refused the credentials (or anonymous access).
    #[error("{host}: unauthorized: {message}")]
    Unauthorized {
        /// The endpoint.
        host: String,
        /// Details.
        message: String,
    },
    /// Any other error from the registry or the protocol.
    #[error("{host}: {message}")]
    Protocol {
        /// The endpoint.
        host: String,
        /// Details.
        message: String,
    },
    /// A manifest or index is larger than [`MAX_MANIFEST_BYTES`] (announced by its descriptor or its
    /// `Content-Length`, or found while reading it: nothing past the limit is read).
    #[error("{what} is {}{size} bytes, over the {limit}-byte limit", if *.more { "at least " } else { "" })]
    TooLarge {
        /// What was fetched.
        what: String,
        /// Its announced size, or the bytes received when reading stopped.
        size: u64,
        /// Whether reading stopped at `size` (the whole is larger).
        more: bool,
        /// The limit.
        limit: u64,
    },
    /// The manifest is of a kind podvisor does not pull.
    #[error("unsupported manifest: {0}")]
    Unsupported(String),
    /// A manifest or index does not parse.
    #[error("unsupported manifest: {what}: {source}")]
    Malformed {
        /// What was parsed (`manifest is not JSON`, `bad image index`, `bad image manifest`).
        what: &'static str,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The index has no linux/amd64 image.
    #[error("{reference}: no linux/amd64 image in the index (has: {available})")]
    NoPlatform {
        /// The reference.
        reference: String,
        /// The platforms offered.
        available: String,
    },
    /// Storing or verifying content failed.
    #[error(transparent)]
    Content(#[from] ContentError),
}

/// Credentials for one pull (from CRI's AuthConfig).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// Username for basic auth.
    pub username: String,
    /// Password for basic auth.
    pub password: String,
    /// A bearer token for the registry, used as is.
    pub registry_token: String,
    /// The registry host these credentials are for; empty means the image's own registry. Mirrors only get
    /// credentials when this names them.
    pub server_address: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("server_address", &self.server_address)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    fn auth(&self) -> RegistryAuth {
        if !self.registry_token.is_empty() {
            RegistryAuth::Bearer(self.registry_token.clone())
        } else if !self.username.is_empty() {
            RegistryAuth::Basic(self.username.clone(), self.password.clone())
        } else {
            RegistryAuth::Anonymous
        }
    }
}

/// Parses and normalizes an image reference (`busybox` → `docker.io/library/busybox:latest`).
pub fn parse_reference(image: &str) -> Result<Reference, RegistryError> {
    image
        .parse::<Reference>()
        .map_err(|e| RegistryError::InvalidReference {
            reference: image.into(),
            message: e.to_string(),
        })
}

/// A manifest resolved from a registry, with the raw bytes of what was fetched.
#[derive(Debug)]
pub struct Resolved {
    /// Index of the endpoint that answered.
    pub endpoint: usize,
    /// The index or manifest list the reference pointed to, if it was one: (digest, bytes).
    pub index: Option<(Digest, Vec<u8>)>,
    /// The linux/amd64 image manifest's digest.
    pub manifest_digest: Digest,
    /// Its bytes.
    pub manifest_bytes: Vec<u8>,
    /// Parsed.
    pub manifest: ImageManifest,
}

struct Ep {
    endpoint: Endpoint,
    client: Client,
    /// For manifests, which oci-client would read whole.
    http: reqwest::Client,
    reference: Reference,
    auth: RegistryAuth,
}

/// One image reference on its registry endpoints, for the duration of a pull.
pub struct Remote {
    reference: Reference,
    endpoints: Vec<Ep>,
}

fn classify(host: &str, what: &str, e: OciDistributionError) -> RegistryError {
    let host = host.to_owned();
    match e {
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            RegistryError::Unreachable {
                host,
                message: format!("{e:?}").chars().take(300).collect(),
            }
        }
        OciDistributionError::UnauthorizedError { url } => {
            RegistryError::Unauthorized { host, message: url }
        }
        OciDistributionError::AuthenticationFailure(message) => {
            RegistryError::Unauthorized { host, message }
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let code = envelope.errors.first().map(|e| &e.code);
            match code {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound,
                ) => RegistryError::NotFound {
                    what: what.into(),
                    host,
                },
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                    RegistryError::Unauthorized {
                        host,
                        message: envelope.to_string(),
                    }
                }
                _ => RegistryError::Protocol {
                    host,
                    message: envelope.to_string(),
                },
            }
        }
        OciDistributionError::ServerError { code: 404, .. } => RegistryError::NotFound {
            what: what.into(),
            host,
        },
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        } => RegistryError::Unauthorized { host, message },
        other => RegistryError::Protocol {
            host,
            message: other.to_string(),
        },
    }
}

fn read_cas(ep: &Endpoint) -> Result<Vec<Vec<u8>>, RegistryError> {
    ep.ca
        .iter()
        .map(|ca| {
            std::fs::read(ca).map_err(|e| RegistryError::Protocol {
                host: ep.host.clone(),
                message: format!("CA file {}: {e}", ca.display()),
            })
        })
        .collect()
}

fn client_for(ep: &Endpoint, ca: &[Vec<u8>], timeout: Duration) -> Result<Client, RegistryError> {
    let extra = ca
        .iter()
        .map(|data| oci_client::client::Certificate {
            encoding: oci_client::client::CertificateEncoding::Pem,
            data: data.clone(),
        })
        .collect();
    let config = ClientConfig {
        protocol: match ep.scheme {
            Scheme::Http => ClientProtocol::Http,
            Scheme::Https => ClientProtocol::Https,
        },
        accept_invalid_certificates: ep.skip_verify,
        extra_root_certificates: extra,
        platform_resolver: None,
        connect_timeout: Some(timeout),
        read_timeout: Some(timeout),
        user_agent: concat!("podvisor/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    };
    Client::try_from(config).map_err(|e| RegistryError::Protocol {
        host: ep.host.clone(),
        message: format!("cannot build the HTTP client: {e}"),
    })
}

fn platform_ok(p: Option<&oci_spec::image::Platform>) -> bool {
    p.is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
}

fn malformed(what: &'static str) -> impl FnOnce(serde_json::Error) -> RegistryError {
    move |source| RegistryError::Malformed { what, source }
}

fn media_type_of(bytes: &[u8]) -> Result<String, RegistryError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(malformed("manifest is not JSON"))?;
    if v.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
        return Err(RegistryError::Unsupported(
            "only schema version 2 manifests are supported (Docker schema 1 is not)".into(),
        ));
    }
    Ok(match v.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => m.to_owned(),
        None if v.get("manifests").is_some() => OCI_INDEX.into(),
        None => OCI_MANIFEST.into(),
    })
}

/// oci-client verifies a blob's digest itself and reports a mismatch as an I/O error ending the stream:
/// turn that back into the digest mismatch it is (corrupt content, not a transport failure).
fn verification(digest: &Digest, e: ContentError) -> ContentError {
    if let ContentError::Stream { source, .. } = &e {
        let inner = source
            .get_ref()
            .and_then(|i| i.downcast_ref::<DigestError>());
        if let Some(DigestError::VerificationError { actual, .. }) = inner {
            return ContentError::DigestMismatch {
                expected: digest.clone(),
                actual: actual.clone(),
            };
        }
    }
    e
}

impl Remote {
    /// Prepares clients for every endpoint of `reference`'s registry.
    pub fn new(
        reference: Reference,
        hosts: &RegistryHosts,
        creds: &Credentials,
        timeout: Duration,
    ) -> Result<Remote, RegistryError> {
        let endpoints = hosts.endpoints(reference.registry(), reference.resolve_registry())?;
        let mut eps = Vec::new();
        for endpoint in endpoints {
            let mut r = reference.clone();
            if endpoint.host != reference.resolve_registry() {
                // The mirror serves the upstream's repositories (containerd's `?ns=` convention).
                r.set_mirror_registry(endpoint.host.clone());
            }
            let for_this = creds.server_address.is_empty() && !endpoint.mirror
                || creds.server_address == endpoint.host
                || creds.server_address == reference.registry() && !endpoint.mirror;
            let ca = read_cas(&endpoint)?;
            eps.push(Ep {
                client: client_for(&endpoint, &ca, timeout)?,
                http: manifest::http_client(&endpoint, &ca, timeout)?,
                auth: if for_this {
                    creds.auth()
                } else {
                    RegistryAuth::Anonymous
                },
                endpoint,
                reference: r,
            });
        }
        Ok(Remote {
            reference,
            endpoints: eps,
        })
    }

    /// The normalized reference.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// Fetches a manifest or index (at most [`MAX_MANIFEST_BYTES`]) and checks it against the digest
    /// it was asked by, else the digest the registry announced.
    async fn fetch_manifest(
        &self,
        ep: &Ep,
        auth: &Auth,
        reference: &Reference,
    ) -> Result<(Digest, Vec<u8>), RegistryError> {
        let what = format!("manifest {reference}");
        let fetched =
            manifest::fetch(&ep.http, &ep.endpoint, reference, auth, ACCEPT, &what).await?;
        let actual = Digest::of(&fetched.bytes);
        if let Some(wanted) = reference.digest().or(fetched.digest_header.as_deref()) {
            if actual.as_str() != wanted {
                return Err(ContentError::DigestMismatch {
                    expected: wanted.parse()?,
                    actual: actual.to_string(),
                }
                .into());
            }
        }
        Ok((actual, fetched.bytes))
    }

    async fn resolve_on(&self, i: usize) -> Result<Resolved, RegistryError> {
        let ep = &self.endpoints[i];
        let host = &ep.endpoint.host;
        let token = ep
            .client
            .auth(&ep.reference, &ep.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| classify(host, "authentication", e))?;
        let auth = Auth::after(token, &ep.auth);
        let (digest, bytes) = self.fetch_manifest(ep, &auth, &ep.reference).await?;
        let mt = media_type_of(&bytes)?;
        let (index, manifest_digest, manifest_bytes) =
            if mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST {
                let idx: ImageIndex =
                    serde_json::from_slice(&bytes).map_err(malformed("bad image index"))?;
                let candidates: Vec<_> = idx
                    .manifests()
                    .iter()
                    .filter(|m| platform_ok(m.platform().as_ref()))
                    .collect();
                let chosen = candidates
                    .iter()
                    .find(|m| {
                        m.platform()
                            .as_ref()
                            .and_then(|p| p.variant().clone())
                            .is_none()
                    })
                    .or(candidates.first())
                    .ok_or_else(|| RegistryError::NoPlatform {
                        reference: self.reference.whole(),
                        available: idx
                            .manifests()
                            .iter()
                            .filter_map(|m| m.platform().as_ref())
                            .map(|p| format!("{}/{}", p.os(), p.architecture()))
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                if chosen.size() > MAX_MANIFEST_BYTES {
                    return Err(RegistryError::TooLarge {
                        what: format!("manifest {}", chosen.digest()),
                        size: chosen.size(),
                        more: false,
                        limit: MAX_MANIFEST_BYTES,
                    });
                }
                let child = ep.reference.clone_with_digest(chosen.digest().to_string());
                let (md, mb) = self.fetch_manifest(ep, &auth, &child).await?;
                (Some((digest, bytes)), md, mb)
            } else if mt == OCI_MANIFEST || mt == DOCKER_MANIFEST {
                (None, digest, bytes)
            } else {
                return Err(RegistryError::Unsupported(format!("media type {mt}")));
            };
        let mt = media_type_of(&manifest_bytes)?;
        if mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
            return Err(RegistryError::Unsupported(format!(
                "index entry is {mt}, not an image manifest"
            )));
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(malformed("bad image manifest"))?;
        Ok(Resolved {
            endpoint: i,
            index,
            manifest_digest,
            manifest_bytes,
            manifest,
        })
    }

    /// Resolves the reference on the first endpoint that can, mirrors first.
    pub async fn resolve(&self) -> Result<Resolved, RegistryError> {
        let by_digest = self.reference.digest().is_some();
        let mut last: Option<RegistryError> = None;
        for (i, ep) in self.endpoints.iter().enumerate() {
            if !(ep.endpoint.resolve || by_digest && ep.endpoint.pull) {
                continue;
            }
            match self.resolve_on(i).await {
                Ok(r) => return Ok(r),
                Err(
                    e @ (RegistryError::Content(_)
                    | RegistryError::Unsupported(_)
                    | RegistryError::Malformed { .. }),
                ) => return Err(e),
                Err(e) => {
                    tracing::debug!(host = %ep.endpoint.host, error = %e, "endpoint failed, trying the next");
                    // Prefer an answer from a registry over "unreachable" when reporting.
                    if !matches!(e, RegistryError::Unreachable { .. })
                        || !last
                            .as_ref()
                            .is_some_and(|l| !matches!(l, RegistryError::Unreachable { .. }))
                    {
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Protocol {
            host: self.reference.registry().into(),
            message: "no endpoint with the resolve capability is configured".into(),
        }))
    }

    /// Fetches blob `digest` of `size` bytes into `store` (verified there), from `preferred` first.
    pub async fn fetch_blob(
        &self,
        preferred: usize,
        digest: &Digest,
        size: u64,
        store: &ContentStore,
        on_bytes: impl FnMut(u64),
    ) -> Result<(), RegistryError> {
        let order = std::iter::once(preferred)
            .chain((0..self.endpoints.len()).filter(|&i| i != preferred))
            .filter(|&i| self.endpoints[i].endpoint.pull);
        let mut last = None;
        for i in order {
            let ep = &self.endpoints[i];
            match ep
                .client
                .pull_blob_stream(&ep.reference, digest.as_str())
                .await
            {
                Ok(stream) => {
                    if let Some(n) = stream.content_length.filter(|&n| n > size) {
                        // Refused before reading: the registry announces more than the descriptor.
                        return Err(ContentError::SizeMismatch {
                            digest: digest.clone(),
                            expected: size,
                            actual: n,
                            more: false,
                        }
                        .into());
                    }
                    return store
                        .write_stream(digest, size, stream, on_bytes)
                        .await
                        .map_err(|e| verification(digest, e).into());
                }
                Err(e) => last = Some(classify(&ep.endpoint.host, &format!("blob {digest}"), e)),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Protocol {
            host: self.reference.registry().into(),
            message: "no endpoint with the pull capability is configured".into(),
        }))
    }
}

#[cfg(test)]
mod tests;

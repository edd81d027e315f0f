//! Bounded manifest fetches. oci-client reads a whole manifest response into memory, whatever its size, and
//! has no option to bound it, so manifests and indexes are fetched here with reqwest (the HTTP client
//! oci-client is built on) using the token oci-client negotiated: a `Content-Length` over the cap fails
//! before the body is read, and reading stops as soon as the body passes the cap.

use std::time::Duration;

use oci_client::secrets::RegistryAuth;
use oci_client::Reference;

use super::RegistryError;
use crate::hosts::{Endpoint, Scheme};

/// Largest manifest or index accepted: containerd's `MaxManifestSize` (4 × 1048 × 1048 bytes, sic).
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1048 * 1048;

/// Error bodies kept for the message.
const MAX_ERROR_BODY: usize = 4096;

/// How a manifest request authenticates.
#[derive(Clone, Debug)]
pub(super) enum Auth {
    /// No credentials.
    Anonymous,
    /// A bearer token (negotiated by oci-client, or given).
    Bearer(String),
    /// HTTP basic auth.
    Basic(String, String),
}

impl Auth {
    /// The auth for a request after oci-client's `auth` returned `token` for credentials `creds`.
    pub(super) fn after(token: Option<String>, creds: &RegistryAuth) -> Auth {
        match (token, creds) {
            (Some(t), _) => Auth::Bearer(t),
            (None, RegistryAuth::Basic(u, p)) => Auth::Basic(u.clone(), p.clone()),
            (None, RegistryAuth::Bearer(t)) => Auth::Bearer(t.clone()),
            (None, RegistryAuth::Anonymous) => Auth::Anonymous,
        }
    }
}

/// A manifest as served: its bytes and the `Docker-Content-Digest` header, if any.
pub(super) struct Fetched {
    pub(super) bytes: Vec<u8>,
    pub(super) digest_header: Option<String>,
}

/// The HTTP client for one endpoint, configured as its oci-client (CAs, TLS verification, timeouts).
pub(super) fn http_client(
    ep: &Endpoint,
    ca: &[Vec<u8>],
    timeout: Duration,
) -> Result<reqwest::Client, RegistryError> {
    let protocol = |message: String| RegistryError::Protocol {
        host: ep.host.clone(),
        message,
    };
    let mut certs = Vec::new();
    for pem in ca {
        certs.push(reqwest::Certificate::from_pem(pem).map_err(|e| protocol(format!("CA: {e}")))?);
    }
    reqwest::Client::builder()
        .danger_accept_invalid_certs(ep.skip_verify)
        .tls_certs_merge(certs)
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .user_agent(concat!("podvisor/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| protocol(format!("cannot build the HTTP client: {e}")))
}

fn url(ep: &Endpoint, reference: &Reference) -> String {
    let scheme = match ep.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let target = match reference.digest() {
        Some(d) => d,
        None => reference.tag().unwrap_or("latest"),
    };
    let ns = reference
        .namespace()
        .map(|ns| format!("?ns={ns}"))
        .unwrap_or_default();
    format!(
        "{scheme}://{}/v2/{}/manifests/{target}{ns}",
        reference.resolve_registry(),
        reference.repository()
    )
}

fn transport(host: &str, e: reqwest::Error) -> RegistryError {
    if e.is_connect() || e.is_timeout() {
        RegistryError::Unreachable {
            host: host.into(),
            message: format!("{e:?}").chars().take(300).collect(),
        }
    } else {
        RegistryError::Protocol {
            host: host.into(),
            message: e.to_string(),
        }
    }
}

fn too_large(what: &str, size: u64, announced: bool) -> RegistryError {
    RegistryError::TooLarge {
        what: what.into(),
        size,
        more: !announced,
        limit: MAX_MANIFEST_BYTES,
    }
}

/// GETs `reference`'s manifest from `ep`, refusing (before or while reading) a body over
/// [`MAX_MANIFEST_BYTES`]. `what` names it in errors.
pub(super) async fn fetch(
    client: &reqwest::Client,
    ep: &Endpoint,
    reference: &Reference,
    auth: &Auth,
    accept: &[&str],
    what: &str,
) -> Result<Fetched, RegistryError> {
    let host = ep.host.as_str();
    let mut req = client
        .get(url(ep, reference))
        .header("Accept", accept.join(", "));
    req = match auth {
        Auth::Anonymous => req,
        Auth::Bearer(t) => req.bearer_auth(t),
        Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
    };
    let mut res = req.send().await.map_err(|e| transport(host, e))?;
    let status = res.status();
    if !status.is_success() {
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| transport(host, e))? {
            body.extend_from_slice(&chunk[..chunk.len().min(MAX_ERROR_BODY - body.len())]);
            if body.len() >= MAX_ERROR_BODY {
                break;
            }
        }
        let message = format!("{status}: {}", String::from_utf8_lossy(&body).trim());
        return Err(match status.as_u16() {
            404 => RegistryError::NotFound {
                what: what.into(),
                host: host.into(),
            },
            401 | 403 => RegistryError::Unauthorized {
                host: host.into(),
                message,
            },
            _ => RegistryError::Protocol {
                host: host.into(),
                message,
            },
        });
    }
    if let Some(n) = res.content_length() {
        if n > MAX_MANIFEST_BYTES {
            return Err(too_large(what, n, true));
        }
    }
    let digest_header = res
        .headers()
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut bytes = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| transport(host, e))? {
        let len = bytes.len() as u64 + chunk.len() as u64;
        if len > MAX_MANIFEST_BYTES {
            return Err(too_large(what, len, false));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        bytes,
        digest_header,
    })
}

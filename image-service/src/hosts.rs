//! Registry host configuration in containerd's `certs.d` layout: `<config dir>/<registry>/hosts.toml`
//! (falling back to `<config dir>/_default/hosts.toml`) lists mirrors tried in order before the upstream
//! `server`; an `http://` host is a plain-http (insecure) registry, `skip_verify` accepts any TLS certificate.
//!
//! ```toml
//! server = "https://registry-1.docker.io"
//! [host."http://127.0.0.1:5000"]
//!   capabilities = ["pull", "resolve"]
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading registry host configuration.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid hosts.toml.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// URL scheme of a registry endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (an insecure registry).
    Http,
    /// HTTPS.
    Https,
}

/// One place a registry's content can be fetched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host[:port]`.
    pub host: String,
    /// May be asked to resolve a tag to a manifest.
    pub resolve: bool,
    /// May serve manifests by digest and blobs.
    pub pull: bool,
    /// Accept any TLS certificate.
    pub skip_verify: bool,
    /// Extra PEM CA files trusted for this host.
    pub ca: Vec<PathBuf>,
    /// Whether this is a mirror (true) or the upstream server (false).
    pub mirror: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HostSection {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    #[allow(dead_code)]
    header: Option<toml::Table>,
    #[allow(dead_code)]
    override_path: Option<bool>,
    #[allow(dead_code)]
    client: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Deserialize, Default)]
struct HostsFile {
    server: Option<String>,
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    #[serde(default)]
    host: toml::Table,
}

/// Reads `certs.d`-style configuration for each registry on demand.
#[derive(Clone, Debug)]
pub struct RegistryHosts {
    dir: PathBuf,
}

fn parse_url(url: &str, path: &Path) -> Result<(Scheme, String), HostsError> {
    let invalid = |message: String| HostsError::Invalid {
        path: path.to_owned(),
        message,
    };
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else if url.contains("://") {
        return Err(invalid(format!(
            "{url}: only http:// and https:// hosts are supported"
        )));
    } else {
        (Scheme::Https, url)
    };
    let (host, rest) = rest.split_once('/').unwrap_or((rest, ""));
    if !matches!(rest.trim_end_matches('/'), "" | "v2") {
        return Err(invalid(format!(
            "{url}: a path prefix other than /v2 is not supported"
        )));
    }
    if host.is_empty() || host.contains(['@', '?', '#', ' ']) {
        return Err(invalid(format!("{url}: not a host[:port]")));
    }
    Ok((scheme, host.to_owned()))
}

fn caps(list: Option<&Vec<String>>) -> (bool, bool) {
    match list {
        None => (true, true),
        Some(l) => (
            l.iter().any(|c| c == "resolve"),
            l.iter().any(|c| c == "pull"),
        ),
    }
}

fn cas(ca: Option<OneOrMany>, base: &Path) -> Vec<PathBuf> {
    let list = match ca {
        None => vec![],
        Some(OneOrMany::One(p)) => vec![p],
        Some(OneOrMany::Many(v)) => v,
    };
    list.into_iter()
        .map(|p| if p.is_relative() { base.join(p) } else { p })
        .collect()
}

impl RegistryHosts {
    /// Configuration under `dir` (missing directory = no configuration: every registry is HTTPS).
    pub fn new(dir: impl Into<PathBuf>) -> RegistryHosts {
        RegistryHosts { dir: dir.into() }
    }

    /// The endpoints to try for `registry` (as written in image references, e.g. `docker.io` or
    /// `127.0.0.1:5000`), mirrors first in file order, then the upstream server `default_host`.
    pub fn endpoints(
        &self,
        registry: &str,
        default_host: &str,
    ) -> Result<Vec<Endpoint>, HostsError> {
        let upstream = Endpoint {
            scheme: Scheme::Https,
            host: default_host.to_owned(),
            resolve: true,
            pull: true,
            skip_verify: false,
            ca: vec![],
            mirror: false,
        };
        // A registry name never contains '/', so it cannot walk out of the directory; refuse anyway.
        if registry.contains('/') || registry.starts_with('.') {
            return Ok(vec![upstream]);
        }
        let mut path = self.dir.join(registry).join("hosts.toml");
        if !path.is_file() {
            path = self.dir.join("_default/hosts.toml");
            if !path.is_file() {
                return Ok(vec![upstream]);
            }
        }
        let text = std::fs::read_to_string(&path).map_err(|source| HostsError::Io {
            path: path.clone(),
            source,
        })?;
        let file: HostsFile = toml::from_str(&text).map_err(|e| HostsError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("/")).to_owned();
        let mut out = Vec::new();
        for (url, section) in file.host {
            let section: HostSection =
                section
                    .try_into()
                    .map_err(|e: toml::de::Error| HostsError::Invalid {
                        path: path.clone(),
                        message: format!("host.{url:?}: {e}"),
                    })?;
            let (scheme, host) = parse_url(&url, &path)?;
            let (resolve, pull) = caps(section.capabilities.as_ref());
            out.push(Endpoint {
                scheme,
                host,
                resolve,
                pull,
                skip_verify: section.skip_verify.unwrap_or(false),
                ca: cas(section.ca, &base),
                mirror: true,
            });
        }
        let mut server = upstream;
        if let Some(url) = &file.server {
            let (scheme, host) = parse_url(url, &path)?;
            server.scheme = scheme;
            server.host = host;
        }
        (server.resolve, server.pull) = caps(file.capabilities.as_ref());
        server.skip_verify = file.skip_verify.unwrap_or(false);
        server.ca = cas(file.ca, &base);
        out.push(server);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_first_in_file_order_then_the_server() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("docker.io")).unwrap();
        std::fs::write(
            dir.path().join("docker.io/hosts.toml"),
            r#"
server = "https://registry-1.docker.io"
[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
[host."https://mirror.example:8443/v2"]
  capabilities = ["pull"]
  skip_verify = true
  ca = "mirror.pem"
"#,
        )
        .unwrap();
        let hosts = RegistryHosts::new(dir.path());
        let eps = hosts.endpoints("docker.io", "index.docker.io").unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!(
            (eps[0].scheme, eps[0].host.as_str(), eps[0].mirror),
            (Scheme::Http, "127.0.0.1:5000", true)
        );
        assert_eq!(eps[1].host, "mirror.example:8443");
        assert!(eps[1].pull && !eps[1].resolve && eps[1].skip_verify);
        assert_eq!(eps[1].ca, vec![dir.path().join("docker.io/mirror.pem")]);
        assert_eq!(
            (eps[2].scheme, eps[2].host.as_str(), eps[2].mirror),
            (Scheme::Https, "registry-1.docker.io", false)
        );
        // No file: only the upstream over HTTPS.
        let eps = hosts.endpoints("quay.io", "quay.io").unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].scheme, Scheme::Https);
    }

    #[test]
    fn insecure_server_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("127.0.0.1:5000")).unwrap();
        std::fs::write(
            dir.path().join("127.0.0.1:5000/hosts.toml"),
            "server = \"http://127.0.0.1:5000\"\n",
        )
        .unwrap();
        let hosts = RegistryHosts::new(dir.path());
        let eps = hosts.endpoints("127.0.0.1:5000", "127.0.0.1:5000").unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].scheme, Scheme::Http);

        std::fs::create_dir_all(dir.path().join("bad.io")).unwrap();
        std::fs::write(dir.path().join("bad.io/hosts.toml"), "[host.\"ftp://x\"]\n").unwrap();
        assert!(matches!(
            hosts.endpoints("bad.io", "bad.io"),
            Err(HostsError::Invalid { .. })
        ));
        std::fs::write(dir.path().join("bad.io/hosts.toml"), "server = [").unwrap();
        assert!(hosts.endpoints("bad.io", "bad.io").is_err());
    }
}

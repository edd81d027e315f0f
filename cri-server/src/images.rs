//! CRI v1 ImageService, delegating to the `image-service` crate. Errors are mapped to gRPC codes here and
//! only here; every missing or malformed field is `InvalidArgument` naming the field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use image_service::{Credentials, ErrorKind, FsType, ImageError, ImageRecord, ImageService};
use k8s_cri::v1::image_service_server::ImageService as CriImageService;
use k8s_cri::v1::*;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Image store flags shared by the daemon and `podvisor pull`.
#[derive(clap::Args, Clone, Debug)]
pub struct ImageArgs {
    /// containerd-style registry host configuration: `<dir>/<registry>/hosts.toml` (mirrors, plain-http
    /// registries).
    #[arg(long, default_value = image_service::DEFAULT_CERTS_DIR)]
    pub certs_dir: PathBuf,
    /// Filesystem of the per-image block images: ext4 or erofs.
    #[arg(long, default_value = "ext4", value_parser = parse_fs)]
    pub image_fs: FsType,
    /// Cap on the uncompressed bytes of one layer (decompression-bomb protection).
    #[arg(long, default_value_t = 8 << 30)]
    pub max_layer_bytes: u64,
    /// Cap on the uncompressed bytes of all layers of one image.
    #[arg(long, default_value_t = 16 << 30)]
    pub max_image_bytes: u64,
}

fn parse_fs(s: &str) -> Result<FsType, String> {
    FsType::parse(s).ok_or_else(|| format!("{s:?}: expected ext4 or erofs"))
}

/// Errors opening the image store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process (the daemon) has the state database open.
    #[error("{0} is in use by another process (is the daemon running?)")]
    Locked(PathBuf),
    /// The database could not be opened.
    #[error("{path}: {source}")]
    Db {
        /// The database path.
        path: PathBuf,
        /// The error.
        source: sled::Error,
    },
    /// The image store could not be opened.
    #[error(transparent)]
    Images(#[from] ImageError),
}

/// Opens the daemon's sled database, `<state_dir>/state` (the source of truth shared by every component).
pub fn open_db(state_dir: &Path) -> Result<sled::Db, OpenError> {
    let path = state_dir.join("state");
    sled::open(&path).map_err(|source| match source {
        // sled reports the held file lock as an Io error carrying the flock error in its text.
        sled::Error::Io(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.to_string().contains("could not acquire lock") =>
        {
            OpenError::Locked(path.clone())
        }
        source => OpenError::Db {
            path: path.clone(),
            source,
        },
    })
}

/// Opens the image store under `state_dir` with its records in `db`.
pub fn open_store(
    db: &sled::Db,
    state_dir: &Path,
    args: &ImageArgs,
) -> Result<ImageService, OpenError> {
    let mut config = image_service::Config::new(state_dir);
    config.certs_dir = args.certs_dir.clone();
    config.fs_type = args.image_fs;
    config.limits.max_layer_bytes = args.max_layer_bytes;
    config.limits.max_image_bytes = args.max_image_bytes;
    Ok(ImageService::open(config, db)?)
}

/// The CRI ImageService over an [`ImageService`].
#[derive(Clone)]
pub struct Images {
    service: ImageService,
}

impl Images {
    /// Serves `service`.
    pub fn new(service: ImageService) -> Images {
        Images { service }
    }
}

/// Maps an image error to the gRPC status kubelet and crictl see: one code per [`ErrorKind`], the
/// classification `ImageError::kind` makes (see image-service/README.md). `InvalidArgument` is only the
/// request's `image.image` reference. The message is bounded ([`crate::text::bounded`]).
pub fn status_of(e: &ImageError) -> Status {
    let msg = crate::text::bounded(&e.to_string());
    match e.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(format!("image.image: {msg}")),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::Unavailable => Status::unavailable(msg),
        ErrorKind::Unauthenticated => Status::unauthenticated(msg),
        ErrorKind::FailedPrecondition => Status::failed_precondition(msg),
        ErrorKind::DataLoss => Status::data_loss(msg),
        ErrorKind::Internal => Status::internal(msg),
    }
}

fn image_field(spec: Option<&ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.trim()) {
        None => Err(Status::invalid_argument("image: missing ImageSpec")),
        Some("") => Err(Status::invalid_argument(
            "image.image: empty image reference",
        )),
        Some(s) => Ok(s),
    }
}

/// Converts CRI AuthConfig to pull credentials.
pub fn credentials(auth: Option<&AuthConfig>) -> Result<Credentials, Status> {
    let Some(a) = auth else {
        return Ok(Credentials::default());
    };
    let mut c = Credentials {
        username: a.username.clone(),
        password: a.password.clone(),
        registry_token: a.registry_token.clone(),
        server_address: a
            .server_address
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned(),
    };
    if !a.auth.is_empty() && c.username.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                Status::invalid_argument("auth.auth: not base64 of \"user:password\"")
            })?;
        let (u, p) = decoded.split_once(':').ok_or_else(|| {
            Status::invalid_argument("auth.auth: not base64 of \"user:password\"")
        })?;
        c.username = u.into();
        c.password = p.into();
    }
    if c.username.is_empty() && c.registry_token.is_empty() && !a.identity_token.is_empty() {
        return Err(Status::invalid_argument(
            "auth.identity_token: OAuth2 refresh-token auth is not supported; pass username/password or registry_token",
        ));
    }
    Ok(c)
}

/// uid or username from the config's `User` (`uid`, `uid:gid`, `name` or `name:group`), as containerd.
pub fn user_of(user: &str) -> (Option<Int64Value>, String) {
    let u = user.split(':').next().unwrap_or("");
    if u.is_empty() {
        return (None, String::new());
    }
    match u.parse::<i64>() {
        Ok(value) => (Some(Int64Value { value }), String::new()),
        Err(_) => (None, u.to_owned()),
    }
}

fn to_cri(r: &ImageRecord) -> Image {
    let (uid, username) = user_of(&r.user);
    Image {
        id: r.id.to_string(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        uid,
        username,
        spec: Some(ImageSpec {
            image: r.id.to_string(),
            ..Default::default()
        }),
        pinned: false,
    }
}

#[tonic::async_trait]
impl CriImageService for Images {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.trim().is_empty());
        let images = match filter {
            Some(f) => self
                .service
                .status(&f)
                .map_err(|e| status_of(&e))?
                .into_iter()
                .collect(),
            None => self.service.list().map_err(|e| status_of(&e))?,
        };
        Ok(Response::new(ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let req = request.into_inner();
        let image = image_field(req.image.as_ref())?;
        let Some(rec) = self.service.status(image).map_err(|e| status_of(&e))? else {
            // CRI: an absent image is a nil Image, not an error.
            return Ok(Response::new(ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if req.verbose {
            let config = self.service.config_json(&rec).map_err(|e| status_of(&e))?;
            let v = serde_json::json!({
                "id": rec.id,
                "manifestDigest": rec.manifest_digest,
                "layers": rec.layers,
                "uncompressedSize": rec.uncompressed_size,
                "blockImage": self.service.block_image_path(&rec),
                "blockImageFs": rec.fs_type,
                "blockImageSize": rec.block_image_size,
                "inUse": self.service.in_use(&rec.id).map_err(|e| status_of(&e))?,
                "imageSpec": config,
            });
            info.insert("info".to_owned(), v.to_string());
        }
        Ok(Response::new(ImageStatusResponse {
            image: Some(to_cri(&rec)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let req = request.into_inner();
        let image = image_field(req.image.as_ref())?;
        let creds = credentials(req.auth.as_ref())?;
        let started = std::time::Instant::now();
        let result = self
            .service
            .pull(image, &creds, None)
            .instrument(tracing::info_span!("pull", image))
            .await;
        crate::metrics::METRICS.pull(&result, started.elapsed());
        let rec = result.map_err(|e| {
            tracing::warn!(error = %e, "pull failed");
            status_of(&e)
        })?;
        Ok(Response::new(PullImageResponse {
            image_ref: rec.id.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let req = request.into_inner();
        let image = image_field(req.image.as_ref())?;
        self.service
            .remove(image)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let usage = self.service.usage().await.map_err(|e| status_of(&e))?;
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![FilesystemUsage {
                timestamp: crate::sandbox::now_ns(),
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: usage.mountpoint.display().to_string(),
                }),
                used_bytes: Some(UInt64Value {
                    value: usage.used_bytes,
                }),
                inodes_used: Some(UInt64Value {
                    value: usage.inodes_used,
                }),
            }],
            container_filesystems: vec![],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_map_like_containerd() {
        assert_eq!(user_of(""), (None, String::new()));
        assert_eq!(
            user_of("1000"),
            (Some(Int64Value { value: 1000 }), String::new())
        );
        assert_eq!(
            user_of("1000:1000"),
            (Some(Int64Value { value: 1000 }), String::new())
        );
        assert_eq!(user_of("nobody:nogroup"), (None, "nobody".into()));
    }

    #[test]
    fn auth_configs_become_credentials_or_invalid_argument() {
        let c = credentials(Some(&AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("bob:pw:x"),
            server_address: "https://reg.example:5000/".into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("bob", "pw:x"));
        assert_eq!(c.server_address, "reg.example:5000");
        let err = credentials(Some(&AuthConfig {
            auth: "%%%".into(),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("auth.auth"));
        let err = credentials(Some(&AuthConfig {
            identity_token: "t".into(),
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(credentials(None).unwrap(), Credentials::default());
    }

    #[test]
    fn corrupt_content_is_data_loss_not_unavailable() {
        use image_service::content::ContentError;
        let e = ImageError::Content(ContentError::DigestMismatch {
            expected: image_service::Digest::of(b"a"),
            actual: image_service::Digest::of(b"b").to_string(),
        });
        let s = status_of(&e);
        assert_eq!(s.code(), tonic::Code::DataLoss);
        assert!(s.message().contains("digest mismatch"), "{s:?}");
    }

    #[test]
    fn missing_images_are_invalid_arguments_naming_the_field() {
        let e = image_field(None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let spec = ImageSpec {
            image: "  ".into(),
            ..Default::default()
        };
        let e = image_field(Some(&spec)).unwrap_err();
        assert!(e.message().starts_with("image.image"));
    }
}

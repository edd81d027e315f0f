//! The image service: coalesced pulls, image lookup by tag, digest reference or id, removal with garbage
//! collection, leases that keep images in use from being removed, and store usage. A pull's steps are in
//! `pull/` (resolve, verify, fetch, unpack, build, commit); the error and its classification in `error.rs`.
//!
//! On-disk layout under `<state dir>/images`: `content/` (blobs), `blocks/<id hex>.<ext>` (block images),
//! `tmp/` (builds in progress, wiped at open).

mod error;
mod pull;

pub use pull::MAX_CONFIG_BYTES;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::apply::Limits;
use crate::blockimage::FsType;
use crate::content::{ContentStore, Digest};
use crate::hosts::RegistryHosts;
use crate::meta::{ImageRecord, MetaStore};
use crate::registry::{parse_reference, Credentials, RegistryError};
pub use error::{ErrorKind, ImageError};

/// Configuration of the image service.
#[derive(Clone, Debug)]
pub struct Config {
    /// The daemon's state directory; images live in `<state_dir>/images`.
    pub state_dir: PathBuf,
    /// containerd-style registry host configuration directory (`<dir>/<registry>/hosts.toml`).
    pub certs_dir: PathBuf,
    /// Uncompressed-size caps.
    pub limits: Limits,
    /// Filesystem of block images.
    pub fs_type: FsType,
    /// `mkfs.erofs -z` compressor (e.g. `lz4`) for erofs images; none = uncompressed.
    pub erofs_compressor: Option<String>,
    /// Layers downloaded at once per pull.
    pub max_concurrent_downloads: usize,
    /// Connect and read timeout for registry requests.
    pub registry_timeout: Duration,
}

impl Config {
    /// Defaults for a state directory: certs in `/etc/podvisor/certs.d`, ext4 images, 3 parallel
    /// downloads, 8 GiB per layer and 16 GiB per image uncompressed.
    pub fn new(state_dir: impl Into<PathBuf>) -> Config {
        Config {
            state_dir: state_dir.into(),
            certs_dir: PathBuf::from(DEFAULT_CERTS_DIR),
            limits: Limits {
                max_layer_bytes: 8 << 30,
                max_image_bytes: 16 << 30,
            },
            fs_type: FsType::Ext4,
            erofs_compressor: None,
            max_concurrent_downloads: 3,
            registry_timeout: Duration::from_secs(30),
        }
    }
}

/// Default registry host configuration directory.
pub const DEFAULT_CERTS_DIR: &str = "/etc/podvisor/certs.d";

/// Receives pull progress (called from the pulling task; keep it cheap).
pub trait Progress: Send + Sync {
    /// The manifest is resolved: this many layers of this many compressed bytes.
    fn resolved(&self, _layers: usize, _bytes: u64) {}
    /// Bytes downloaded.
    fn bytes(&self, _n: u64) {}
    /// A layer is in the store; `cached` when it was there already.
    fn layer_done(&self, _digest: &Digest, _size: u64, _cached: bool) {}
    /// A new stage started (`unpacking`, `building ext4 image`, `done`).
    fn stage(&self, _stage: &str) {}
}

/// Counters, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pulls actually run (coalesced callers share one).
    pub pulls: u64,
    /// Blobs downloaded (blobs already in the store are not).
    pub blobs_fetched: u64,
    /// Block images built.
    pub images_built: u64,
}

/// Disk usage of the image store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Directory holding the store.
    pub mountpoint: PathBuf,
    /// Bytes allocated.
    pub used_bytes: u64,
    /// Inodes used.
    pub inodes_used: u64,
}

/// What a garbage collection removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Blobs deleted.
    pub blobs: usize,
    /// Block images deleted.
    pub block_images: usize,
}

type PullFuture = Shared<BoxFuture<'static, Result<ImageRecord, Arc<ImageError>>>>;

pub(crate) struct Inner {
    config: Config,
    hosts: RegistryHosts,
    content: ContentStore,
    meta: MetaStore,
    blocks: PathBuf,
    tmp: PathBuf,
    inflight: Mutex<HashMap<String, PullFuture>>,
    /// Blobs in use by pulls in progress: never garbage-collected.
    pins: Mutex<HashMap<Digest, usize>>,
    /// Serializes record changes, leases and garbage collection.
    commit: tokio::sync::Mutex<()>,
    pulls: AtomicU64,
    blobs_fetched: AtomicU64,
    images_built: AtomicU64,
}

/// The image service. Cheap to clone.
#[derive(Clone)]
pub struct ImageService {
    inner: Arc<Inner>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ImageService {
    /// Opens the store under `config.state_dir/images` with image records in `db`, discarding builds an
    /// earlier run left unfinished.
    pub fn open(config: Config, db: &sled::Db) -> Result<ImageService, ImageError> {
        let root = config.state_dir.join("images");
        let content = ContentStore::open(&root.join("content"))?;
        let blocks = root.join("blocks");
        std::fs::create_dir_all(&blocks).map_err(io_err(&blocks))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(ImageService {
            inner: Arc::new(Inner {
                hosts: RegistryHosts::new(&config.certs_dir),
                meta: MetaStore::open(db)?,
                config,
                content,
                blocks,
                tmp,
                inflight: Mutex::default(),
                pins: Mutex::default(),
                commit: tokio::sync::Mutex::new(()),
                pulls: AtomicU64::new(0),
                blobs_fetched: AtomicU64::new(0),
                images_built: AtomicU64::new(0),
            }),
        })
    }

    /// Pulls `image` (unless the same reference is already being pulled with the same credentials, in which
    /// case this waits for that pull) and returns its record.
    pub async fn pull(
        &self,
        image: &str,
        creds: &Credentials,
        progress: Option<Arc<dyn Progress>>,
    ) -> Result<ImageRecord, ImageError> {
        let reference = parse_reference(image)?;
        let key = format!("{}\0{}", reference.whole(), creds_fingerprint(creds));
        let fut = {
            let mut inflight = lock(&self.inner.inflight);
            if let Some(f) = inflight.get(&key) {
                tracing::debug!(image = %reference, "joining a pull in progress");
                f.clone()
            } else {
                let inner = self.inner.clone();
                let (k, creds) = (key.clone(), creds.clone());
                // A task of its own: a caller that goes away does not cancel the pull for the others.
                let task = tokio::spawn(async move {
                    inner.pulls.fetch_add(1, Ordering::Relaxed);
                    let res = inner
                        .pull(reference, &creds, progress)
                        .await
                        .map_err(Arc::new);
                    lock(&inner.inflight).remove(&k);
                    res
                });
                let f = async move {
                    task.await
                        .unwrap_or_else(|e| Err(Arc::new(ImageError::Task(e))))
                }
                .boxed()
                .shared();
                inflight.insert(key, f.clone());
                f
            }
        };
        fut.await
            .map_err(|e| Arc::try_unwrap(e).unwrap_or_else(ImageError::Shared))
    }

    /// Finds an image by id (`sha256:<hex>` or bare hex), tag reference or digest reference.
    pub fn status(&self, image: &str) -> Result<Option<ImageRecord>, ImageError> {
        match self.resolve_id(image)? {
            Some(id) => Ok(self.inner.meta.get(&id)?),
            None => Ok(None),
        }
    }

    fn resolve_id(&self, image: &str) -> Result<Option<Digest>, ImageError> {
        let image = image.trim();
        if image.is_empty() {
            return Err(RegistryError::InvalidReference {
                reference: image.into(),
                message: "empty".into(),
            }
            .into());
        }
        let as_id = if image.len() == 64 {
            format!("sha256:{image}")
        } else {
            image.to_owned()
        };
        if let Ok(id) = as_id.parse::<Digest>() {
            if self.inner.meta.get(&id)?.is_some() {
                return Ok(Some(id));
            }
            return Ok(None);
        }
        let r = parse_reference(image)?;
        let key = match r.digest() {
            Some(d) => format!("{}/{}@{d}", r.registry(), r.repository()),
            None => r.whole(),
        };
        Ok(self.inner.meta.lookup(&key)?)
    }

    /// Every image.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        Ok(self.inner.meta.list()?)
    }

    /// The image's config blob (JSON), for verbose status.
    pub fn config_json(&self, record: &ImageRecord) -> Result<serde_json::Value, ImageError> {
        let bytes = self.inner.content.read(&record.id)?;
        serde_json::from_slice(&bytes).map_err(ImageError::BadConfig)
    }

    /// The path of an image's block image.
    pub fn block_image_path(&self, record: &ImageRecord) -> PathBuf {
        self.inner.blocks.join(&record.block_image)
    }

    /// Removes the image `image` names (all its tags and digest references) and garbage-collects its blobs
    /// and block image. Refused while the image is leased. Removing an absent image returns `Ok(None)`.
    pub async fn remove(&self, image: &str) -> Result<Option<ImageRecord>, ImageError> {
        let _commit = self.inner.commit.lock().await;
        let Some(id) = self.resolve_id(image)? else {
            return Ok(None);
        };
        let holders = self.inner.meta.lease_holders(&id)?;
        if !holders.is_empty() {
            return Err(ImageError::InUse { id, holders });
        }
        let removed = self.inner.meta.remove(&id)?;
        self.inner.gc_locked()?;
        Ok(removed)
    }

    /// Takes a lease on `image` for `holder` (a container or sandbox id): the image cannot be removed until
    /// [`ImageService::release`]. Leases persist in the database across restarts. Returns the image.
    pub async fn lease(&self, image: &str, holder: &str) -> Result<ImageRecord, ImageError> {
        let _commit = self.inner.commit.lock().await;
        let record = self
            .status(image)?
            .ok_or_else(|| ImageError::NotFound(image.into()))?;
        self.inner.meta.add_lease(holder, &record.id)?;
        Ok(record)
    }

    /// Releases `holder`'s lease; returns whether it had one.
    pub async fn release(&self, holder: &str) -> Result<bool, ImageError> {
        let _commit = self.inner.commit.lock().await;
        Ok(self.inner.meta.remove_lease(holder)?)
    }

    /// Whether any lease holds image `id`.
    pub fn in_use(&self, id: &Digest) -> Result<bool, ImageError> {
        Ok(!self.inner.meta.lease_holders(id)?.is_empty())
    }

    /// Deletes blobs and block images no image record references (pulls in progress are protected).
    pub async fn gc(&self) -> Result<GcStats, ImageError> {
        let _commit = self.inner.commit.lock().await;
        self.inner.gc_locked()
    }

    /// Bytes and inodes used by the image store.
    pub async fn usage(&self) -> Result<Usage, ImageError> {
        let root = self.inner.config.state_dir.join("images");
        tokio::task::spawn_blocking(move || usage_of(&root)).await?
    }

    /// Counters since open.
    pub fn stats(&self) -> Stats {
        Stats {
            pulls: self.inner.pulls.load(Ordering::Relaxed),
            blobs_fetched: self.inner.blobs_fetched.load(Ordering::Relaxed),
            images_built: self.inner.images_built.load(Ordering::Relaxed),
        }
    }

    /// The content store (read access for tools and tests).
    pub fn content(&self) -> &ContentStore {
        &self.inner.content
    }
}

/// Distinguishes credentials in the coalescing key without keeping secrets in it.
fn creds_fingerprint(c: &Credentials) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [
        &c.username,
        &c.password,
        &c.registry_token,
        &c.server_address,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

fn usage_of(root: &Path) -> Result<Usage, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let mut used_bytes = 0;
    let mut inodes_used = 0;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
            Err(e) => return Err(io_err(&p)(e)),
        };
        if !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        used_bytes += m.blocks() * 512;
        inodes_used += 1;
        if m.is_dir() {
            match std::fs::read_dir(&p) {
                Ok(rd) => stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
    }
    Ok(Usage {
        mountpoint: root.to_owned(),
        used_bytes,
        inodes_used,
    })
}

/// Pins blobs against garbage collection while a pull uses them.
pub(crate) struct Pins {
    inner: Arc<Inner>,
    digests: Vec<Digest>,
}

impl Pins {
    pub(crate) fn new(inner: &Arc<Inner>) -> Pins {
        Pins {
            inner: inner.clone(),
            digests: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, d: &Digest) {
        *lock(&self.inner.pins).entry(d.clone()).or_default() += 1;
        self.digests.push(d.clone());
    }

    /// Unpins every blob now and returns them.
    pub(crate) fn release(mut self) -> Vec<Digest> {
        self.unpin();
        std::mem::take(&mut self.digests)
    }

    fn unpin(&mut self) {
        let mut pins = lock(&self.inner.pins);
        for d in &self.digests {
            if let Some(n) = pins.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(d);
                }
            }
        }
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.unpin();
        self.digests.clear();
    }
}

impl Inner {
    /// Deletes blob `d` unless a pull in progress pins it. The pin table stays locked across the check and
    /// the removal: a pull pins a blob before it looks for it in the store, so it either keeps the blob
    /// here or finds it gone and fetches it again.
    fn remove_unpinned(&self, d: &Digest) -> Result<bool, ImageError> {
        let pins = lock(&self.pins);
        if pins.contains_key(d) {
            return Ok(false);
        }
        self.content.remove(d)?;
        Ok(true)
    }

    /// Deletes those of `blobs` that no stored image references and no pull in progress pins; returns how
    /// many were deleted.
    async fn collect_unreferenced(&self, blobs: &[Digest]) -> Result<usize, ImageError> {
        let _commit = self.commit.lock().await;
        let referenced: std::collections::HashSet<Digest> = self
            .meta
            .list()?
            .into_iter()
            .flat_map(|r| r.blobs)
            .collect();
        let mut removed = 0;
        for d in blobs {
            if !referenced.contains(d) && self.content.contains(d) && self.remove_unpinned(d)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Garbage collection; the caller holds `commit`.
    fn gc_locked(&self) -> Result<GcStats, ImageError> {
        let records = self.meta.list()?;
        let keep: std::collections::HashSet<Digest> = records
            .iter()
            .flat_map(|r| r.blobs.iter().cloned())
            .collect();
        let mut stats = GcStats::default();
        for blob in self.content.list()? {
            if !keep.contains(&blob) && self.remove_unpinned(&blob)? {
                stats.blobs += 1;
            }
        }
        let images: std::collections::HashSet<&str> =
            records.iter().map(|r| r.block_image.as_str()).collect();
        for entry in std::fs::read_dir(&self.blocks).map_err(io_err(&self.blocks))? {
            let entry = entry.map_err(io_err(&self.blocks))?;
            let name = entry.file_name();
            if !images.contains(name.to_string_lossy().as_ref()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                stats.block_images += 1;
            }
        }
        if stats != GcStats::default() {
            tracing::info!(
                blobs = stats.blobs,
                block_images = stats.block_images,
                "image garbage collected"
            );
        }
        Ok(stats)
    }
}

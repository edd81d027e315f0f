//! Image records, references (tags and digest references) and leases in the daemon's sled database.
//! Trees: `images` (id → JSON record), `image-refs` (reference → id), `image-leases` (holder → id).

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::blockimage::FsType;
use crate::content::Digest;

/// Errors of the image metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The database failed.
    #[error("image database: {0}")]
    Db(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("image database record {key:?} is corrupt: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decode error.
        message: String,
    },
}

impl From<TransactionError<MetaError>> for MetaError {
    fn from(e: TransactionError<MetaError>) -> MetaError {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => MetaError::Db(e),
        }
    }
}

/// Everything known about one pulled image (identified by its config digest, as containerd does).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    /// The image id: the config blob's digest.
    pub id: Digest,
    /// Tag references (`docker.io/library/busybox:latest`).
    pub repo_tags: Vec<String>,
    /// Digest references (`docker.io/library/busybox@sha256:…`), the digest a reference resolved to.
    pub repo_digests: Vec<String>,
    /// The linux/amd64 image manifest.
    pub manifest_digest: Digest,
    /// Layer blobs, bottom first.
    pub layers: Vec<Digest>,
    /// Every blob this image keeps alive: indexes, manifest, config, layers.
    pub blobs: Vec<Digest>,
    /// Bytes of the image content (manifest, config and compressed layers).
    pub size: u64,
    /// Uncompressed bytes of all layers.
    pub uncompressed_size: u64,
    /// Block image file name under the store's block directory.
    pub block_image: String,
    /// Its filesystem.
    pub fs_type: FsType,
    /// Its apparent size in bytes.
    pub block_image_size: u64,
    /// The config's `User` (may be empty).
    pub user: String,
    /// Seconds since the epoch when the image was first stored.
    pub created_unix: u64,
}

/// The metadata trees.
#[derive(Clone, Debug)]
pub struct MetaStore {
    images: sled::Tree,
    refs: sled::Tree,
    leases: sled::Tree,
}

fn decode(key: &[u8], v: &[u8]) -> Result<ImageRecord, MetaError> {
    serde_json::from_slice(v).map_err(|e| MetaError::Corrupt {
        key: String::from_utf8_lossy(key).into(),
        message: e.to_string(),
    })
}

fn encode(r: &ImageRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("records serialize")
}

impl MetaStore {
    /// Opens the image trees of `db`.
    pub fn open(db: &sled::Db) -> Result<MetaStore, MetaError> {
        Ok(MetaStore {
            images: db.open_tree("images")?,
            refs: db.open_tree("image-refs")?,
            leases: db.open_tree("image-leases")?,
        })
    }

    /// The record of image `id`.
    pub fn get(&self, id: &Digest) -> Result<Option<ImageRecord>, MetaError> {
        self.images
            .get(id.as_str())?
            .map(|v| decode(id.as_str().as_bytes(), &v))
            .transpose()
    }

    /// The image a reference (tag or digest reference) names.
    pub fn lookup(&self, reference: &str) -> Result<Option<Digest>, MetaError> {
        match self.refs.get(reference)? {
            None => Ok(None),
            Some(v) => String::from_utf8_lossy(&v).parse().map(Some).map_err(
                |e: crate::content::ContentError| MetaError::Corrupt {
                    key: reference.into(),
                    message: e.to_string(),
                },
            ),
        }
    }

    /// Every record.
    pub fn list(&self) -> Result<Vec<ImageRecord>, MetaError> {
        self.images
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Stores `record`, merging it with an existing record of the same id, and points its references at
    /// it; a reference moved away from another image is removed from that image's record. Atomic.
    pub fn put(&self, record: ImageRecord) -> Result<ImageRecord, MetaError> {
        let out = (&self.images, &self.refs).transaction(|(images, refs)| {
            let mut rec = record.clone();
            if let Some(old) = images.get(rec.id.as_str())? {
                let old = decode(rec.id.as_str().as_bytes(), &old).map_err(abort)?;
                merge(&mut rec.repo_tags, old.repo_tags);
                merge(&mut rec.repo_digests, old.repo_digests);
                merge(&mut rec.blobs, old.blobs);
                rec.created_unix = old.created_unix;
            }
            for r in rec.repo_tags.iter().chain(&rec.repo_digests) {
                if let Some(prev) = refs.get(r.as_bytes())? {
                    let prev = String::from_utf8_lossy(&prev).into_owned();
                    if prev != rec.id.as_str() {
                        if let Some(p) = images.get(prev.as_bytes())? {
                            let mut p = decode(prev.as_bytes(), &p).map_err(abort)?;
                            p.repo_tags.retain(|t| t != r);
                            p.repo_digests.retain(|t| t != r);
                            images.insert(prev.as_bytes(), encode(&p))?;
                        }
                    }
                }
                refs.insert(r.as_bytes(), rec.id.as_str().as_bytes())?;
            }
            images.insert(rec.id.as_str().as_bytes(), encode(&rec))?;
            Ok(rec)
        })?;
        self.images.flush()?;
        Ok(out)
    }

    /// Deletes image `id` and every reference to it. Atomic.
    pub fn remove(&self, id: &Digest) -> Result<Option<ImageRecord>, MetaError> {
        let out = (&self.images, &self.refs).transaction(|(images, refs)| {
            let Some(v) = images.remove(id.as_str().as_bytes())? else {
                return Ok(None);
            };
            let rec = decode(id.as_str().as_bytes(), &v).map_err(abort)?;
            for r in rec.repo_tags.iter().chain(&rec.repo_digests) {
                if refs.get(r.as_bytes())?.as_deref() == Some(id.as_str().as_bytes()) {
                    refs.remove(r.as_bytes())?;
                }
            }
            Ok(Some(rec))
        })?;
        self.images.flush()?;
        Ok(out)
    }

    /// Records that `holder` (a container or sandbox id) uses image `id`.
    pub fn add_lease(&self, holder: &str, id: &Digest) -> Result<(), MetaError> {
        self.leases.insert(holder, id.as_str())?;
        self.leases.flush()?;
        Ok(())
    }

    /// Drops `holder`'s lease; returns whether it had one.
    pub fn remove_lease(&self, holder: &str) -> Result<bool, MetaError> {
        let had = self.leases.remove(holder)?.is_some();
        self.leases.flush()?;
        Ok(had)
    }

    /// Holders of leases on image `id`.
    pub fn lease_holders(&self, id: &Digest) -> Result<Vec<String>, MetaError> {
        let mut out = Vec::new();
        for kv in self.leases.iter() {
            let (k, v) = kv?;
            if &*v == id.as_str().as_bytes() {
                out.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        Ok(out)
    }
}

fn abort(e: MetaError) -> ConflictableTransactionError<MetaError> {
    ConflictableTransactionError::Abort(e)
}

fn merge<T: PartialEq>(into: &mut Vec<T>, from: Vec<T>) {
    for x in from {
        if !into.contains(&x) {
            into.push(x);
        }
    }
}

/// File name of image `id`'s block image: `<hex>.<ext>`.
pub fn block_image_name(id: &Digest, fs: FsType) -> String {
    format!("{}.{}", id.hex(), fs.extension())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &[u8], tags: &[&str]) -> ImageRecord {
        let id = Digest::of(id);
        ImageRecord {
            block_image: block_image_name(&id, FsType::Ext4),
            id: id.clone(),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: vec![format!("r/x@{}", Digest::of(b"m"))],
            manifest_digest: Digest::of(b"m"),
            layers: vec![],
            blobs: vec![id],
            size: 1,
            uncompressed_size: 1,
            fs_type: FsType::Ext4,
            block_image_size: 1,
            user: String::new(),
            created_unix: 7,
        }
    }

    #[test]
    fn tags_move_between_images_and_removal_drops_references() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let meta = MetaStore::open(&db).unwrap();
        let a = meta.put(record(b"a", &["r/x:1", "r/x:latest"])).unwrap();
        let b = meta.put(record(b"b", &["r/x:latest"])).unwrap();
        assert_eq!(meta.lookup("r/x:latest").unwrap(), Some(b.id.clone()));
        assert_eq!(meta.get(&a.id).unwrap().unwrap().repo_tags, ["r/x:1"]);
        // Re-putting merges references.
        let a2 = meta.put(record(b"a", &["r/x:2"])).unwrap();
        assert_eq!(a2.repo_tags, ["r/x:2", "r/x:1"]);
        assert_eq!(meta.list().unwrap().len(), 2);
        meta.remove(&a.id).unwrap().unwrap();
        assert_eq!(meta.lookup("r/x:1").unwrap(), None);
        assert_eq!(meta.lookup("r/x:latest").unwrap(), Some(b.id.clone()));
        assert!(meta.remove(&a.id).unwrap().is_none());

        meta.add_lease("ctr-1", &b.id).unwrap();
        assert_eq!(meta.lease_holders(&b.id).unwrap(), ["ctr-1"]);
        assert!(meta.remove_lease("ctr-1").unwrap());
        assert!(!meta.remove_lease("ctr-1").unwrap());
    }
}

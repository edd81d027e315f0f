//! Content-addressed blob store: `<root>/blobs/sha256/<hex>`, written through `<root>/ingest/` and renamed
//! into place only after the bytes hash to the expected digest.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

/// Errors of the content store.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// A digest string is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest {0:?}: only sha256:<64 hex digits> is supported")]
    InvalidDigest(String),
    /// The received bytes do not hash to the expected digest.
    #[error("digest mismatch for {expected}: content hashes to {actual}")]
    DigestMismatch {
        /// The digest the content was announced with.
        expected: Digest,
        /// The digest of what was received.
        actual: String,
    },
    /// The received content is not the announced size.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}{}", if *.more { " or more" } else { "" })]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Announced size.
        expected: u64,
        /// Bytes received.
        actual: u64,
        /// Whether reception was cut short because it exceeded the announced size.
        more: bool,
    },
    /// The content stream failed (network or decoding error).
    #[error("reading {digest}: {source}")]
    Stream {
        /// The blob.
        digest: Digest,
        /// The error.
        source: io::Error,
    },
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// A validated `sha256:<hex>` content digest.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// The 64 hex digits without the algorithm.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    /// The digest as `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = ContentError;
    fn from_str(s: &str) -> Result<Digest, ContentError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| ContentError::InvalidDigest(s.into()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ContentError::InvalidDigest(s.into()));
        }
        Ok(Digest(s.into()))
    }
}

impl TryFrom<String> for Digest {
    type Error = ContentError;
    fn try_from(s: String) -> Result<Digest, ContentError> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContentError + '_ {
    move |source| ContentError::Io {
        path: path.to_owned(),
        source,
    }
}

type LockMap = Arc<Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>>;

/// The blob store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ContentStore {
    root: PathBuf,
    locks: LockMap,
}

/// Exclusive right to ingest one digest; other ingesters of the same digest wait for it.
#[must_use]
pub struct IngestLock {
    digest: Digest,
    locks: LockMap,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for IngestLock {
    fn drop(&mut self) {
        let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this guard's mutex hold the entry: nobody waits, so forget it.
        if map
            .get(&self.digest)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            map.remove(&self.digest);
        }
    }
}

impl ContentStore {
    /// Opens (creating) the store under `root` and discards ingests an earlier run left unfinished.
    pub fn open(root: &Path) -> Result<ContentStore, ContentError> {
        let blobs = root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let ingest = root.join("ingest");
        if ingest.exists() {
            std::fs::remove_dir_all(&ingest).map_err(io_err(&ingest))?;
        }
        std::fs::create_dir_all(&ingest).map_err(io_err(&ingest))?;
        Ok(ContentStore {
            root: root.to_owned(),
            locks: LockMap::default(),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `digest`'s blob lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size of a present blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, ContentError> {
        let path = self.path(digest);
        Ok(std::fs::metadata(&path).map_err(io_err(&path))?.len())
    }

    /// Reads a (small) blob whole.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, ContentError> {
        let path = self.path(digest);
        std::fs::read(&path).map_err(io_err(&path))
    }

    /// Takes the ingest lock of `digest`; hold it across "is it there? if not, fetch it".
    pub async fn lock(&self, digest: &Digest) -> IngestLock {
        let mutex = {
            let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(digest.clone()).or_default().clone()
        };
        IngestLock {
            digest: digest.clone(),
            locks: self.locks.clone(),
            _guard: mutex.lock_owned().await,
        }
    }

    /// Renames a verified temporary file into the store as `digest`.
    fn commit(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<(), ContentError> {
        let path = self.path(digest);
        tmp.persist(&path).map_err(|e| ContentError::Io {
            path,
            source: e.error,
        })?;
        Ok(())
    }

    /// Writes in-memory content after checking it hashes to `digest`.
    pub fn write_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<(), ContentError> {
        let actual = Digest::of(bytes);
        if &actual != digest {
            return Err(ContentError::DigestMismatch {
                expected: digest.clone(),
                actual: actual.0,
            });
        }
        let ingest = self.root.join("ingest");
        let mut tmp = tempfile::NamedTempFile::new_in(&ingest).map_err(io_err(&ingest))?;
        io::Write::write_all(&mut tmp, bytes).map_err(io_err(tmp.path()))?;
        self.commit(tmp, digest)
    }

    /// Streams a blob to a temporary file while hashing it, and renames it into place only if it is
    /// exactly `size` bytes hashing to `digest`. `on_bytes` is told of every chunk written.
    pub async fn write_stream<S>(
        &self,
        digest: &Digest,
        size: u64,
        mut stream: S,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<(), ContentError>
    where
        S: Stream<Item = io::Result<bytes::Bytes>> + Unpin,
    {
        let ingest = self.root.join("ingest");
        let tmp = tempfile::Builder::new()
            .prefix(digest.hex())
            .tempfile_in(&ingest)
            .map_err(io_err(&ingest))?;
        let std_file = tmp.as_file().try_clone().map_err(io_err(tmp.path()))?;
        let mut file =
            tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(std_file));
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| ContentError::Stream {
                digest: digest.clone(),
                source,
            })?;
            written += chunk.len() as u64;
            if written > size {
                return Err(ContentError::SizeMismatch {
                    digest: digest.clone(),
                    expected: size,
                    actual: written,
                    more: true,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_err(tmp.path()))?;
            on_bytes(chunk.len() as u64);
        }
        if written != size {
            return Err(ContentError::SizeMismatch {
                digest: digest.clone(),
                expected: size,
                actual: written,
                more: false,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest.as_str() {
            return Err(ContentError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        file.flush().await.map_err(io_err(tmp.path()))?;
        file.get_ref()
            .sync_all()
            .await
            .map_err(io_err(tmp.path()))?;
        self.commit(tmp, digest)
    }

    /// Every blob present.
    pub fn list(&self) -> Result<Vec<Digest>, ContentError> {
        let dir = self.root.join("blobs/sha256");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Ok(d) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse() {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Deletes a blob (absent is fine).
    pub fn remove(&self, digest: &Digest) -> Result<(), ContentError> {
        let path = self.path(digest);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = io::Result<bytes::Bytes>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(bytes::Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn digests_are_validated() {
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(format!("sha512:{}", "a".repeat(64))
            .parse::<Digest>()
            .is_err());
        assert!(format!("sha256:{}", "A".repeat(64))
            .parse::<Digest>()
            .is_err());
        let d = Digest::of(b"hello");
        assert_eq!(d.as_str().parse::<Digest>().unwrap(), d);
    }

    #[tokio::test]
    async fn only_verified_streams_land_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let good = Digest::of(b"hello world");
        let mut seen = 0;
        store
            .write_stream(&good, 11, chunks(&[b"hello ", b"world"]), |n| seen += n)
            .await
            .unwrap();
        assert_eq!(seen, 11);
        assert_eq!(store.read(&good).unwrap(), b"hello world");

        let wanted = Digest::of(b"hello there");
        let err = store
            .write_stream(&wanted, 11, chunks(&[b"hello ", b"world"]), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ContentError::DigestMismatch { .. }), "{err}");
        let err = store
            .write_stream(&wanted, 5, chunks(&[b"hello ", b"there"]), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ContentError::SizeMismatch { more: true, .. }));
        assert!(!store.contains(&wanted));
        // Nothing is left behind in the ingest directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(store.list().unwrap(), vec![good]);
    }
}

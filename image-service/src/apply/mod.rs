//! Applies OCI layer tarballs, in order, to a root directory on the host: whiteouts (`.wh.<name>`), opaque
//! directories (`.wh..wh..opq`), hard links, symlinks, device nodes, FIFOs, ownership, modes, mtimes and
//! `SCHILY.xattr.*` extended attributes are preserved (the daemon runs as root). Entries that would escape
//! the root and layers whose uncompressed stream exceeds the configured caps are refused.
//!
//! The `tar` crate only reads the archive: its own `unpack` resolves hard-link targets against the current
//! directory and follows symlinks at the destination, so every entry is materialized here.

mod meter;
mod resolve;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use filetime::FileTime;

use crate::content::Digest;
use meter::Metered;
pub use resolve::normalize;

/// Errors applying a layer.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An entry would land outside the root.
    #[error("layer entry {path:?} escapes the root: {why}")]
    Escape {
        /// The entry path (or link target).
        path: PathBuf,
        /// How it escapes.
        why: &'static str,
    },
    /// A path component that must be a directory is something else.
    #[error("layer entry {path:?}: {component:?} is not a directory")]
    NotADirectory {
        /// The entry path.
        path: PathBuf,
        /// The offending component.
        component: PathBuf,
    },
    /// A hard link names a target that does not exist or is a directory.
    #[error("hard link {path:?} -> {target:?}: {why}")]
    BadHardLink {
        /// The link.
        path: PathBuf,
        /// Its target.
        target: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// An entry is malformed (missing link name, invalid name).
    #[error("layer entry {path:?}: {why}")]
    BadEntry {
        /// The entry path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The uncompressed stream exceeded a cap (decompression bomb protection).
    #[error("uncompressed {what} exceeds the {limit}-byte limit")]
    TooLarge {
        /// `layer` or `image`.
        what: &'static str,
        /// The limit in bytes.
        limit: u64,
    },
    /// The uncompressed layer does not hash to the config's diff_id.
    #[error("layer {index} uncompressed digest is {actual}, the image config says {expected}")]
    DiffIdMismatch {
        /// Layer index.
        index: usize,
        /// From the config.
        expected: String,
        /// Computed.
        actual: Digest,
    },
    /// The archive or its compression is corrupt.
    #[error("corrupt layer archive: {0}")]
    Corrupt(io::Error),
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// Path relative to the root.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Compression of a layer blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly multi-member).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Sniffs the compression from the first bytes (registries sometimes mislabel media types).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Caps on uncompressed bytes (decompression-bomb protection).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Per layer.
    pub max_layer_bytes: u64,
    /// Summed over every layer of an image.
    pub max_image_bytes: u64,
}

/// What one layer contained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerStats {
    /// sha256 of the uncompressed tar (the OCI diff_id).
    pub diff_id: Digest,
    /// Uncompressed bytes.
    pub bytes: u64,
    /// Archive entries processed.
    pub entries: u64,
}

/// Builds a root directory from layers applied in order.
pub struct Applier {
    root: PathBuf,
    limits: Limits,
    total: u64,
    layers: usize,
    /// Directory mtimes, applied by [`Applier::finish`] once nothing more is written into them.
    dir_times: HashMap<PathBuf, FileTime>,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Applier {
    /// An applier writing into `root` (created if missing, mode 0755).
    pub fn new(root: &Path, limits: Limits) -> Result<Applier, ApplyError> {
        std::fs::create_dir_all(root).map_err(io_at(root))?;
        Ok(Applier {
            root: root.to_owned(),
            limits,
            total: 0,
            layers: 0,
            dir_times: HashMap::new(),
        })
    }

    /// Uncompressed bytes applied so far.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Applies the layer blob at `blob`, checking its uncompressed digest against `diff_id` when given.
    pub fn apply_file(
        &mut self,
        blob: &Path,
        diff_id: Option<&str>,
    ) -> Result<LayerStats, ApplyError> {
        let mut file = File::open(blob).map_err(io_at(blob))?;
        let mut head = [0u8; 4];
        let n = file.read(&mut head).map_err(io_at(blob))?;
        let compression = Compression::sniff(&head[..n]);
        let file = File::open(blob).map_err(io_at(blob))?;
        let stats = self.apply(BufReader::with_capacity(256 * 1024, file), compression)?;
        if let Some(expected) = diff_id {
            if expected != stats.diff_id.as_str() {
                return Err(ApplyError::DiffIdMismatch {
                    index: self.layers - 1,
                    expected: expected.into(),
                    actual: stats.diff_id,
                });
            }
        }
        Ok(stats)
    }

    /// Applies one layer read from `reader`.
    pub fn apply(
        &mut self,
        reader: impl Read,
        compression: Compression,
    ) -> Result<LayerStats, ApplyError> {
        let decoded: Box<dyn Read> = match compression {
            Compression::None => Box::new(reader),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(reader).map_err(ApplyError::Corrupt)?)
            }
        };
        let metered = Metered::new(decoded, self.total, self.limits);
        let tripped = metered.tripped();
        let mut archive = tar::Archive::new(metered);
        let fail = |e: ApplyError| tripped.take().unwrap_or(e);
        let mut layer = Layer {
            root: &self.root,
            created: HashSet::new(),
            dir_times: &mut self.dir_times,
        };
        let mut entries = 0;
        for entry in archive
            .entries()
            .map_err(|e| fail(ApplyError::Corrupt(e)))?
        {
            let entry = entry.map_err(|e| fail(ApplyError::Corrupt(e)))?;
            layer.entry(entry).map_err(fail)?;
            entries += 1;
        }
        let mut rest = archive.into_inner();
        // Hash the end-of-archive blocks and any padding too: the diff_id covers the whole stream.
        io::copy(&mut rest, &mut io::sink()).map_err(|e| fail(ApplyError::Corrupt(e)))?;
        let (bytes, diff_id) = rest.finish();
        self.total += bytes;
        self.layers += 1;
        Ok(LayerStats {
            diff_id,
            bytes,
            entries,
        })
    }

    /// Sets the recorded directory mtimes; call once after the last layer.
    pub fn finish(self) -> Result<(), ApplyError> {
        for (rel, mtime) in self.dir_times {
            let full = self.root.join(&rel);
            match std::fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {
                    filetime::set_symlink_file_times(&full, mtime, mtime).map_err(io_at(&rel))?
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// State while applying one layer.
struct Layer<'a> {
    root: &'a Path,
    /// Physical paths (relative to the root) this layer created: an opaque marker keeps them.
    created: HashSet<PathBuf>,
    dir_times: &'a mut HashMap<PathBuf, FileTime>,
}

/// Ownership, mode, mtime and xattrs of an entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: FileTime,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<Meta, ApplyError> {
    let bad = |e: io::Error| ApplyError::BadEntry {
        path: path.to_owned(),
        why: e.to_string(),
    };
    let h = entry.header();
    let mut uid = h.uid().map_err(bad)?;
    let mut gid = h.gid().map_err(bad)?;
    let mode = h.mode().map_err(bad)? & 0o7777;
    let mtime = FileTime::from_unix_time(h.mtime().unwrap_or(0) as i64, 0);
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(bad)? {
        for ext in pax {
            let ext = ext.map_err(bad)?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((
                    OsStr::from_bytes(name).to_owned(),
                    ext.value_bytes().to_vec(),
                ));
            } else if key == b"uid" || key == b"gid" {
                let v: u64 = ext
                    .value()
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad(io::Error::other("bad PAX uid/gid")))?;
                if key == b"uid" {
                    uid = v;
                } else {
                    gid = v;
                }
            }
        }
    }
    let id = |v: u64| {
        u32::try_from(v).map_err(|_| ApplyError::BadEntry {
            path: path.to_owned(),
            why: format!("uid/gid {v} out of range"),
        })
    };
    Ok(Meta {
        uid: id(uid)?,
        gid: id(gid)?,
        mode,
        mtime,
        xattrs,
    })
}

impl Layer<'_> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ApplyError> {
        let raw = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        if kind.is_gnu_sparse() {
            // Refused like containerd and Docker do (Go's tar reader keeps type 'S', which their
            // createTarFile rejects as an "unhandled tar header type"): its holes would expand to its
            // logical size, any multiple of the archive bytes the caps count.
            return Err(ApplyError::BadEntry {
                path: raw,
                why: format!(
                    "GNU sparse file ({} bytes expanded) is not supported",
                    entry.size()
                ),
            });
        }
        let mut comps = normalize(&raw)?;
        let Some(name) = comps.pop() else {
            // The root itself ("./"): take its metadata, as docker does.
            if kind.is_dir() {
                let meta = entry_meta(&mut entry, &raw)?;
                self.set_meta(Path::new(""), &meta, None)?;
            }
            return Ok(());
        };
        let name_bytes = name.as_bytes();
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            if hidden == b".wh..opq" {
                return self.opaque(&comps);
            }
            if hidden.starts_with(b".wh.") {
                return Ok(()); // other aufs metadata (.wh..wh.plnk, ...)
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(ApplyError::BadEntry {
                    path: raw,
                    why: "empty whiteout name".into(),
                });
            }
            return self.whiteout(&comps, OsStr::from_bytes(hidden));
        }
        let created = &mut self.created;
        let parent = resolve::resolve_dir(self.root, &comps, true, &mut |p| {
            created.insert(p.to_owned());
        })?
        .expect("created on demand");
        let rel = parent.join(&name);
        let full = self.root.join(&rel);
        let meta = entry_meta(&mut entry, &raw)?;
        let existing = std::fs::symlink_metadata(&full).ok();
        match kind {
            tar::EntryType::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    resolve::remove_any(&full).map_err(io_at(&rel))?;
                    std::fs::create_dir(&full).map_err(io_at(&rel))?;
                }
                self.set_meta(&rel, &meta, None)?;
                self.dir_times.insert(rel.clone(), meta.mtime);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                resolve::remove_any(&full).map_err(io_at(&rel))?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(io_at(&rel))?;
                io::copy(&mut entry, &mut file).map_err(ApplyError::Corrupt)?;
                self.set_meta(&rel, &meta, Some(&file))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ApplyError::BadEntry {
                        path: raw.clone(),
                        why: "symlink without a target".into(),
                    })?;
                resolve::remove_any(&full).map_err(io_at(&rel))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &full)
                    .map_err(io_at(&rel))?;
                self.set_meta(&rel, &meta, None)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ApplyError::BadEntry {
                        path: raw.clone(),
                        why: "hard link without a target".into(),
                    })?;
                self.hard_link(&raw, &rel, Path::new(OsStr::from_bytes(&target)))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                resolve::remove_any(&full).map_err(io_at(&rel))?;
                let sflag = match kind {
                    tar::EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                    tar::EntryType::Block => nix::sys::stat::SFlag::S_IFBLK,
                    _ => nix::sys::stat::SFlag::S_IFIFO,
                };
                let h = entry.header();
                let dev = nix::sys::stat::makedev(
                    h.device_major().ok().flatten().unwrap_or(0).into(),
                    h.device_minor().ok().flatten().unwrap_or(0).into(),
                );
                nix::sys::stat::mknod(
                    &full,
                    sflag,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    dev,
                )
                .map_err(|e| io_at(&rel)(e.into()))?;
                self.set_meta(&rel, &meta, None)?;
            }
            other => {
                tracing::warn!(path = %raw.display(), kind = ?other, "skipping unsupported tar entry type");
                return Ok(());
            }
        }
        self.created.insert(rel);
        Ok(())
    }

    fn hard_link(&mut self, raw: &Path, rel: &Path, target: &Path) -> Result<(), ApplyError> {
        let mut tcomps = normalize(target).map_err(|e| match e {
            ApplyError::Escape { why, .. } => ApplyError::Escape {
                path: target.to_owned(),
                why,
            },
            e => e,
        })?;
        let bad = |why| ApplyError::BadHardLink {
            path: raw.to_owned(),
            target: target.to_owned(),
            why,
        };
        let tname = tcomps.pop().ok_or_else(|| bad("empty target"))?;
        let tparent = resolve::resolve_dir(self.root, &tcomps, false, &mut |_| {})?
            .ok_or_else(|| bad("target does not exist"))?;
        let trel = tparent.join(tname);
        let tfull = self.root.join(&trel);
        let tmeta = std::fs::symlink_metadata(&tfull).map_err(|_| bad("target does not exist"))?;
        if tmeta.is_dir() {
            return Err(bad("target is a directory"));
        }
        let full = self.root.join(rel);
        if let Ok(m) = std::fs::symlink_metadata(&full) {
            if m.ino() == tmeta.ino() && m.dev() == tmeta.dev() {
                return Ok(());
            }
        }
        resolve::remove_any(&full).map_err(io_at(rel))?;
        // link(2) does not follow a symlink target: the link names the symlink itself, inside the root.
        std::fs::hard_link(&tfull, &full).map_err(io_at(rel))
    }

    fn whiteout(&mut self, dir: &[OsString], name: &OsStr) -> Result<(), ApplyError> {
        let Some(parent) = resolve::resolve_dir(self.root, dir, false, &mut |_| {})? else {
            return Ok(()); // nothing below to hide
        };
        let rel = parent.join(name);
        resolve::remove_any(&self.root.join(&rel)).map_err(io_at(&rel))?;
        self.dir_times.remove(&rel);
        Ok(())
    }

    fn opaque(&mut self, dir: &[OsString]) -> Result<(), ApplyError> {
        let created = &mut self.created;
        let parent = resolve::resolve_dir(self.root, dir, true, &mut |p| {
            created.insert(p.to_owned());
        })?
        .expect("created on demand");
        let full = self.root.join(&parent);
        for child in std::fs::read_dir(&full).map_err(io_at(&parent))? {
            let child = child.map_err(io_at(&parent))?;
            let rel = parent.join(child.file_name());
            if !self.created.contains(&rel) {
                resolve::remove_any(&child.path()).map_err(io_at(&rel))?;
            }
        }
        Ok(())
    }

    /// Applies ownership, then mode (chown clears setuid bits), xattrs and, for non-directories, mtime.
    fn set_meta(&mut self, rel: &Path, meta: &Meta, file: Option<&File>) -> Result<(), ApplyError> {
        let full = self.root.join(rel);
        let is_link = file.is_none()
            && std::fs::symlink_metadata(&full)
                .map_err(io_at(rel))?
                .file_type()
                .is_symlink();
        match file {
            Some(f) => std::os::unix::fs::fchown(f, Some(meta.uid), Some(meta.gid)),
            None => std::os::unix::fs::lchown(&full, Some(meta.uid), Some(meta.gid)),
        }
        .map_err(io_at(rel))?;
        if !is_link {
            let perms = std::fs::Permissions::from_mode(meta.mode);
            match file {
                Some(f) => f.set_permissions(perms),
                // Not a symlink (checked above) and nothing else writes this tree: chmod cannot be redirected.
                None => std::fs::set_permissions(&full, perms),
            }
            .map_err(io_at(rel))?;
        }
        for (name, value) in &meta.xattrs {
            let res = match file {
                Some(f) => xattr::FileExt::set_xattr(f, name, value),
                None => xattr::set(&full, name, value), // lsetxattr: never follows a symlink
            };
            match res {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                    tracing::warn!(path = %rel.display(), xattr = ?name, "xattr not supported here, dropped")
                }
                Err(source) => {
                    return Err(ApplyError::Io {
                        path: rel.into(),
                        source,
                    })
                }
            }
        }
        match file {
            Some(f) => filetime::set_file_handle_times(f, Some(meta.mtime), Some(meta.mtime)),
            None => filetime::set_symlink_file_times(&full, meta.mtime, meta.mtime),
        }
        .map_err(io_at(rel))
    }
}

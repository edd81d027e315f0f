//! Deterministic writer (and reader) for uncompressed newc (`070701`) cpio archives, the format the Linux kernel
//! unpacks as an initramfs.
//!
//! Every entry has mtime 0, uid/gid 0 and sequential inode numbers, so the same inputs give the same bytes.
//! Parent directories are created on demand (the kernel does not create missing parents while unpacking).
#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::Write;

/// newc header magic.
const MAGIC: &[u8; 6] = b"070701";
/// Name of the end-of-archive entry.
const TRAILER: &str = "TRAILER!!!";
/// Size of a newc header: magic + 13 fields of 8 hex digits.
const HEADER_LEN: usize = 6 + 13 * 8;

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFMT: u32 = 0o170_000;

/// Errors of the cpio writer and reader.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Writing to the output failed.
    #[error("writing the archive: {0}")]
    Io(#[from] std::io::Error),
    /// The path is empty, relative, has `.`/`..` or empty components, or contains NUL.
    #[error("invalid archive path {0:?}: must be absolute, normalized and without NUL")]
    InvalidPath(String),
    /// The path was already added.
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    /// A path was used as a directory but was added as something else.
    #[error("{0:?} is not a directory in the archive")]
    NotADirectory(String),
    /// A file is too big for the 32-bit size field.
    #[error("{0:?} is too large for a newc archive")]
    TooLarge(String),
    /// The bytes read are not a valid newc archive.
    #[error("malformed cpio archive at byte {offset}: {what}")]
    Malformed {
        /// Offset of the offending header.
        offset: usize,
        /// What was wrong.
        what: &'static str,
    },
}

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link to the target.
    Symlink(String),
    /// A character device node.
    CharDev {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

/// One entry of an archive, as read back by [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without the leading `/`.
    pub name: String,
    /// Inode number.
    pub ino: u32,
    /// Permission bits (without the file type).
    pub perm: u32,
    /// uid of the owner.
    pub uid: u32,
    /// gid of the owner.
    pub gid: u32,
    /// Modification time.
    pub mtime: u32,
    /// Type and contents.
    pub kind: Kind,
}

/// Streams a newc archive to `W`. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    dirs: BTreeSet<String>,
    others: BTreeSet<String>,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive; the root directory is implicit.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            dirs: BTreeSet::new(),
            others: BTreeSet::new(),
            written: 0,
        }
    }

    /// Adds a directory (and missing parents, mode 0755). Adding an existing directory again is a no-op.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        let name = normalize(path)?;
        if self.dirs.contains(&name) {
            return Ok(());
        }
        self.check_new(&name)?;
        self.parents(&name)?;
        self.entry(&name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])?;
        self.dirs.insert(name);
        Ok(())
    }

    /// Adds a regular file (and missing parent directories).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let name = self.new_leaf(path)?;
        self.entry(&name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link `path -> target` (and missing parent directories).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let name = self.new_leaf(path)?;
        self.entry(&name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node `major:minor` (and missing parent directories).
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let name = self.new_leaf(path)?;
        self.entry(&name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(TRAILER, 0, 0, 1, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Number of bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    fn new_leaf(&mut self, path: &str) -> Result<String, CpioError> {
        let name = normalize(path)?;
        self.check_new(&name)?;
        self.parents(&name)?;
        self.others.insert(name.clone());
        Ok(name)
    }

    fn check_new(&self, name: &str) -> Result<(), CpioError> {
        if self.dirs.contains(name) || self.others.contains(name) {
            return Err(CpioError::Duplicate(name.to_string()));
        }
        Ok(())
    }

    /// Adds every missing ancestor directory of `name`, outermost first.
    fn parents(&mut self, name: &str) -> Result<(), CpioError> {
        for (i, _) in name.match_indices('/') {
            let parent = &name[..i];
            if self.others.contains(parent) {
                return Err(CpioError::NotADirectory(parent.to_string()));
            }
            if !self.dirs.contains(parent) {
                self.entry(parent, S_IFDIR | 0o755, 2, (0, 0), &[])?;
                self.dirs.insert(parent.to_string());
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(name.to_string()))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, ino, mode, nlink, size, rdev)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        let namesize = name.len() as u32 + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.out.write_all(&header)?;
        self.written += header.len() as u64;
        self.pad(header.len())
    }

    /// Pads the output to a multiple of 4 after a piece of `len` bytes (headers start 4-aligned).
    fn pad(&mut self, len: usize) -> Result<(), CpioError> {
        let pad = pad4(len) - len;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }
}

/// `len` rounded up to a multiple of 4.
fn pad4(len: usize) -> usize {
    (len + 3) & !3
}

/// Turns `/a/b` into `a/b`, rejecting anything that is not a plain absolute path.
fn normalize(path: &str) -> Result<String, CpioError> {
    let invalid = || CpioError::InvalidPath(path.to_string());
    let rest = path.strip_prefix('/').ok_or_else(invalid)?;
    if rest.is_empty()
        || path.contains('\0')
        || rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid());
    }
    Ok(rest.to_string())
}

/// Reads a newc archive back into its entries (the trailer excluded).
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut entries = Vec::new();
    let mut pos = 0;
    loop {
        let malformed = |what| CpioError::Malformed { offset: pos, what };
        let header = bytes
            .get(pos..pos + HEADER_LEN)
            .ok_or(malformed("truncated header"))?;
        if &header[..6] != MAGIC {
            return Err(malformed("bad magic"));
        }
        let mut fields = [0u32; 13];
        for (i, field) in fields.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                .map_err(|_| malformed("bad field"))?;
            *field = u32::from_str_radix(hex, 16).map_err(|_| malformed("bad field"))?;
        }
        let [ino, mode, uid, gid, _nlink, mtime, size, _, _, rmaj, rmin, namesize, _check] = fields;
        let name_start = pos + HEADER_LEN;
        let name_end = name_start + namesize as usize;
        let name = bytes
            .get(name_start..name_end)
            .ok_or(malformed("truncated name"))?;
        let name = name
            .strip_suffix(&[0])
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or(malformed("name not NUL-terminated UTF-8"))?
            .to_string();
        let data_start = pad4(name_end);
        let data_end = data_start + size as usize;
        let data = bytes
            .get(data_start..data_end)
            .ok_or(malformed("truncated data"))?;
        if name == TRAILER {
            return Ok(entries);
        }
        let kind = match mode & S_IFMT {
            S_IFDIR => Kind::Dir,
            S_IFREG => Kind::File(data.to_vec()),
            S_IFLNK => Kind::Symlink(
                String::from_utf8(data.to_vec()).map_err(|_| malformed("bad symlink"))?,
            ),
            S_IFCHR => Kind::CharDev {
                major: rmaj,
                minor: rmin,
            },
            _ => return Err(malformed("unsupported file type")),
        };
        entries.push(Entry {
            name,
            ino,
            perm: mode & 0o7777,
            uid,
            gid,
            mtime,
            kind,
        });
        pos = pad4(data_end);
    }
}

#[cfg(test)]
mod tests;

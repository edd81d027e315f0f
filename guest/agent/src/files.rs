//! Guest path validation and bounded reads of regular files (`ReadFile`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use podvisor_proto::MAX_READ_BYTES;

/// Errors of path validation and file reads.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A request field is invalid.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The file does not exist.
    #[error("{0}: no such file")]
    NotFound(PathBuf),
    /// The agent may not open the file.
    #[error("{0}: permission denied")]
    PermissionDenied(PathBuf),
    /// The path is a directory, device, FIFO or socket.
    #[error("{0}: not a regular file")]
    NotRegular(PathBuf),
    /// Any other I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Checks that `path` is absolute, contains no `..` component and no NUL byte; returns it as a path.
pub fn validate_path(field: &'static str, path: &str) -> Result<PathBuf, FileError> {
    let invalid = |reason: &str| FileError::InvalidArgument {
        field,
        reason: format!("{reason}: {path:?}"),
    };
    if path.is_empty() {
        return Err(FileError::InvalidArgument {
            field,
            reason: "must not be empty".into(),
        });
    }
    if path.contains('\0') {
        return Err(invalid("must not contain NUL"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid("must be absolute"));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("must not contain `..`"));
    }
    // Drops `.` components and repeated slashes.
    Ok(p.components().collect())
}

/// Resolves `max_bytes` of a request: 0 means [`MAX_READ_BYTES`], above it is invalid.
pub fn read_limit(max_bytes: u32) -> Result<usize, FileError> {
    match max_bytes {
        0 => Ok(MAX_READ_BYTES as usize),
        n if n <= MAX_READ_BYTES => Ok(n as usize),
        n => Err(FileError::InvalidArgument {
            field: "max_bytes",
            reason: format!("{n} is above the limit of {MAX_READ_BYTES}"),
        }),
    }
}

/// Reads at most `limit` bytes of the regular file `path` from `offset`; returns the bytes and whether they
/// reach the end of the file.
///
/// The file is opened non-blocking and must be a regular file, so a FIFO or a terminal cannot hang the agent.
pub fn read_chunk(path: &Path, offset: u64, limit: usize) -> Result<(Vec<u8>, bool), FileError> {
    let io_err = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => FileError::NotFound(path.to_path_buf()),
        std::io::ErrorKind::PermissionDenied => FileError::PermissionDenied(path.to_path_buf()),
        _ => FileError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    let mut file = File::options()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(FileError::NotRegular(path.to_path_buf()));
    }
    if offset > 0 {
        file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
    }
    // /proc and /sys files report a size of 0: read one byte past the limit to learn whether more follows.
    let remaining = meta.len().saturating_sub(offset);
    let mut data = Vec::with_capacity(remaining.min(limit as u64 + 1) as usize);
    (&mut file)
        .take(limit as u64 + 1)
        .read_to_end(&mut data)
        .map_err(io_err)?;
    let eof = data.len() <= limit;
    data.truncate(limit);
    Ok((data, eof))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_validation() {
        assert_eq!(
            validate_path("path", "/etc/hosts").unwrap(),
            Path::new("/etc/hosts")
        );
        assert_eq!(
            validate_path("path", "/a//b/./c").unwrap(),
            Path::new("/a/b/c")
        );
        for bad in ["", "etc/hosts", "./x", "/a/../b", "/..", "/a/b/..", "/a\0b"] {
            let err = validate_path("path", bad).unwrap_err();
            assert!(
                matches!(err, FileError::InvalidArgument { field: "path", .. }),
                "{bad:?}: {err}"
            );
        }
        // A name that merely contains dots is fine.
        assert!(validate_path("path", "/a/..b/c..").is_ok());
    }

    #[test]
    fn limits() {
        assert_eq!(read_limit(0).unwrap(), 4 << 20);
        assert_eq!(read_limit(1).unwrap(), 1);
        assert_eq!(read_limit(MAX_READ_BYTES).unwrap(), 4 << 20);
        assert!(matches!(
            read_limit(MAX_READ_BYTES + 1),
            Err(FileError::InvalidArgument {
                field: "max_bytes",
                ..
            })
        ));
    }

    #[test]
    fn bounded_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(
            read_chunk(&path, 0, 100).unwrap(),
            (b"0123456789".to_vec(), true)
        );
        assert_eq!(
            read_chunk(&path, 0, 10).unwrap(),
            (b"0123456789".to_vec(), true)
        );
        assert_eq!(read_chunk(&path, 0, 4).unwrap(), (b"0123".to_vec(), false));
        assert_eq!(read_chunk(&path, 8, 4).unwrap(), (b"89".to_vec(), true));
        assert_eq!(read_chunk(&path, 6, 4).unwrap(), (b"6789".to_vec(), true));
        assert_eq!(read_chunk(&path, 10, 4).unwrap(), (vec![], true));
        assert_eq!(read_chunk(&path, 1000, 4).unwrap(), (vec![], true));
    }

    #[test]
    fn zero_sized_pseudo_files_are_read() {
        // /proc files have st_size 0 but content.
        let (data, eof) = read_chunk(Path::new("/proc/self/status"), 0, 1 << 20).unwrap();
        assert!(eof);
        assert!(String::from_utf8_lossy(&data).contains("Name:"));
        let (data, eof) = read_chunk(Path::new("/proc/self/status"), 0, 5).unwrap();
        assert_eq!((data.as_slice(), eof), (&b"Name:"[..], false));
    }

    #[test]
    fn error_kinds() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_chunk(&dir.path().join("none"), 0, 1),
            Err(FileError::NotFound(_))
        ));
        assert!(matches!(
            read_chunk(dir.path(), 0, 1),
            Err(FileError::NotRegular(_))
        ));
        assert!(matches!(
            read_chunk(Path::new("/dev/null"), 0, 1),
            Err(FileError::NotRegular(_))
        ));
        // A FIFO without a writer would block a plain open(); it must fail fast instead.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(
            read_chunk(&fifo, 0, 1),
            Err(FileError::NotRegular(_))
        ));
    }
}

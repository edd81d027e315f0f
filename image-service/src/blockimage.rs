//! Turns an unpacked root directory into a read-only block image with `mkfs.ext4 -d` (e2fsprogs) or
//! `mkfs.erofs` (erofs-utils 1.5). Both preserve ownership, modes, xattrs, hard links, symlinks and device
//! nodes of the source tree; the caller builds into a temporary path and renames it into place.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors building a block image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The mkfs tool is not installed.
    #[error("{tool} is not installed ({package}): {source}")]
    ToolMissing {
        /// The command.
        tool: &'static str,
        /// The Debian package providing it.
        package: &'static str,
        /// The spawn error.
        source: io::Error,
    },
    /// The tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Walking the tree or handling the image file failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Filesystem of the block images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4 without a journal (read-only use); supported by the current guest kernel.
    #[default]
    Ext4,
    /// erofs (needs CONFIG_EROFS_FS in the guest kernel).
    Erofs,
}

impl FsType {
    /// File extension of images of this type.
    pub fn extension(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
        }
    }

    /// Parses `ext4` or `erofs`.
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "erofs" => Some(FsType::Erofs),
            _ => None,
        }
    }
}

/// Bytes and inodes a tree needs, as ext4 with 4 KiB blocks would store it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TreeSize {
    /// Data bytes rounded up to blocks (regular files once per inode, directories, long symlinks).
    pub block_bytes: u64,
    /// Inodes.
    pub inodes: u64,
}

/// Measures `root` without following symlinks; hard-linked files count once.
pub fn tree_size(root: &Path) -> Result<TreeSize, BuildError> {
    const BLOCK: u64 = 4096;
    let mut out = TreeSize::default();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        out.inodes += 1;
        out.block_bytes += BLOCK;
        let rd = std::fs::read_dir(&dir).map_err(|source| BuildError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in rd {
            let entry = entry.map_err(|source| BuildError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let m = std::fs::symlink_metadata(&path).map_err(|source| BuildError::Io {
                path: path.clone(),
                source,
            })?;
            if m.is_dir() {
                stack.push(path);
                continue;
            }
            if m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            out.inodes += 1;
            if m.is_file() || (m.file_type().is_symlink() && m.len() >= 60) {
                out.block_bytes += m.len().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(out)
}

fn run(tool: &'static str, package: &'static str, cmd: &mut Command) -> Result<(), BuildError> {
    let out = cmd.output().map_err(|source| BuildError::ToolMissing {
        tool,
        package,
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        Err(BuildError::Tool {
            tool,
            status: out.status,
            stderr: format!("{}{}", stderr.trim(), stdout.trim())
                .chars()
                .take(2000)
                .collect(),
        })
    }
}

/// A filesystem UUID derived from the image id, so rebuilding an image gives the same UUID.
fn uuid_for(id_hex: &str) -> String {
    let h = id_hex
        .get(..32)
        .unwrap_or("00000000000000000000000000000000");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Builds `out` (which must not exist) from `root`. `id_hex` seeds the UUID; `erofs_compressor` is
/// passed to `mkfs.erofs -z` (e.g. `lz4`) when set. Returns the image's apparent size in bytes.
pub fn build(
    fs: FsType,
    root: &Path,
    out: &Path,
    id_hex: &str,
    erofs_compressor: Option<&str>,
) -> Result<u64, BuildError> {
    let uuid = uuid_for(id_hex);
    match fs {
        FsType::Ext4 => {
            let size = tree_size(root)?;
            // Data + 256-byte inodes + 10% and 16 MiB for metadata (bitmaps, group descriptors, extents).
            let mut bytes = size.block_bytes + size.inodes * 256;
            bytes = (bytes + bytes / 10 + (16 << 20)).div_ceil(4096) * 4096;
            let mut attempt = 0;
            loop {
                let file = std::fs::File::create(out).map_err(|source| BuildError::Io {
                    path: out.to_owned(),
                    source,
                })?;
                file.set_len(bytes).map_err(|source| BuildError::Io {
                    path: out.to_owned(),
                    source,
                })?;
                drop(file);
                let res = run(
                    "mkfs.ext4",
                    "e2fsprogs",
                    Command::new("mkfs.ext4")
                        .args([
                            "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "podvisor",
                        ])
                        .args(["-O", "^has_journal,^resize_inode"])
                        .args(["-E", "lazy_itable_init=0,nodiscard"])
                        .arg("-N")
                        .arg((size.inodes + 64).to_string())
                        .arg("-U")
                        .arg(&uuid)
                        .arg("-d")
                        .arg(root)
                        .arg(out),
                );
                match res {
                    // The estimate was short (very many tiny files): double and retry.
                    Err(BuildError::Tool { .. }) if attempt < 2 => {
                        attempt += 1;
                        bytes *= 2;
                        tracing::debug!(bytes, "mkfs.ext4 ran out of space, retrying bigger");
                    }
                    Err(e) => return Err(e),
                    Ok(()) => return Ok(bytes),
                }
            }
        }
        FsType::Erofs => {
            let mut cmd = Command::new("mkfs.erofs");
            cmd.arg("--quiet").arg("-U").arg(&uuid);
            if let Some(z) = erofs_compressor {
                cmd.arg(format!("-z{z}"));
            }
            run("mkfs.erofs", "erofs-utils", cmd.arg(out).arg(root))?;
            Ok(std::fs::metadata(out)
                .map_err(|source| BuildError::Io {
                    path: out.to_owned(),
                    source,
                })?
                .len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_size_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 5000]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("s")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let size = tree_size(dir.path()).unwrap();
        assert_eq!(
            size,
            TreeSize {
                block_bytes: 8192 + 2 * 4096,
                inodes: 4
            }
        );
    }

    #[test]
    fn ext4_and_erofs_images_hold_the_tree() {
        for tool in ["mkfs.ext4", "debugfs", "mkfs.erofs", "fsck.erofs"] {
            if Command::new(tool).arg("-V").output().is_err() {
                println!("SKIPPED ext4_and_erofs_images_hold_the_tree: {tool} is not installed");
                return;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/tool"), b"payload").unwrap();
        std::fs::hard_link(root.join("bin/tool"), root.join("bin/tool2")).unwrap();
        std::os::unix::fs::symlink("tool", root.join("bin/sh")).unwrap();
        std::os::unix::fs::chown(root.join("bin/tool"), Some(1000), Some(1000)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root.join("bin/tool"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        xattr::set(root.join("bin/tool"), "user.podvisor", b"1").unwrap();
        let id = "ab".repeat(32);

        let ext4 = dir.path().join("img.ext4");
        build(FsType::Ext4, &root, &ext4, &id, None).unwrap();
        let out = Command::new("debugfs")
            .args(["-R", "stat /bin/tool"])
            .arg(&ext4)
            .output()
            .unwrap();
        let stat = String::from_utf8_lossy(&out.stdout);
        assert!(
            stat.contains("Mode:  04755") && stat.contains("User:  1000"),
            "{stat}"
        );
        assert!(stat.contains("Links: 2"), "{stat}");

        for z in [None, Some("lz4")] {
            let erofs = dir.path().join(format!("img{}.erofs", z.unwrap_or("")));
            build(FsType::Erofs, &root, &erofs, &id, z).unwrap();
            let x = dir.path().join(format!("x{}", z.unwrap_or("")));
            let st = Command::new("fsck.erofs")
                .arg(format!("--extract={}", x.display()))
                .arg(&erofs)
                .status()
                .unwrap();
            assert!(st.success());
            assert_eq!(std::fs::read(x.join("bin/tool")).unwrap(), b"payload");
            // fsck.erofs 1.5 extracts hard links as copies and chmods before chowning (dropping setuid),
            // so links are checked in the image itself with dump.erofs.
            let m = std::fs::metadata(x.join("bin/tool")).unwrap();
            assert_eq!((m.uid(), m.mode() & 0o777), (1000, 0o755));
            let dump = Command::new("dump.erofs")
                .arg("--path=/bin/tool")
                .arg(&erofs)
                .output()
                .unwrap();
            let dump = String::from_utf8_lossy(&dump.stdout);
            assert!(dump.contains("Links: 2"), "{dump}");
            assert_eq!(
                std::fs::read_link(x.join("bin/sh")).unwrap(),
                Path::new("tool")
            );
        }
    }

    #[test]
    fn uuid_is_derived_from_the_id() {
        assert_eq!(
            uuid_for(&"ab".repeat(32)),
            "abababab-abab-abab-abab-abababababab"
        );
    }
}

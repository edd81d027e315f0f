//! `CopyFile`: host content (CRI mounts: config maps, secrets, service account tokens, /etc/hosts,
//! emptyDir) written into the pod below [`GUEST_MOUNTS_DIR`], from where containers bind-mount it.
//!
//! Containers may write into these trees (read-write mounts), so nothing here follows a symlink: every
//! existing ancestor below the root must be a real directory, and the final component is opened with
//! `O_NOFOLLOW` or replaced.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use podvisor_proto::{CopyFileRequest, FileKind, MAX_READ_BYTES};

use crate::files::{validate_path, FileError};

fn invalid(field: &'static str, reason: impl Into<String>) -> FileError {
    FileError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the parents of `path` below `root` as real directories; refuses a symlink among them.
fn make_parents(root: &Path, path: &Path) -> Result<(), FileError> {
    let rel = path.strip_prefix(root).expect("checked below root");
    let mut dir = root.to_path_buf();
    DirBuilder::new()
        .recursive(true)
        .create(&dir)
        .map_err(io(&dir))?;
    let parents: Vec<_> = rel.components().collect();
    for c in &parents[..parents.len().saturating_sub(1)] {
        dir.push(c);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(invalid(
                    "path",
                    format!("{} exists and is not a directory", dir.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .map_err(io(&dir))?,
            Err(e) => return Err(io(&dir)(e)),
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), FileError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io(path))
}

/// Applies one CopyFile request below `root` (the agent passes [`GUEST_MOUNTS_DIR`]).
pub fn copy_file(root: &Path, req: &CopyFileRequest) -> Result<PathBuf, FileError> {
    let path = validate_path("path", &req.path)?;
    if !path.starts_with(root) || path == root {
        return Err(invalid(
            "path",
            format!("{} is not below {}", path.display(), root.display()),
        ));
    }
    if req.data.len() > MAX_READ_BYTES as usize {
        return Err(invalid(
            "data",
            format!(
                "{} bytes is above the limit of {MAX_READ_BYTES}",
                req.data.len()
            ),
        ));
    }
    make_parents(root, &path)?;
    let existing = std::fs::symlink_metadata(&path).ok();
    let mode = req.mode & 0o7777;
    match FileKind::try_from(req.kind) {
        Ok(FileKind::Directory) => {
            match &existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    return Err(invalid(
                        "path",
                        format!("{} exists and is not a directory", path.display()),
                    ))
                }
                None => DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io(&path))?,
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(io(&path))?;
            chown(&path, req.uid, req.gid)?;
        }
        Ok(FileKind::File) => {
            if existing
                .as_ref()
                .is_some_and(|m| m.file_type().is_symlink())
            {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
            let mut file = OpenOptions::new()
                .write(true)
                .create(req.offset == 0)
                .truncate(req.offset == 0)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&path)
                .map_err(io(&path))?;
            file.seek(SeekFrom::Start(req.offset)).map_err(io(&path))?;
            file.write_all(&req.data).map_err(io(&path))?;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io(&path))?;
            chown(&path, req.uid, req.gid)?;
        }
        Ok(FileKind::Symlink) => {
            if req.target.is_empty() || req.target.contains('\0') {
                return Err(invalid("target", "must be a non-empty path without NUL"));
            }
            match &existing {
                Some(m) if m.is_dir() => {
                    return Err(invalid(
                        "path",
                        format!("{} is a directory", path.display()),
                    ))
                }
                Some(_) => std::fs::remove_file(&path).map_err(io(&path))?,
                None => {}
            }
            std::os::unix::fs::symlink(&req.target, &path).map_err(io(&path))?;
            chown(&path, req.uid, req.gid)?;
        }
        Ok(FileKind::Unspecified) | Err(_) => {
            return Err(invalid("kind", format!("{} is not a file kind", req.kind)))
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &Path, kind: FileKind) -> CopyFileRequest {
        CopyFileRequest {
            path: path.display().to_string(),
            kind: kind.into(),
            mode: 0o640,
            uid: 0,
            gid: 0,
            ..Default::default()
        }
    }

    #[test]
    fn files_dirs_and_links_are_created_below_the_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mounts");
        let file = root.join("m1/sub/data.txt");
        let mut r = req(&file, FileKind::File);
        r.data = b"hello ".to_vec();
        copy_file(&root, &r).unwrap();
        r.data = b"world".to_vec();
        r.offset = 6;
        copy_file(&root, &r).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"hello world");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        // Offset 0 truncates (a new version of a config file).
        r.data = b"v2".to_vec();
        r.offset = 0;
        copy_file(&root, &r).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"v2");

        let mut d = req(&root.join("m1/sub"), FileKind::Directory);
        d.mode = 0o755;
        copy_file(&root, &d).unwrap();
        let mut l = req(&root.join("m1/..data"), FileKind::Symlink);
        l.target = "sub".into();
        copy_file(&root, &l).unwrap();
        assert_eq!(
            std::fs::read_link(root.join("m1/..data")).unwrap(),
            Path::new("sub")
        );

        for (path, field) in [
            (dir.path().join("elsewhere"), "path"),
            (root.clone(), "path"),
        ] {
            let e = copy_file(&root, &req(&path, FileKind::Directory)).unwrap_err();
            assert!(e.to_string().starts_with(field), "{e}");
        }
        let e = copy_file(&root, &req(&root.join("m1/x"), FileKind::Unspecified)).unwrap_err();
        assert!(e.to_string().starts_with("kind"), "{e}");
        assert!(!root.join("m1/x").exists());
    }

    #[test]
    fn symlinks_planted_in_the_tree_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mounts");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("m")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // A container replaced a directory by a link out of the tree: writing through it is refused.
        std::os::unix::fs::symlink(&outside, root.join("m/dir")).unwrap();
        let mut r = req(&root.join("m/dir/f"), FileKind::File);
        r.data = b"x".to_vec();
        assert!(copy_file(&root, &r).is_err());
        assert!(!outside.join("f").exists());
        // A link in place of a file is replaced, not written through.
        std::fs::write(outside.join("target"), b"keep").unwrap();
        std::os::unix::fs::symlink(outside.join("target"), root.join("m/f")).unwrap();
        copy_file(&root, &req(&root.join("m/f"), FileKind::File)).unwrap();
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(root.join("m/f"))
            .unwrap()
            .is_file());
    }
}

//! Path resolution confined to the root being built: every component is looked up with `lstat`, symlinks
//! met on the way are followed *inside* the root (an absolute target is taken relative to the root, as the
//! container will see it) and a `..` that would climb above the root is an escape and an error.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use super::ApplyError;

/// Symlinks followed while resolving one path before it is declared a loop (Linux's limit).
const MAX_SYMLINKS: usize = 40;

/// Lexically normalizes an archive path to components relative to the root: `.` is dropped, `..` pops,
/// and a path that is absolute or climbs above the root is refused.
pub fn normalize(path: &Path) -> Result<Vec<OsString>, ApplyError> {
    let mut out: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => {
                return Err(ApplyError::Escape {
                    path: path.to_owned(),
                    why: "absolute path",
                })
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if out.pop().is_none() {
                    return Err(ApplyError::Escape {
                        path: path.to_owned(),
                        why: "\"..\" climbs above the root",
                    });
                }
            }
            Component::Normal(n) => out.push(n.to_owned()),
        }
    }
    Ok(out)
}

/// Resolves the directory `components` (already normalized) inside `root`, following symlinks within the
/// root. Missing directories are created (mode 0755, reported through `created`) when `create` is set;
/// otherwise `Ok(None)` says the directory does not exist. Returns the physical path relative to `root`.
pub fn resolve_dir(
    root: &Path,
    components: &[OsString],
    create: bool,
    created: &mut dyn FnMut(&Path),
) -> Result<Option<PathBuf>, ApplyError> {
    let original: PathBuf = components.iter().collect();
    let mut pending: VecDeque<OsString> = components.iter().cloned().collect();
    let mut cur = PathBuf::new();
    let mut followed = 0;
    while let Some(c) = pending.pop_front() {
        if c == OsStr::new(".") || c.is_empty() {
            continue;
        }
        if c == OsStr::new("..") {
            if !cur.pop() {
                return Err(ApplyError::Escape {
                    path: original,
                    why: "a symlink on the way climbs above the root",
                });
            }
            continue;
        }
        let next = cur.join(&c);
        let full = root.join(&next);
        match std::fs::symlink_metadata(&full) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&full)
                    .map_err(|source| ApplyError::Io {
                        path: next.clone(),
                        source,
                    })?;
                created(&next);
                cur = next;
            }
            Err(source) => return Err(ApplyError::Io { path: next, source }),
            Ok(m) if m.is_dir() => cur = next,
            Ok(m) if m.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(ApplyError::Escape {
                        path: original,
                        why: "too many levels of symbolic links",
                    });
                }
                let target = std::fs::read_link(&full).map_err(|source| ApplyError::Io {
                    path: next.clone(),
                    source,
                })?;
                let mut parts: Vec<OsString> = Vec::new();
                for tc in target.components() {
                    match tc {
                        Component::RootDir | Component::Prefix(_) => {
                            // Absolute: re-rooted at the image root.
                            cur = PathBuf::new();
                            parts.clear();
                        }
                        Component::CurDir => {}
                        Component::ParentDir => parts.push("..".into()),
                        Component::Normal(n) => parts.push(n.to_owned()),
                    }
                }
                for p in parts.into_iter().rev() {
                    pending.push_front(p);
                }
            }
            Ok(_) => {
                return Err(ApplyError::NotADirectory {
                    path: original,
                    component: next,
                })
            }
        }
    }
    Ok(Some(cur))
}

/// Removes whatever is at `path` without following a symlink there (directories recursively; absent is fine).
pub fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(s: &str) -> Vec<OsString> {
        normalize(Path::new(s)).unwrap()
    }

    #[test]
    fn normalization_refuses_escapes() {
        assert_eq!(comps("./a/./b/../c"), vec![OsString::from("a"), "c".into()]);
        assert!(normalize(Path::new("/etc/passwd")).is_err());
        assert!(normalize(Path::new("a/../../etc")).is_err());
        assert!(comps("./").is_empty());
    }

    #[test]
    fn symlinks_resolve_inside_the_root_or_fail() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("/usr", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        std::fs::write(root.join("file"), b"").unwrap();
        let mut none = |_: &Path| {};
        assert_eq!(
            resolve_dir(root, &comps("lib/x"), true, &mut none).unwrap(),
            Some(PathBuf::from("usr/lib/x"))
        );
        assert!(root.join("usr/lib/x").is_dir());
        assert_eq!(
            resolve_dir(root, &comps("abs/lib"), false, &mut none).unwrap(),
            Some(PathBuf::from("usr/lib"))
        );
        assert!(matches!(
            resolve_dir(root, &comps("up/etc"), true, &mut none),
            Err(ApplyError::Escape { .. })
        ));
        assert!(matches!(
            resolve_dir(root, &comps("loop/x"), true, &mut none),
            Err(ApplyError::Escape { .. })
        ));
        assert!(matches!(
            resolve_dir(root, &comps("file/x"), true, &mut none),
            Err(ApplyError::NotADirectory { .. })
        ));
        assert_eq!(
            resolve_dir(root, &comps("missing/x"), false, &mut none).unwrap(),
            None
        );
    }
}

//! Layer applier tests on archives built in the test (raw headers, so malicious names are possible).

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::*;

const BIG: Limits = Limits {
    max_layer_bytes: 1 << 30,
    max_image_bytes: 1 << 31,
};

/// Builds a tar archive entry by entry, writing names verbatim (even `../x` or `/x`).
struct Tar(tar::Builder<Vec<u8>>);

impl Default for Tar {
    fn default() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }
}

impl Tar {
    fn header(name: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    fn add(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        self.add(Self::header(name, tar::EntryType::Directory, 0o755, 0), b"")
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.add(
            Self::header(name, tar::EntryType::Regular, 0o644, data.len() as u64),
            data,
        )
    }

    fn link(&mut self, kind: tar::EntryType, name: &str, target: &str) -> &mut Self {
        let mut h = Self::header(name, kind, 0o777, 0);
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
        self.add(h, b"")
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body_len = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut len = body_len + 1;
            while len != body_len + len.to_string().len() {
                len = body_len + len.to_string().len();
            }
            write!(data, "{len} {k}=").unwrap();
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.add(
            Self::header("pax", tar::EntryType::XHeader, 0o644, data.len() as u64),
            &data,
        )
    }

    fn bytes(&mut self) -> Vec<u8> {
        std::mem::take(self).0.into_inner().unwrap()
    }
}

fn applier() -> (tempfile::TempDir, Applier) {
    let dir = tempfile::tempdir().unwrap();
    let applier = Applier::new(&dir.path().join("rootfs"), BIG).unwrap();
    (dir, applier)
}

fn apply(a: &mut Applier, t: &mut Tar) -> Result<LayerStats, ApplyError> {
    a.apply(&t.bytes()[..], Compression::None)
}

#[test]
fn files_links_devices_ownership_modes_and_xattrs() {
    let (dir, mut a) = applier();
    let root = dir.path().join("rootfs");
    let mut t = Tar::default();
    t.dir("bin/").file("bin/busybox", b"#!busybox");
    let mut suid = Tar::header("bin/su", tar::EntryType::Regular, 0o4755, 2);
    suid.set_uid(1000);
    suid.set_gid(2000);
    t.add(suid, b"su")
        .link(tar::EntryType::Symlink, "bin/sh", "busybox")
        .link(tar::EntryType::Link, "bin/hard", "bin/busybox");
    let mut null = Tar::header("dev/null", tar::EntryType::Char, 0o666, 0);
    null.set_device_major(1).unwrap();
    null.set_device_minor(3).unwrap();
    t.add(null, b"")
        .add(Tar::header("run/fifo", tar::EntryType::Fifo, 0o600, 0), b"")
        .pax(&[("SCHILY.xattr.user.podvisor", b"yes")])
        .file("etc/tagged", b"x");
    let stats = apply(&mut a, &mut t).unwrap();
    assert_eq!(stats.entries, 8);
    a.finish().unwrap();

    assert_eq!(
        std::fs::read(root.join("bin/busybox")).unwrap(),
        b"#!busybox"
    );
    let su = std::fs::metadata(root.join("bin/su")).unwrap();
    assert_eq!(
        (su.uid(), su.gid(), su.mode() & 0o7777),
        (1000, 2000, 0o4755)
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let hard = std::fs::metadata(root.join("bin/hard")).unwrap();
    assert_eq!(
        hard.ino(),
        std::fs::metadata(root.join("bin/busybox")).unwrap().ino()
    );
    assert_eq!(hard.nlink(), 2);
    let null = std::fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (null.rdev(), null.mode() & 0o777),
        (nix::sys::stat::makedev(1, 3), 0o666)
    );
    assert!(std::fs::symlink_metadata(root.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        xattr::get(root.join("etc/tagged"), "user.podvisor").unwrap(),
        Some(b"yes".to_vec())
    );
    // Directory mtimes survive the files written into them.
    assert_eq!(
        std::fs::metadata(root.join("bin")).unwrap().mtime(),
        1_600_000_000
    );
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers_only() {
    let (dir, mut a) = applier();
    let root = dir.path().join("rootfs");
    apply(
        &mut a,
        Tar::default()
            .file("a/x", b"x")
            .file("a/y", b"y")
            .file("b/z", b"z")
            .file("d/old1", b"1")
            .dir("d/old2/"),
    )
    .unwrap();
    apply(
        &mut a,
        Tar::default()
            .file("a/.wh.x", b"")
            .file(".wh.b", b"")
            .file("d/new-before", b"n")
            .file("d/.wh..wh..opq", b"")
            .file("d/new-after", b"m")
            .file("a/.wh.never-existed", b"")
            .file("gone/.wh.nothing", b""),
    )
    .unwrap();
    assert!(!root.join("a/x").exists());
    assert!(root.join("a/y").exists());
    assert!(!root.join("b").exists());
    let mut d: Vec<_> = std::fs::read_dir(root.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    d.sort();
    assert_eq!(d, ["new-after", "new-before"]);
    // Whiteout markers are never materialized.
    assert!(!root.join("a/.wh.x").exists() && !root.join("d/.wh..wh..opq").exists());
}

#[test]
fn hard_links_reach_lower_layers_and_overwrites_do_not_follow_symlinks() {
    let (dir, mut a) = applier();
    let root = dir.path().join("rootfs");
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"host file").unwrap();
    apply(
        &mut a,
        Tar::default()
            .file("usr/bin/tool", b"tool")
            .link(tar::EntryType::Symlink, "bin", "usr/bin")
            .link(tar::EntryType::Symlink, "trap", outside.to_str().unwrap()),
    )
    .unwrap();
    apply(
        &mut a,
        Tar::default()
            .link(tar::EntryType::Link, "bin/tool-link", "usr/bin/tool")
            .file("trap", b"replaced")
            .file("bin/new", b"through a symlink inside the root"),
    )
    .unwrap();
    assert_eq!(
        std::fs::read(root.join("usr/bin/tool-link")).unwrap(),
        b"tool"
    );
    assert_eq!(std::fs::read(root.join("usr/bin/new")).unwrap().len(), 33);
    assert!(std::fs::symlink_metadata(root.join("trap"))
        .unwrap()
        .is_file());
    assert_eq!(std::fs::read(&outside).unwrap(), b"host file");
}

#[test]
fn escapes_are_refused_and_nothing_outside_is_touched() {
    type Build = Box<dyn Fn(&mut Tar)>;
    let cases: Vec<(&str, Build)> = vec![
        (
            "dotdot",
            Box::new(|t| {
                t.file("../evil", b"x");
            }),
        ),
        (
            "nested dotdot",
            Box::new(|t| {
                t.file("a/../../evil", b"x");
            }),
        ),
        (
            "absolute",
            Box::new(|t| {
                t.file("/evil", b"x");
            }),
        ),
        (
            "relative symlink climbing out",
            Box::new(|t| {
                t.link(tar::EntryType::Symlink, "up", "../..")
                    .file("up/evil", b"x");
            }),
        ),
        (
            "symlink chain",
            Box::new(|t| {
                t.link(tar::EntryType::Symlink, "a", "b/../..")
                    .dir("b/")
                    .file("a/evil", b"x");
            }),
        ),
        (
            "hard link out",
            Box::new(|t| {
                t.link(tar::EntryType::Link, "evil", "../outside");
            }),
        ),
        (
            "hard link through escaping symlink",
            Box::new(|t| {
                t.link(tar::EntryType::Symlink, "up", "..").link(
                    tar::EntryType::Link,
                    "evil",
                    "up/outside",
                );
            }),
        ),
        (
            "whiteout through escaping symlink",
            Box::new(|t| {
                t.link(tar::EntryType::Symlink, "up", "..")
                    .file("up/.wh.outside", b"");
            }),
        ),
    ];
    for (what, build) in cases {
        let (dir, mut a) = applier();
        std::fs::write(dir.path().join("outside"), b"keep").unwrap();
        let mut t = Tar::default();
        build(&mut t);
        let err = apply(&mut a, &mut t).expect_err(what);
        assert!(matches!(err, ApplyError::Escape { .. }), "{what}: {err}");
        assert_eq!(
            std::fs::read(dir.path().join("outside")).unwrap(),
            b"keep",
            "{what}"
        );
        assert!(!dir.path().join("evil").exists(), "{what}");
    }
}

#[test]
fn absolute_symlinks_are_followed_relative_to_the_root() {
    let (dir, mut a) = applier();
    let root = dir.path().join("rootfs");
    apply(
        &mut a,
        Tar::default()
            .dir("run/")
            .link(tar::EntryType::Symlink, "var/run", "/run")
            .file("var/run/pid", b"1"),
    )
    .unwrap();
    assert_eq!(std::fs::read(root.join("run/pid")).unwrap(), b"1");
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn decompression_bombs_are_refused_per_layer_and_per_image() {
    let zeros = vec![0u8; 8 << 20];
    let bomb = gzip(&Tar::default().file("zeros", &zeros).bytes());
    assert!(bomb.len() < 64 << 10, "compresses well: {}", bomb.len());
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_layer_bytes: 1 << 20,
        max_image_bytes: 1 << 30,
    };
    let mut a = Applier::new(&dir.path().join("r1"), limits).unwrap();
    let err = a.apply(&bomb[..], Compression::Gzip).unwrap_err();
    assert!(
        matches!(err, ApplyError::TooLarge { what: "layer", limit } if limit == 1 << 20),
        "{err}"
    );

    let limits = Limits {
        max_layer_bytes: 1 << 30,
        max_image_bytes: 12 << 20,
    };
    let mut a = Applier::new(&dir.path().join("r2"), limits).unwrap();
    a.apply(&bomb[..], Compression::Gzip).unwrap();
    let err = a.apply(&bomb[..], Compression::Gzip).unwrap_err();
    assert!(
        matches!(err, ApplyError::TooLarge { what: "image", .. }),
        "{err}"
    );
}

#[test]
fn compressions_agree_and_diff_ids_are_the_uncompressed_digest() {
    let tar = Tar::default().file("hello", b"world").dir("d/").bytes();
    let expected = Digest::of(&tar);
    let zstd = zstd::encode_all(&tar[..], 3).unwrap();
    for (data, c) in [
        (tar.clone(), Compression::None),
        (gzip(&tar), Compression::Gzip),
        (zstd, Compression::Zstd),
    ] {
        assert_eq!(Compression::sniff(&data), c);
        let (dir, mut a) = applier();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, &data).unwrap();
        let stats = a.apply_file(&blob, Some(expected.as_str())).unwrap();
        assert_eq!(
            (stats.diff_id.clone(), stats.bytes),
            (expected.clone(), tar.len() as u64)
        );
        assert_eq!(
            std::fs::read(dir.path().join("rootfs/hello")).unwrap(),
            b"world"
        );
        let err = a
            .apply_file(&blob, Some(Digest::of(b"other").as_str()))
            .unwrap_err();
        assert!(
            matches!(err, ApplyError::DiffIdMismatch { index: 1, .. }),
            "{err}"
        );
    }
}

#[test]
fn corrupt_archives_fail_cleanly() {
    let (_dir, mut a) = applier();
    let mut tar = Tar::default().file("x", &[7u8; 4096]).bytes();
    tar.truncate(1500);
    assert!(matches!(
        a.apply(&tar[..], Compression::None),
        Err(ApplyError::Corrupt(_))
    ));
    assert!(matches!(
        a.apply(&b"\x1f\x8bnot gzip at all"[..], Compression::Gzip),
        Err(ApplyError::Corrupt(_))
    ));
}
